"""The tile passes of the contrastive losses in plain torch, on row chunks of the logits:
the ``chunked`` backend of :func:`pym4.clip_loss` and :func:`pym4.siglip_loss` (any device).
"""
from __future__ import annotations

import math

import torch


class ChunkedEngine:
    """The tile passes in plain torch, on row chunks of the logits (any device).

    Every method takes A (n_a x D) as the rows and Bm (n_b x D) as the columns of
    ``S = s * A @ Bm.T + b``; the diagonal of the loss sits at ``(i, offset + i)``. All
    results are float32 (float64 for float64 input); a chunk of the logits holds about
    ``chunk_elements`` entries (at least 16 rows), never n_a x n_b.
    """

    def __init__(self, chunk_elements: int):
        self.chunk_elements = chunk_elements

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.detach().to(dtype).contiguous()

    def _chunk(self, n_b: int) -> int:
        return max(16, self.chunk_elements // max(n_b, 1))

    @staticmethod
    def _logits(a: torch.Tensor, bm: torch.Tensor, s: float, b: float) -> torch.Tensor:
        out = (a * s) @ bm.T
        if b != 0.0:
            out.add_(b)
        return out

    def clip_forward(self, a, bm, s, b):
        """Row log-sum-exps r (n_a) and the columns' running (max, sum of exp) over these rows."""
        n_a, n_b = a.shape[0], bm.shape[0]
        r = torch.empty(n_a, dtype=a.dtype, device=a.device)
        col_lse = torch.full((n_b,), -math.inf, dtype=a.dtype, device=a.device)
        ch = self._chunk(n_b)
        for i0 in range(0, n_a, ch):
            logits = self._logits(a[i0:i0 + ch], bm, s, b)
            r[i0:i0 + ch] = torch.logsumexp(logits, 1)
            # Online log-sum-exp down the columns, one row chunk at a time.
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, 0))
        # As (max, sum of exp) with the sum 1: the form the ranks' partial columns merge in.
        return r, col_lse, torch.ones_like(col_lse)

    def clip_backward(self, a, bm, s, b, r, c, w_row, w_col, offset, split_scale):
        """dA, the partial dBm over these rows, and the scale gradient.

        ``G_ij = w_row_i (e^{S_ij - r_i} - d_ij) + w_col_j (e^{S_ij - c_j} - d_ij)``. With
        ``split_scale`` the scale gradient comes as (per-row row-term part (n_a), per-column
        column-term part (n_b)); otherwise as one number.
        """
        n_a, n_b = a.shape[0], bm.shape[0]
        da = torch.empty_like(a)
        db_part = torch.zeros_like(bm)
        ds_row = torch.zeros(n_a, dtype=a.dtype, device=a.device) if split_scale else None
        ds_col = torch.zeros(n_b, dtype=a.dtype, device=a.device) if split_scale else None
        ch = self._chunk(n_b)
        # One process: every row and column term has the same weight w, so G = w (P_row +
        # P_col - 2 I) and w is applied once, to dA and dB. Folding w into the exponent
        # instead (e^{S - (c - log w)}) rounds c - log w at the size of S: at s = 1000 that
        # is 1e-4 of G, where G itself may be exactly 0 (B = 1).
        w = float(w_row[0]) if n_a else 0.0
        uniform = not split_scale and bool((w_row == w).all()) and bool((w_col == w).all())
        for i0 in range(0, n_a, ch):
            ac = a[i0:i0 + ch]
            m = ac.shape[0]
            # The logits exactly as the forward pass rounded them: e^{S - c} must see the
            # same S as c did, or p - 1 on the diagonal loses its small value at large s.
            logits = self._logits(ac, bm, s, b)
            rows = torch.arange(m, device=a.device)
            cols = rows + (offset + i0)
            wr, wc = w_row[i0:i0 + m], w_col
            # e^{S_ij - r_i} is the row softmax (the rows are complete: all columns are here).
            p_row = torch.softmax(logits, 1)
            if split_scale:
                # sum_j G_ij (S_ij - b) / s, kept apart for the row and the column terms.
                p_col = torch.sub(logits, c[None, :]).exp_()
                diag = logits[rows, cols] - b
                ds_row[i0:i0 + m] = wr * (torch.linalg.vecdot(p_row, logits, dim=1) - b * p_row.sum(1) - diag) / s
                ds_col.add_(wc * (torch.linalg.vecdot(p_col, logits, dim=0) - b * p_col.sum(0)) / s)
                ds_col.index_add_(0, cols, -wc[cols] * diag / s)
                del logits
                p_col.mul_(wc[None, :])
            elif uniform:
                g = p_row.add_(logits.sub_(c[None, :]).exp_())  # P_row + P_col, in the logits' storage
                g[rows, cols] -= 2.0
                torch.mm(g, bm, out=da[i0:i0 + m]).mul_(s * w)
                db_part.addmm_(g.T, ac, alpha=s * w)
                continue
            else:
                p_col = logits.sub_(c[None, :]).exp_().mul_(wc[None, :])
            g = p_row.mul_(wr[:, None]).add_(p_col)
            g[rows, cols] -= wr + wc[cols]
            torch.mm(g, bm, out=da[i0:i0 + m]).mul_(s)
            db_part.addmm_(g.T, ac, alpha=s)
        ds = (ds_row, ds_col) if split_scale else float((a * da).sum()) / s
        return da, db_part, ds

    def siglip_forward(self, a, bm, s, b, offset):
        """Per-row sum_j softplus(S_ij) - S_{i, offset+i} (n_a)."""
        n_a, n_b = a.shape[0], bm.shape[0]
        out = torch.empty(n_a, dtype=a.dtype, device=a.device)
        ch = self._chunk(n_b)
        for i0 in range(0, n_a, ch):
            logits = self._logits(a[i0:i0 + ch], bm, s, b)
            m = logits.shape[0]
            rows = torch.arange(m, device=a.device)
            diag = logits[rows, rows + offset + i0]
            # softplus(x) = max(x, 0) + log1p(e^-|x|), exactly: torch.nn.functional.softplus returns x itself
            # beyond x = 20, an error of e^-20 = 2e-9 per logit (visible in float64).
            softplus = logits.clamp(min=0.0).add_(torch.log1p(torch.exp(-logits.abs())))
            out[i0:i0 + m] = softplus.sum(1) - diag
        return out

    def siglip_backward(self, a, bm, s, b, w_row, offset):
        """dA, the partial dBm, ds and db for ``G_ij = w_row_i (sigmoid(S_ij) - d_ij)``.

        Each G row belongs to its row's owner, so ``ds = <A, dA> / s`` holds per rank too.
        """
        n_b = bm.shape[0]
        da = torch.empty_like(a)
        db_part = torch.zeros_like(bm)
        db = torch.zeros((), dtype=a.dtype, device=a.device)
        ch = self._chunk(n_b)
        for i0 in range(0, a.shape[0], ch):
            ac = a[i0:i0 + ch]
            m = ac.shape[0]
            logits = self._logits(ac, bm, s, b)
            rows = torch.arange(m, device=a.device)
            cols = rows + offset + i0
            diag = logits[rows, cols]
            g = logits.sigmoid_()
            # sigmoid(S) - 1 = -sigmoid(-S), without the cancellation when S >> 0.
            g[rows, cols] = -torch.sigmoid(-diag)
            g.mul_(w_row[i0:i0 + m, None])
            db += g.sum()
            torch.mm(g, bm, out=da[i0:i0 + m]).mul_(s)
            db_part.addmm_(g.T, ac, alpha=s)
        ds = float((a * da).sum()) / s
        return da, db_part, ds, float(db)
