"""Fused Triton kernels for the CLIP and SigLIP losses (``pym4.clip_loss``, ``pym4.siglip_loss``).

Every kernel gives one program a block of BLOCK_M rows of A and walks all column blocks of
B, computing the logit tile ``S = s * A_blk @ B_blk^T + b`` (float32 accumulation over D in
BLOCK_K steps) in registers; nothing of size B x B is ever written. The passes:

- ``_clip_lse_kernel``:   row log-sum-exp of S with a running max and sum (online LSE);
  run on (x, y) it gives r, on (y, x) it gives c.
- ``_siglip_fwd_kernel``: per-row sum of softplus(S_ij), minus S at the diagonal.
- ``_clip_grad_kernel``:  dA = s * G @ B for ``G_ij = w_own_i (e^{S_ij - lse_own_i} - d_ij)
  + w_oth_j (e^{S_ij - lse_oth_j} - d_ij)``, and the own-term scale gradient per row; run on
  (x, y) it gives dx, on (y, x) it gives dy (G^T has the same form with roles swapped).
- ``_siglip_grad_kernel``: the same for ``G_ij = w_i (sigmoid(S_ij) - d_ij)``, with the
  weight on the rows (dx, ds, db) or on the columns (dy).

The gradient kernels split D into BLOCK_DO-wide output slabs (grid axis 1) so the dA
accumulator fits in registers; each slab recomputes S. Two passes instead of atomics keep
the backward deterministic. The diagonal of the loss is at ``(i, offset + i)``, which lets a
rank pass its local rows against the global columns. Inputs may be float32, float16 or
bfloat16 with any strides; outputs are float32.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from pym4 import _backend

# Triton decides at its import whether kernels run interpreted; this module follows it.
_INTERPRET = _backend.triton_interpret()


@triton.jit
def _logit_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, sa0, sa1, sb0, sb1, scale, bias,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Return (S, raw) for one tile: raw = A_blk @ B_blk^T in float32, S = scale * raw + bias."""
    ks = tl.arange(0, BLOCK_K)
    raw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows < n_a
    col_ok = cols < n_b
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * sa0 + k[None, :] * sa1,
                    mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
        bt = tl.load(b_ptr + cols[None, :].to(tl.int64) * sb0 + k[:, None] * sb1,
                     mask=col_ok[None, :] & (k[:, None] < D), other=0.0)
        raw = tl.dot(a, bt, raw, input_precision=PRECISION)
    return raw * scale + bias, raw


@triton.jit
def _clip_lse_kernel(a_ptr, b_ptr, out_ptr, n_a, n_b, D, sa0, sa1, sb0, sb1, scale, bias,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_b, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, _ = _logit_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, sa0, sa1, sb0, sb1, scale, bias,
                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        s = tl.where((cols < n_b)[None, :], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # Every block holds at least one real column, so new_max is finite.
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(out_ptr + rows, run_max + tl.log(run_sum), mask=rows < n_a)


@triton.jit
def _log1p(t):
    # log(1 + t) for t >= 0 without losing small t (Goldberg's trick); tl has no log1p on
    # every backend, and the softplus of SigLIP's many negatives (S ~ -10) lives on small t.
    u = 1.0 + t
    d = tl.where(u == 1.0, 1.0, u - 1.0)  # no 0/0 in the branch tl.where discards
    return tl.where(u == 1.0, t, tl.log(u) * (t / d))


@triton.jit
def _siglip_fwd_kernel(a_ptr, b_ptr, out_ptr, n_a, n_b, D, sa0, sa1, sb0, sb1, scale, bias, offset,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_b, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, _ = _logit_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, sa0, sa1, sb0, sb1, scale, bias,
                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        softplus = tl.maximum(s, 0.0) + _log1p(tl.exp(-tl.abs(s)))
        is_diag = cols[None, :] == rows[:, None] + offset
        term = tl.where(is_diag, softplus - s, softplus)
        total += tl.sum(tl.where((cols < n_b)[None, :], term, 0.0), axis=1)
    tl.store(out_ptr + rows, total, mask=rows < n_a)


@triton.jit
def _clip_grad_kernel(a_ptr, b_ptr, lse_own_ptr, lse_oth_ptr, w_own_ptr, w_oth_ptr, da_ptr, ds_ptr,
                      n_a, n_b, D, sa0, sa1, sb0, sb1, sd0, scale, bias, offset,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slab = tl.program_id(1)
    dout = slab * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_ok = rows < n_a
    lse_own = tl.load(lse_own_ptr + rows, mask=row_ok, other=0.0)
    w_own = tl.load(w_own_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_b, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_b
        s, raw = _logit_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, sa0, sa1, sb0, sb1, scale, bias,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        lse_oth = tl.load(lse_oth_ptr + cols, mask=col_ok, other=0.0)
        w_oth = tl.load(w_oth_ptr + cols, mask=col_ok, other=0.0)
        is_diag = (cols[None, :] == rows[:, None] + offset).to(tl.float32)
        g_own = w_own[:, None] * (tl.exp(s - lse_own[:, None]) - is_diag)
        g = g_own + w_oth[None, :] * (tl.exp(s - lse_oth[None, :]) - is_diag)
        g = tl.where(col_ok[None, :] & row_ok[:, None], g, 0.0)
        ds += tl.sum(tl.where(col_ok[None, :], g_own * raw, 0.0), axis=1)
        bv = tl.load(b_ptr + cols[:, None].to(tl.int64) * sb0 + dout[None, :] * sb1,
                     mask=col_ok[:, None] & (dout[None, :] < D), other=0.0)
        acc = tl.dot(g.to(bv.dtype), bv, acc, input_precision=PRECISION)
    tl.store(da_ptr + rows[:, None].to(tl.int64) * sd0 + dout[None, :], acc * scale,
             mask=row_ok[:, None] & (dout[None, :] < D))
    if slab == 0:
        tl.store(ds_ptr + rows, ds, mask=row_ok)


@triton.jit
def _siglip_grad_kernel(a_ptr, b_ptr, w_ptr, da_ptr, ds_ptr, dbias_ptr,
                        n_a, n_b, D, sa0, sa1, sb0, sb1, sd0, scale, bias, offset,
                        WEIGHT_ON_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slab = tl.program_id(1)
    dout = slab * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_ok = rows < n_a
    if WEIGHT_ON_ROWS:
        w_rows = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_b, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_b
        s, raw = _logit_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, sa0, sa1, sb0, sb1, scale, bias,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        is_diag = cols[None, :] == rows[:, None] + offset
        # sigmoid(S) - 1 = -sigmoid(-S): one sigmoid of the signed logit, no cancellation.
        z = tl.where(is_diag, -s, s)
        e = tl.exp(-tl.abs(z))
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        g = tl.where(is_diag, -sig, sig)
        if WEIGHT_ON_ROWS:
            g = g * w_rows[:, None]
        else:
            g = g * tl.load(w_ptr + cols, mask=col_ok, other=0.0)[None, :]
        g = tl.where(col_ok[None, :] & row_ok[:, None], g, 0.0)
        if WEIGHT_ON_ROWS:
            ds += tl.sum(g * raw, axis=1)
            dbias += tl.sum(g, axis=1)
        bv = tl.load(b_ptr + cols[:, None].to(tl.int64) * sb0 + dout[None, :] * sb1,
                     mask=col_ok[:, None] & (dout[None, :] < D), other=0.0)
        acc = tl.dot(g.to(bv.dtype), bv, acc, input_precision=PRECISION)
    tl.store(da_ptr + rows[:, None].to(tl.int64) * sd0 + dout[None, :], acc * scale,
             mask=row_ok[:, None] & (dout[None, :] < D))
    if WEIGHT_ON_ROWS:
        if slab == 0:
            tl.store(ds_ptr + rows, ds, mask=row_ok)
            tl.store(dbias_ptr + rows, dbias, mask=row_ok)


# ----- host side ---------------------------------------------------------------------------------

def _precision(t: torch.Tensor) -> str:
    # float32 follows torch's own switch for matmuls (off by default: exact float32), so the
    # kernels agree with open_clip's logits to float32 rounding unless the caller opted in.
    if t.dtype == torch.float32 and not _INTERPRET and _matmul_allows_tf32():
        return "tf32"
    return "ieee"


def _matmul_allows_tf32() -> bool:
    """Whether torch's float32 CUDA matmuls may use TF32. Read through the fp32_precision
    setting where torch has it (2.9 on): there, once a program has set it (torch's current
    advice, e.g. torch.backends.fp32_precision = "tf32"), reading the legacy allow_tf32
    raises RuntimeError ("mix of the legacy and new APIs"), which failed every float32 loss.
    The legacy flags set it too ("tf32" after allow_tf32 = True); the default is "none"."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


# Tiles per dtype and precision, chosen from the native sm_90 and sm_80 compiles of
# scripts/gpu_compile_check.py (registers, stack, shared memory; issue 12). Half precision
# feeds the tensor cores 16-bit operands and fits 255 registers with no spill at 64-wide K
# steps. float32 holds twice the bytes per operand: with the half tiles every float32 kernel
# spilled 0.5-2 KB per thread (to local memory, i.e. DRAM), so its K step is smaller and the
# gradient's output slab at most 128 wide (the dA accumulator, BLOCK_M x BLOCK_DO float32, is
# what fills the register file). "ieee" (exact products, FMA instead of tensor cores) needs the
# smallest tiles: at BLOCK_N 64 its gradient still spilled ~350 B on sm_80.
# (BLOCK_M, BLOCK_N, BLOCK_K cap, BLOCK_DO cap, num_warps, num_stages) per (mode, grad?).
_TILES = {
    ("half", False): (128, 64, 64, None, 8, 3),
    ("half", True): (64, 64, 64, 256, 8, 3),
    ("tf32", False): (64, 64, 32, None, 8, 3),
    ("tf32", True): (64, 64, 16, 128, 8, 3),
    ("ieee", False): (64, 64, 16, None, 8, 3),
    ("ieee", True): (64, 32, 16, 128, 8, 3),
}
# Triton's CPU interpreter: small blocks, so that the test sizes cover many tiles and several
# output slabs; never compiled natively (compile_configs leaves it out).
_INTERPRETER_TILES = {False: (32, 32, 32, None, 4, 1), True: (32, 32, 32, 64, 4, 1)}

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _config(dtype: torch.dtype, precision: str, d: int, grad: bool, interpret: bool = False) -> dict:
    """The launch configuration of one contrastive kernel, shared by the launcher and compile_configs().

    dtype: the inputs' (float32, float16 or bfloat16); precision: tl.dot's input_precision
    ("ieee" or "tf32", see _precision); d: the feature size D; grad: a gradient kernel (which
    also gets BLOCK_DO, the width of its output slab). Returns {"BLOCK_M", "BLOCK_N",
    "BLOCK_K"[, "BLOCK_DO"], "num_warps", "num_stages"}; BLOCK_K and BLOCK_DO shrink to D's
    next power of two (at least 16) so a small D does not load masked-out columns.
    """
    if interpret:
        block_m, bn, bk, bdo, warps, stages = _INTERPRETER_TILES[grad]
    else:
        if dtype not in _TL_DTYPE or precision not in ("ieee", "tf32"):
            raise ValueError(f"no contrastive kernel configuration for dtype {dtype}, precision {precision!r}")
        block_m, bn, bk, bdo, warps, stages = _TILES[("half" if dtype != torch.float32 else precision, grad)]
    d_pow2 = max(16, triton.next_power_of_2(d))
    cfg = {"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": min(bk, d_pow2)}
    if grad:
        cfg["BLOCK_DO"] = min(bdo, d_pow2)
    cfg.update(num_warps=warps, num_stages=stages)
    return cfg


def _launch_config(a: torch.Tensor, grad: bool) -> dict:
    """_config for the tensor a kernel is launched on (its dtype, precision mode and D)."""
    return _config(a.dtype, _precision(a), a.shape[1], grad, interpret=_INTERPRET)


def _signature(fn, dt: str, constexprs: dict) -> dict:
    """Triton types of fn's non-constexpr arguments, in order: A and B (a_ptr, b_ptr) in the
    input dtype dt, every other pointer float32, scale and bias float32, the rest (sizes,
    strides, the diagonal offset) int32, as the launcher passes them."""
    def kind(name):
        if name in ("a_ptr", "b_ptr"):
            return "*" + dt
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in ("scale", "bias") else "i32"
    return {name: kind(name) for name in fn.arg_names if name not in constexprs}


def compile_configs():
    """Every configuration the launcher can choose on a GPU (interpreter-only ones excluded),
    for the native compile check (scripts/gpu_compile_check.py). Yields one dict per kernel
    instance: name, fn, signature (non-constexpr arguments in order, Triton types), constexprs,
    num_warps, num_stages, and divisible (integer arguments compiled as multiples of 16).

    Covers float32 ("ieee" and "tf32"), float16 and bfloat16, D from 16 to 2048 (larger D
    reuse the D = 2048 blocks), both directions of the SigLIP gradient.
    """
    modes = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"), (torch.bfloat16, "ieee")]
    kernels = [(_clip_lse_kernel, False, [{}]), (_siglip_fwd_kernel, False, [{}]), (_clip_grad_kernel, True, [{}]),
               (_siglip_grad_kernel, True, [{"WEIGHT_ON_ROWS": True}, {"WEIGHT_ON_ROWS": False}])]
    for fn, grad, variants in kernels:
        for dtype, precision in modes:
            seen = {}
            for d in (2 ** k for k in range(4, 12)):  # 16 .. 2048
                cfg = _config(dtype, precision, d, grad)
                key = tuple(sorted(cfg.items()))
                seen.setdefault(key, []).append(d)
            for key, ds in seen.items():
                cfg = dict(key)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                d_range = f"D={ds[0]}" if len(ds) == 1 else f"D={ds[0]}..{ds[-1]}"
                for extra in variants:
                    # Column strides 1, as Triton specialises them at every launch (prepare()
                    # makes the features row-contiguous): the unit-stride kernels are the ones
                    # that run, with other registers and pipelining than a generic stride's.
                    constexprs = dict(extra, **cfg, PRECISION=precision, sa1=1, sb1=1)
                    constexprs = {k: constexprs[k] for k in fn.arg_names if k in constexprs}
                    tag = "".join(f",{k}={int(v)}" for k, v in extra.items())
                    yield {
                        "name": f"{fn.__name__}[{_TL_DTYPE[dtype]},{precision},{d_range}{tag}]",
                        "fn": fn,
                        "signature": _signature(fn, _TL_DTYPE[dtype], constexprs),
                        "constexprs": constexprs,
                        "num_warps": warps,
                        "num_stages": stages,
                        # D and the row strides, multiples of 16 at every D here (as Triton
                        # marks such integers at launch; the usual D = 256..1024 are)
                        "divisible": [a for a in ("D", "sa0", "sb0", "sd0") if a in fn.arg_names],
                    }


def _weight_unit(a: torch.Tensor, *weights: torch.Tensor) -> float:
    """A power of two to divide G's weights by before G is rounded to float16 for tl.dot.

    G = w (p - d) with w ~ g / 2B: at B = 32768 without a loss scaler that is ~1e-9, below
    float16's smallest subnormal (6e-8), and the gradient would silently be 0. Dividing by
    ~max|w| puts G in [-2, 2]; being a power of two, the float32 results are scaled back
    exactly. bfloat16 and float32 have float32's range and need nothing.
    """
    if a.dtype != torch.float16:
        return 1.0
    top = float(torch.stack([w.abs().max() for w in weights]).max())
    if top == 0.0 or not math.isfinite(top):  # inf/NaN upstream must reach the gradients as is
        return 1.0
    return 2.0 ** math.frexp(top)[1]


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class TritonEngine:
    """The tile passes of ``pym4.contrastive`` as fused Triton kernels (see ChunkedEngine)."""

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        if _INTERPRET and t.dtype == torch.bfloat16:
            # Triton's CPU interpreter (numpy) has no bfloat16 and reads it as garbage; the
            # native bfloat16 path is exercised by the GPU tests.
            return t.detach().float()
        # Features with unit column stride: the kernels' column offsets (k * stride) are int32,
        # which a column-major view of over 2^31 elements would overflow, and Triton
        # specialises a stride of 1 into the faster unit-stride kernels.
        t = t.detach()
        return t if t.dim() != 2 or t.stride(1) == 1 else t.contiguous()

    @staticmethod
    def _lse(a, bm, s, b):
        cfg = _launch_config(a, False)
        out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        with _on_device(a):
            _clip_lse_kernel[(triton.cdiv(a.shape[0], cfg["BLOCK_M"]),)](
                a, bm, out, a.shape[0], bm.shape[0], a.shape[1], a.stride(0), a.stride(1), bm.stride(0), bm.stride(1),
                float(s), float(b), PRECISION=_precision(a), **cfg)
        return out

    def clip_forward(self, a, bm, s, b):
        r = self._lse(a, bm, s, b)
        c = self._lse(bm, a, s, b)  # the column LSE over these rows: rows of S^T
        return r, c, torch.ones_like(c)

    @staticmethod
    def _clip_grad(a, bm, s, b, lse_own, lse_oth, w_own, w_oth, offset):
        d = a.shape[1]
        cfg = _launch_config(a, True)
        da = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        ds = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        unit = _weight_unit(a, w_own, w_oth)
        grid = (triton.cdiv(a.shape[0], cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"]))
        with _on_device(a):
            _clip_grad_kernel[grid](
                a, bm, lse_own.float().contiguous(), lse_oth.float().contiguous(), (w_own.float() / unit).contiguous(),
                (w_oth.float() / unit).contiguous(), da, ds, a.shape[0], bm.shape[0], d, a.stride(0), a.stride(1),
                bm.stride(0), bm.stride(1), da.stride(0), float(s), float(b), int(offset),
                PRECISION=_precision(a), **cfg)
        if unit != 1.0:
            da.mul_(unit)
            ds.mul_(unit)
        return da, ds

    def clip_backward(self, a, bm, s, b, r, c, w_row, w_col, offset, split_scale):
        da, ds_row = self._clip_grad(a, bm, s, b, r, c, w_row, w_col, offset)
        db, ds_col = self._clip_grad(bm, a, s, b, c, r, w_col, w_row, -offset)
        if split_scale:
            return da, db, (ds_row, ds_col)
        return da, db, float(ds_row.sum(dtype=torch.float64) + ds_col.sum(dtype=torch.float64))

    def siglip_forward(self, a, bm, s, b, offset):
        cfg = _launch_config(a, False)
        out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        with _on_device(a):
            _siglip_fwd_kernel[(triton.cdiv(a.shape[0], cfg["BLOCK_M"]),)](
                a, bm, out, a.shape[0], bm.shape[0], a.shape[1], a.stride(0), a.stride(1), bm.stride(0), bm.stride(1),
                float(s), float(b), int(offset), PRECISION=_precision(a), **cfg)
        return out

    @staticmethod
    def _siglip_grad(a, bm, s, b, w, offset, weight_on_rows):
        d = a.shape[1]
        cfg = _launch_config(a, True)
        da = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        ds = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        dbias = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        unit = _weight_unit(a, w)
        grid = (triton.cdiv(a.shape[0], cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"]))
        with _on_device(a):
            _siglip_grad_kernel[grid](
                a, bm, (w.float() / unit).contiguous(), da, ds, dbias, a.shape[0], bm.shape[0], d, a.stride(0), a.stride(1),
                bm.stride(0), bm.stride(1), da.stride(0), float(s), float(b), int(offset),
                WEIGHT_ON_ROWS=weight_on_rows, PRECISION=_precision(a), **cfg)
        if unit != 1.0:
            da.mul_(unit)
            if weight_on_rows:  # ds and dbias are written only then
                ds.mul_(unit)
                dbias.mul_(unit)
        return da, ds, dbias

    def siglip_backward(self, a, bm, s, b, w_row, offset):
        da, ds, dbias = self._siglip_grad(a, bm, s, b, w_row, offset, True)
        db, _, _ = self._siglip_grad(bm, a, s, b, w_row, -offset, False)
        return (da, db, float(ds.sum(dtype=torch.float64)), float(dbias.sum(dtype=torch.float64)))
