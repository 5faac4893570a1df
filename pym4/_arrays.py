"""Array plumbing shared by the ops: numpy/torch in, torch inside, the caller's type out,
and the argument checks that must fail before any work starts."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Origin:
    """Where an input came from, so the result can go back the same way."""
    is_numpy: bool
    dtype: torch.dtype
    device: torch.device


def to_tensor(x: Any, name: str) -> Tuple[torch.Tensor, Origin]:
    """A torch view of a numpy array or tensor (no copy when possible), and its origin."""
    if isinstance(x, torch.Tensor):
        check_has_values(x, name)
        return x, Origin(False, x.dtype, x.device)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub" or x.dtype.itemsize > 8:
            raise TypeError(f"{name}: unsupported dtype {x.dtype}")
        if any(s < 0 for s in x.strides):  # torch cannot view negative strides
            x = np.ascontiguousarray(x)
        with warnings.catch_warnings():
            # A read-only array is fine: pym4 never writes into its inputs.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(x)
        return t, Origin(True, t.dtype, t.device)
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def check_has_values(t: torch.Tensor, name: str) -> None:
    # A meta tensor has a shape and no values: every op would fail deep inside torch, on
    # .item() or a copy, with a message that names no argument.
    if t.device.type == "meta":
        raise ValueError(f"{name}: is on the meta device (a shape without values); "
                         "pass a tensor with values, on the CPU or a GPU")


def from_tensor(t: torch.Tensor, origin: Origin):
    """Return ``t`` in the caller's array type, dtype and device."""
    t = t.to(device=origin.device, dtype=origin.dtype)
    return t.numpy() if origin.is_numpy else t


def check_float(t: torch.Tensor, name: str, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected a floating-point array ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_ndim(t: torch.Tensor, ndim: int, name: str, what: str = "") -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array{what}, got shape {tuple(t.shape)}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


def check_positive_scalar(value: Any, name: str) -> float:
    # float() reads "0.05" and True too: a string or a bool is a mistake, not a number
    # (epsilon=True would run as 1.0).
    if isinstance(value, (str, bytes, bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name}: expected a positive number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    return v


def check_int_at_least(value: Any, low: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    if value > INT64_MAX:  # the core takes int64: say so here, not as pybind11's "incompatible arguments"
        raise ValueError(f"{name}: must be <= 2**63 - 1, got {value}")
    return int(value)


INT64_MAX = 2 ** 63 - 1
