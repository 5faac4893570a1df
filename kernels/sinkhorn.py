"""Triton kernels of Sinkhorn-Knopp (``pym4.sinkhorn(..., backend="triton")``).

The plan is kept as a matrix x (B, K) read in its own dtype (float32, float16 or bfloat16)
and two scaling vectors, so that an iteration reads x once in a fused row pass instead of
SwAV's four passes that read and write the whole matrix. Two forms, chosen per call from
the spread of alpha * x (alpha = 1/epsilon), as in the C++ core (csrc/sinkhorn.cpp):

- kernel (scaling) form, spread <= 80: ``P_ij = exp(alpha x_ij - c) * w_j * s_i`` with
  c = max alpha x, so every exp(alpha x - c) is a normal float32 in [e^-80, 1]; no running
  maximum is needed anywhere.
- log domain, otherwise (epsilon = 0.01 on cosine scores, un-normalised features):
  ``P_ij = exp(alpha x_ij + g_j + f_i)`` with a running row maximum, so nothing overflows
  whatever the spread.

Kernels (all accumulation in float32; no atomics, so results are deterministic):

- ``_column_kernel``: the first column statistics. Program (p, t) reduces rows
  [p R, (p+1) R) of column tile t: the sum of exp(alpha x - c) (kernel form) or the
  (max, sum) pair of the column log-sum-exp (log domain), into partials (P, K).
- ``_row_kernel``: the row step fused with the next column sums. A program owns BLOCK_M
  rows; a first sweep over the column tiles gives each row's normaliser (the row sum
  r_i = sum_j E_ij w_j, or the row log-sum-exp), a second sweep (the same tiles, mostly from
  L2) writes either the plan or the program's partial column masses of the plan after the
  row step, into partials (P, K).
- ``_combine_kernel``: reduces the P partials of each column and applies the column step
  (w_j <- b_j w_j / mass_j, or g_j <- g_j + log b_j - log mass_j; a zero-mass column stays
  at 0 / -inf).

A solve is 1 + 2 n_iters launches (column, combine, then per iteration row + combine, the
last row pass writing): the same count for every shape, far below SwAV's reference.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from pym4 import _backend
from pym4._sinkhorn_passes import _FLOAT32_MAX_EXPONENT

_INTERPRET = _backend.triton_interpret()  # the one reader of TRITON_INTERPRET

# Largest spread of alpha * x for the kernel form (float32: e^-80 > 1.2e-38 stays normal).
KERNEL_FORM_SPREAD = 80.0


class NeedsFloat64(Exception):
    """max |alpha x| is beyond what float32 exponents resolve (see
    ``pym4._sinkhorn_passes._FLOAT32_MAX_EXPONENT``); the kernels compute in float32, so the
    caller solves in float64 instead. Raised before anything is written."""
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _online_lse(run_max, run_sum, t, AXIS: tl.constexpr):
    """Folds the tile t into the running (max, sum) of a log-sum-exp along AXIS; an
    all -inf line so far keeps (-inf, 0) instead of producing -inf - (-inf) = NaN."""
    new_max = tl.maximum(run_max, tl.max(t, axis=AXIS))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(t - tl.expand_dims(safe, AXIS)), axis=AXIS)
    return new_max, run_sum


@triton.jit
def _column_kernel(x_ptr, part_a_ptr, part_b_ptr, B, K, stride_x, alpha, shift, rows_per_prog,
                   KERNEL_FORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    r0 = pid * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, B)
    run_max = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i0 in range(r0, r1, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        ok = (rows < r1)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0)
        t = x.to(tl.float32) * alpha
        if KERNEL_FORM:
            # Padding lanes take exp(0) and are then dropped (no overflow, no inf * 0).
            run_sum += tl.sum(tl.where(ok, tl.exp(tl.where(ok, t, shift) - shift), 0.0), axis=0)
        else:
            run_max, run_sum = _online_lse(run_max, run_sum, tl.where(ok, t, float("-inf")), 0)
    tl.store(part_a_ptr + pid.to(tl.int64) * K + cols, run_sum, mask=col_ok)
    if not KERNEL_FORM:
        tl.store(part_b_ptr + pid.to(tl.int64) * K + cols, run_max, mask=col_ok)


@triton.jit
def _row_tile(x_rows, v_ptr, cols, ok, K, alpha, shift, KERNEL_FORM: tl.constexpr):
    """One (BLOCK_M, BLOCK_K) tile of the plan before row scaling: exp(alpha x - c) w_j in the
    kernel form (0 outside the matrix), alpha x + g_j in the log domain (-inf outside)."""
    t = tl.load(x_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * alpha
    if KERNEL_FORM:
        w = tl.load(v_ptr + cols, mask=cols < K, other=0.0)
        # Padding lanes take exp(0) and are then dropped (no overflow, no inf * 0).
        return tl.exp(tl.where(ok, t, shift) - shift) * tl.where(ok, w[None, :], 0.0)
    g = tl.load(v_ptr + cols, mask=cols < K, other=float("-inf"))
    return tl.where(ok, t + g[None, :], float("-inf"))


@triton.jit
def _row_kernel(x_ptr, out_ptr, v_ptr, log_a_ptr, row_ptr, part_ptr, B, K, stride_x, stride_out, alpha, shift,
                log_out_scale, KERNEL_FORM: tl.constexpr, WRITE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    # Sweep 1: the row normaliser. Kernel form: r_i = sum_j exp(alpha x_ij - c) w_j.
    # Log domain: the running (max, sum) of alpha x_ij + g_j.
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        tile = _row_tile(x_rows, v_ptr, cols, ok, K, alpha, shift, KERNEL_FORM)
        if KERNEL_FORM:
            run_sum += tl.sum(tile, axis=1)
        else:
            run_max, run_sum = _online_lse(run_max, run_sum, tile, 1)
    log_a = tl.load(log_a_ptr + rows, mask=row_ok, other=0.0)
    if WRITE:
        log_a += log_out_scale
    # Row i of the plan carries mass a_i: P_ij = exp(alpha x_ij - c) w_j * a_i / r_i, or
    # exp(alpha x_ij + g_j - m_i) * a_i / s_i.
    row_max = tl.where(run_max == float("-inf"), 0.0, run_max)
    run_sum = tl.where(row_ok, run_sum, 1.0)  # padding rows: no 1/0
    scale = tl.exp(log_a) / run_sum
    if KERNEL_FORM:
        tl.store(row_ptr + rows, scale, mask=row_ok)  # checked by the launcher (0, inf or NaN: overflow)
    else:
        tl.store(row_ptr + rows, log_a - row_max - tl.log(run_sum), mask=row_ok)  # f_i
    # Sweep 2: the plan, or this program's partial column masses of it.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        tile = _row_tile(x_rows, v_ptr, cols, ok, K, alpha, shift, KERNEL_FORM)
        if KERNEL_FORM:
            p = tile * scale[:, None]
        else:
            p = tl.exp(tile - row_max[:, None]) * scale[:, None]
        p = tl.where(ok, p, 0.0)
        if WRITE:
            tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
                     p.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(part_ptr + pid.to(tl.int64) * K + cols, tl.sum(p, axis=0), mask=cols < K)


@triton.jit
def _partial_tile(p0, steps, P, cols, ok, K):
    """Offsets and mask of the (BLOCK_P, BLOCK_K) tile of partial rows p0 + steps, in int64
    (p * K in int32 would wrap past 2^31 entries of partials)."""
    ps = p0 + steps
    return ps[:, None].to(tl.int64) * K + cols[None, :], (ps < P)[:, None] & ok[None, :]


@triton.jit
def _combine_kernel(part_a_ptr, part_b_ptr, v_ptr, log_b_ptr, P, K, shift,
                    KERNEL_FORM: tl.constexpr, FIRST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    # Sums the P partial rows of every column, BLOCK_P rows per step (a tile, summed along
    # its rows): at SwAV's B = 16384 the row pass leaves P = 1024 partials, and one partial per
    # step made each program's loop a chain of 1024 dependent loads.
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = cols < K
    log_b = tl.load(log_b_ptr + cols, mask=ok, other=0.0)
    total = tl.zeros((BLOCK_K,), dtype=tl.float32)
    steps = tl.arange(0, BLOCK_P)
    if FIRST and not KERNEL_FORM:
        # Merge the (max, sum) pairs of the column log-sum-exp.
        mx = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            at, tile_ok = _partial_tile(p0, steps, P, cols, ok, K)
            mx = tl.maximum(mx, tl.max(tl.load(part_b_ptr + at, mask=tile_ok, other=float("-inf")), axis=0))
        mx = tl.where(ok, mx, 0.0)  # padding columns (never stored): finite, as every real column's
        for p0 in range(0, P, BLOCK_P):
            at, tile_ok = _partial_tile(p0, steps, P, cols, ok, K)
            m_p = tl.load(part_b_ptr + at, mask=tile_ok, other=float("-inf"))
            s_p = tl.load(part_a_ptr + at, mask=tile_ok, other=0.0)
            # (an all -inf column part, and the padding, add s_p * exp(-inf) = 0)
            total += tl.sum(s_p * tl.exp(m_p - mx[None, :]), axis=0)
    else:
        for p0 in range(0, P, BLOCK_P):
            at, tile_ok = _partial_tile(p0, steps, P, cols, ok, K)
            total += tl.sum(tl.load(part_a_ptr + at, mask=tile_ok, other=0.0), axis=0)
    zero_mass = log_b == float("-inf")
    total = tl.where(ok, total, 1.0)  # padding columns: no log(0) or 1/0
    if KERNEL_FORM:
        # w_j = b_j / sum_i E_ij at first; then w_j b_j / mass_j (mass already includes w_j).
        if FIRST:
            w = tl.exp(log_b) / total
        else:
            w = tl.load(v_ptr + cols, mask=ok, other=0.0) * (tl.exp(log_b) / total)
        tl.store(v_ptr + cols, tl.where(zero_mass, 0.0, w), mask=ok)
    else:
        if FIRST:
            g = log_b - (mx + tl.log(total))
        else:
            g = tl.load(v_ptr + cols, mask=ok, other=0.0) + log_b - tl.log(total)
        tl.store(v_ptr + cols, tl.where(zero_mass, float("-inf"), g), mask=ok)


# ----- host side -------------------------------------------------------------------------------

def launch_config(dtype: torch.dtype, k: int, interpret: bool = _INTERPRET) -> dict:
    """Block sizes, warps and stages for one solve, from the input dtype and the number of
    columns: shared by the launcher and ``compile_configs`` so the two cannot drift apart.
    The interpreter gets small blocks (it runs numpy per block; tiny shapes are the norm)."""
    if interpret:
        return {"BLOCK_M": 32, "BLOCK_K": 512, "COMBINE_K": 1024, "COMBINE_P": 2, "COLUMN_M": 64, "num_warps": 1,
                "num_stages": 1}
    wide = 128 if dtype == torch.float32 else 256  # 512-byte row segments either way
    # The combine: 128 columns a program (24 programs at K = 3000, 125 at 16000), 32 partial
    # rows a step (a 16 KB tile, 32 floats a thread at 4 warps).
    return {"BLOCK_M": 8 if k >= 4096 else 16, "BLOCK_K": min(wide, max(16, triton.next_power_of_2(k))),
            "COMBINE_K": 128, "COMBINE_P": 32, "COLUMN_M": 32, "num_warps": 4, "num_stages": 2}


def _parts(b: int, block_m: int) -> int:
    return triton.cdiv(b, block_m)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def sinkhorn(x: torch.Tensor, alpha: float, n_iters: int, log_a: torch.Tensor, log_b: torch.Tensor,
             log_out_scale: float = 0.0, out: torch.Tensor | None = None, *, kernel_form: bool | None = None):
    """Sinkhorn-Knopp on a (B, K) matrix x (float32/float16/bfloat16, unit column stride).

    Kernel exp(alpha * x); rows carry mass exp(log_a) (B float32), columns exp(log_b)
    (K float32; -inf for a zero-mass column). Runs ``n_iters`` (column step, row step) pairs
    (SwAV's order) and writes the plan times exp(log_out_scale) into ``out`` (B, K, any of
    the three dtypes; a fresh tensor of x's dtype when None). ``kernel_form`` forces a form
    (tests); by default the spread of alpha * x decides (one device-to-host read).

    Returns (out, form, row, col): form "kernel" or "log"; row (B,) the last row scales
    (a_i / r_i) or potentials f_i, col (K,) the scaling vector w or the potential g, in the
    form's convention. ``out`` may be ``x`` itself (each program reads its rows before it
    writes them); then None when the kernel form ran and declined (a scaling left the float
    range), x having been overwritten. Raises ValueError when x holds NaN or Inf, and
    NeedsFloat64 when float32 cannot resolve alpha * x.
    """
    b, k = x.shape
    if out is None:
        out = torch.empty((b, k), dtype=x.dtype, device=x.device)
    if _INTERPRET and torch.bfloat16 in (x.dtype, out.dtype):
        # Triton's CPU interpreter (numpy) has no bfloat16 and reads it as garbage; the
        # native bfloat16 path is exercised by the GPU tests.
        q, form, row, col = sinkhorn(x.float(), alpha, n_iters, log_a, log_b, log_out_scale, None,
                                     kernel_form=kernel_form)
        out.copy_(q)
        return out, form, row, col
    if x.stride(1) != 1:
        x = x.contiguous()
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or not math.isfinite(alpha * lo) or not math.isfinite(alpha * hi):
        raise ValueError("scores: contains NaN or Inf (or overflows once divided by epsilon)")
    if max(abs(alpha * lo), abs(alpha * hi)) > _FLOAT32_MAX_EXPONENT:
        raise NeedsFloat64()
    spread = abs(alpha) * (hi - lo)
    if kernel_form is None:
        kernel_form = spread <= KERNEL_FORM_SPREAD
    if kernel_form:
        result = _solve(x, alpha, n_iters, log_a, log_b, log_out_scale, out, True, max(alpha * hi, alpha * lo))
        if result is not None:
            return result
        if x.data_ptr() == out.data_ptr():
            return None  # in place: x now holds a plan, the log domain cannot run on it
    return _solve(x, alpha, n_iters, log_a, log_b, log_out_scale, out, False, 0.0)


def _solve(x, alpha, n_iters, log_a, log_b, log_out_scale, out, kernel_form, shift):
    b, k = x.shape
    cfg = launch_config(x.dtype, k)
    bm, bk, cm, ck, cp = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["COLUMN_M"], cfg["COMBINE_K"], cfg["COMBINE_P"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    dev = x.device
    # The first pass splits rows into about as many groups as the row passes have programs,
    # capped so that the partials stay small.
    col_parts = max(1, min(_parts(b, bm), 256, triton.cdiv(b, cm)))
    rows_per = triton.cdiv(b, col_parts)
    col_parts = triton.cdiv(b, rows_per)
    row_parts = _parts(b, bm)
    part_a = torch.empty((max(col_parts, row_parts), k), dtype=torch.float32, device=dev)
    part_b = torch.empty((col_parts, k), dtype=torch.float32, device=dev) if not kernel_form else part_a
    v = torch.empty(k, dtype=torch.float32, device=dev)
    row = torch.empty(b, dtype=torch.float32, device=dev)
    log_a = log_a.to(device=dev, dtype=torch.float32).contiguous()
    log_b = log_b.to(device=dev, dtype=torch.float32).contiguous()
    with _on_device(x):
        _column_kernel[(col_parts, triton.cdiv(k, bk))](
            x, part_a, part_b, b, k, x.stride(0), alpha, shift, rows_per,
            KERNEL_FORM=kernel_form, BLOCK_M=cm, BLOCK_K=bk, **launch)
        _combine_kernel[(triton.cdiv(k, ck),)](
            part_a, part_b, v, log_b, col_parts, k, shift, KERNEL_FORM=kernel_form, FIRST=True, BLOCK_K=ck,
            BLOCK_P=cp, **launch)
        for _ in range(n_iters - 1):
            _row_kernel[(row_parts,)](
                x, out, v, log_a, row, part_a, b, k, x.stride(0), out.stride(0), alpha, shift, log_out_scale,
                KERNEL_FORM=kernel_form, WRITE=False, BLOCK_M=bm, BLOCK_K=bk, **launch)
            _combine_kernel[(triton.cdiv(k, ck),)](
                part_a, part_b, v, log_b, row_parts, k, shift, KERNEL_FORM=kernel_form, FIRST=False, BLOCK_K=ck,
                BLOCK_P=cp, **launch)
        _row_kernel[(row_parts,)](
            x, out, v, log_a, row, part_a, b, k, x.stride(0), out.stride(0), alpha, shift, log_out_scale,
            KERNEL_FORM=kernel_form, WRITE=True, BLOCK_M=bm, BLOCK_K=bk, **launch)
    if kernel_form:
        # Every exp(alpha x - c) is positive, so an overflow or underflow anywhere in the
        # iteration ends in a zero, infinite or NaN row scale or column factor: redo in logs.
        finite_pos = torch.stack([row.amin(), v.amin(), -row.amax(), -v.amax()])
        lo_s, lo_v, neg_hi_s, neg_hi_v = finite_pos.tolist()
        zero_cols = bool(torch.isinf(log_b).any())
        if not (lo_s > 0 and (lo_v > 0 or zero_cols) and -neg_hi_s < math.inf and -neg_hi_v < math.inf):
            return None
    return out, "kernel" if kernel_form else "log", row, v


def compile_configs():
    """Every configuration the launcher can choose on a GPU (interpreter-only ones excluded),
    for the native compile check. Yields one dict per kernel instance (keys as in
    kernels/contrastive.py's compile_configs, "divisible" included)."""
    # The launcher's choice depends on (dtype, K) only through the block sizes, which change
    # only at powers of two (and at K = 4096): K = 2^i - 1, 2^i, 2^i + 1 meet every choice.
    ks = sorted({max(1, 2 ** i + d) for i in range(18) for d in (-1, 0, 1)})
    configs = {}
    for dtype, ty in _DTYPES.items():
        for k in ks:
            cfg = launch_config(dtype, k, interpret=False)
            launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
            for kf in (True, False):
                form = "kernel" if kf else "log"
                configs.setdefault(f"_column_kernel[{ty},{form},M={cfg['COLUMN_M']},K={bk}]", {
                    "fn": _column_kernel,
                    "signature": {"x_ptr": f"*{ty}", "part_a_ptr": "*fp32", "part_b_ptr": "*fp32", "B": "i32",
                                  "K": "i32", "stride_x": "i32", "alpha": "fp32", "shift": "fp32",
                                  "rows_per_prog": "i32"},
                    "constexprs": {"KERNEL_FORM": kf, "BLOCK_M": cfg["COLUMN_M"], "BLOCK_K": bk}, **launch})
                for write in (False, True):
                    for oty in (tuple(_DTYPES.values()) if write else (ty,)):  # the plan in any of the three
                        configs.setdefault(f"_row_kernel[{ty}->{oty},{form},write={write},M={bm},K={bk}]", {
                            "fn": _row_kernel,
                            "signature": {"x_ptr": f"*{ty}", "out_ptr": f"*{oty}", "v_ptr": "*fp32",
                                          "log_a_ptr": "*fp32", "row_ptr": "*fp32", "part_ptr": "*fp32",
                                          "B": "i32", "K": "i32", "stride_x": "i32", "stride_out": "i32",
                                          "alpha": "fp32", "shift": "fp32", "log_out_scale": "fp32"},
                            "constexprs": {"KERNEL_FORM": kf, "WRITE": write, "BLOCK_M": bm, "BLOCK_K": bk},
                            **launch})
                    for first in (True, False):
                        configs.setdefault(f"_combine_kernel[{form},first={first},K={cfg['COMBINE_K']},"
                                           f"P={cfg['COMBINE_P']}]", {
                            "fn": _combine_kernel,
                            "signature": {"part_a_ptr": "*fp32", "part_b_ptr": "*fp32", "v_ptr": "*fp32",
                                          "log_b_ptr": "*fp32", "P": "i32", "K": "i32", "shift": "fp32"},
                            "constexprs": {"KERNEL_FORM": kf, "FIRST": first, "BLOCK_K": cfg["COMBINE_K"],
                                           "BLOCK_P": cfg["COMBINE_P"]},
                            **launch})
    # Each twice: as launched at a K that is not a multiple of 16 (SwAV's 3000), and at one that
    # is (SEER's 16000, 4096), where Triton marks K and the row strides divisible by 16 and
    # compiles another kernel (vectorised loads).
    for name, config in configs.items():
        yield {"name": name, **config}
        ints = [a for a in ("K", "stride_x", "stride_out") if a in config["signature"]]
        yield {"name": name[:-1] + ",K%16=0]", **config, "divisible": ints}
