"""Fused RSSM kernels: the recurrent cells and the whole prior / posterior step, forward and backward.

Design: each program owns a block of ``BLOCK_M`` batch rows and runs every layer of the step for those rows, one
*phase* after another, inside ONE launch. Rows never interact, so no grid synchronisation is needed; a phase's
outputs go to small per-row buffers (they stay in L1/L2) that the next phase reads back after a block barrier. The
phases, all ``@triton.jit`` helpers below:

* ``_linear``: out = [a1, a2] @ W.T (+ b) over column chunks, accumulating in fp32 (fp64 for fp64) with ``tl.dot``;
  W is read through (stride_wn, stride_wk), so the same helper computes the backward's ``d_in = d_out @ W``.
* ``_norm_act_fwd`` / ``_norm_act_bwd``: [LayerNorm ->] ELU / SiLU of a layer's pre-activation, and its gradient.
* ``_gru_fwd`` / ``_gru_bwd``: torch.nn.GRUCell with its gate math in the epilogue of the six gate products.
* ``_lngru_fwd`` / ``_lngru_bwd``: the Dreamer LayerNorm GRU.
* ``_gauss_fwd`` / ``_gauss_bwd``: std transform, reparameterized sample (given noise or in-kernel Philox) and KL.

Forward saves each layer's pre-activation (or LayerNorm'd value and 1/std), its activation and the GRU gates; the
backward kernel walks the phases in reverse and writes each layer's pre-activation gradient, from which the launcher
side (``fastwm.step_ops``) forms the weight gradients as a few matrix products over the batch (deterministic: no
atomics). Buffers are row-major with the widths named in each pointer comment; dtype "C" is the compute dtype
(float64 for float64 inputs, float32 otherwise), "X" the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gaussian import (
    _compute_dtype,
    _kl_term,
    _kl_term_grad,
    _philox_normal_tile,
    _std_from_raw,
    _std_from_raw_grad,
    empty,
)

__all__ = ["CELL_IDS", "ACT_IDS", "step_fwd", "step_bwd", "gru_cell_fwd", "gru_cell_bwd", "lngru_cell_fwd",
           "lngru_cell_bwd", "BLOCK_M"]

CELL_IDS = {"gru": 0, "layernorm_gru": 1, "none": 2}
ACT_IDS = {"elu": 0, "silu": 1, "relu": 2, "tanh": 3, "identity": 4}
BLOCK_M = 16  # rows per program: tl.dot needs every block dim >= 16


# --------------------------------------------------------------------------------------------------------------------
# Elementwise helpers
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # sign(x) * (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no overflow, no libdevice.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _act(v, ACT: tl.constexpr):
    # ACT_IDS: 0 ELU (alpha 1), 1 SiLU, 2 ReLU, 3 tanh, 4 identity
    if ACT == 0:
        y = tl.where(v > 0, v, tl.exp(tl.minimum(v, 0.0)) - 1.0)
    elif ACT == 1:
        y = v * tl.sigmoid(v)
    elif ACT == 2:
        y = tl.where(v > 0, v, 0.0)
    elif ACT == 3:
        y = _tanh(v)
    else:
        y = v
    return y


@triton.jit
def _act_grad(v, ACT: tl.constexpr):
    if ACT == 0:
        d = tl.where(v > 0, 1.0, tl.exp(tl.minimum(v, 0.0)))
    elif ACT == 1:
        s = tl.sigmoid(v)
        d = s * (1.0 + v * (1.0 - s))
    elif ACT == 2:
        d = tl.where(v > 0, 1.0, 0.0)
    elif ACT == 3:
        t = _tanh(v)
        d = 1.0 - t * t
    else:
        d = tl.full(v.shape, 1.0, v.dtype)
    return d


# --------------------------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_acc(acc, a_ptr, lda, K, w_ptr, stride_wn, stride_wk, rows, rmask, cols, cmask,
             PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    # acc += A[rows, :K] @ Wt[:K, cols] where Wt[k, n] = w_ptr[n * stride_wn + k * stride_wk].
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + rows[:, None] * lda + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PREC, out_dtype=acc.dtype)
    return acc


@triton.jit
def _linear(out_ptr, ldo, a1_ptr, lda1, K1, a2_ptr, lda2, K2, w_ptr, stride_wn, stride_wk, N, b_ptr, rows, rmask,
            HAS_A2: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, COMPUTE: tl.constexpr,
            PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            nb0=0, nb_step=1):
    # out[rows, :N] (+)= [a1 | a2] @ W.T (+ b); W's columns 0..K1 meet a1 and K1..K1+K2 meet a2. Column blocks
    # nb0, nb0 + nb_step, ... of BLOCK_N only (all by default; a feature-split program passes its share).
    for nb in range(nb0, tl.cdiv(N, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
        acc = _dot_acc(acc, a1_ptr, lda1, K1, w_ptr, stride_wn, stride_wk, rows, rmask, cols, cmask, PREC, BLOCK_K)
        if HAS_A2:
            acc = _dot_acc(acc, a2_ptr, lda2, K2, w_ptr + K1 * stride_wk, stride_wn, stride_wk, rows, rmask, cols,
                           cmask, PREC, BLOCK_K)
        if HAS_B:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        offs = rows[:, None] * ldo + cols[None, :]
        omask = rmask[:, None] & cmask[None, :]
        if ACC:
            acc += tl.load(out_ptr + offs, mask=omask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _copy_rows(dst_ptr, src_ptr, N, rows, rmask, HAS_SRC: tl.constexpr, COMPUTE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dst[rows, :N] = src (or 0); both row-major with row length N.
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & (cols < N)[None, :]
        v = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
        if HAS_SRC:
            v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(dst_ptr + offs, v.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats(pre_ptr, N, rows, rmask, EPS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # LayerNorm statistics of pre[rows, :N] (two passes: mean, then the centred variance).
    s1 = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < N)[None, :]
        s1 += tl.sum(tl.load(pre_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0), axis=1)
    mean = s1 / N
    s2 = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < N)[None, :]
        v = tl.load(pre_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
        d = tl.where(mask, v - mean[:, None], 0.0)
        s2 += tl.sum(d * d, axis=1)
    var = s2 / N
    rstd = 1.0 / tl.sqrt(var + EPS)
    return mean, rstd


@triton.jit
def _norm_act_fwd(pre_ptr, y_ptr, N, nw_ptr, nb_ptr, rstd_ptr, rows, rmask, ACT: tl.constexpr, NORM: tl.constexpr,
                  EPS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # y = act(pre), or act(LayerNorm(pre)); with NORM, pre is overwritten by the normalised xhat (what the backward
    # needs) and rstd[rows] = 1 / sqrt(var + eps). pre (C), y (C), rows of length N.
    mean = tl.zeros([BLOCK_M], dtype=COMPUTE)
    rstd = mean
    if NORM:
        mean, rstd = _row_stats(pre_ptr, N, rows, rmask, EPS, COMPUTE, BLOCK_M, BLOCK_N)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
    _norm_act_apply(pre_ptr, y_ptr, N, nw_ptr, nb_ptr, mean, rstd, rows, rmask, ACT, NORM, COMPUTE, BLOCK_N)


@triton.jit
def _norm_act_apply(pre_ptr, y_ptr, N, nw_ptr, nb_ptr, mean, rstd, rows, rmask, ACT: tl.constexpr,
                    NORM: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # _norm_act_fwd given the row statistics (mean, rstd; unused without NORM), over column blocks nb0, nb0 +
    # nb_step, ... of BLOCK_N.
    for nb in range(nb0, tl.cdiv(N, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        v = tl.load(pre_ptr + offs, mask=mask, other=0.0)
        if NORM:
            xhat = (v - mean[:, None]) * rstd[:, None]
            tl.store(pre_ptr + offs, xhat, mask=mask)
            g = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
            b = tl.load(nb_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
            v = xhat * g[None, :] + b[None, :]
        tl.store(y_ptr + offs, _act(v, ACT), mask=mask)


@triton.jit
def _norm_act_bwd(dy_ptr, pre_ptr, N, nw_ptr, nb_ptr, rstd_ptr, dpre_ptr, dv_ptr, rows, rmask, ACT: tl.constexpr,
                  NORM: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dpre = d loss / d pre from dy = d loss / d y. With NORM, pre holds xhat, and dv (the gradient at the
    # LayerNorm's output, from which the weight and bias gradients are summed) is written too.
    m1 = tl.zeros([BLOCK_M], dtype=COMPUTE)
    m2 = m1
    if NORM:
        m1, m2 = _norm_bwd_sums(dy_ptr, pre_ptr, N, nw_ptr, nb_ptr, dv_ptr, rows, rmask, ACT, COMPUTE, BLOCK_M,
                                BLOCK_N)
        m1 = m1 / N
        m2 = m2 / N
        tl.debug_barrier()  # dv, written above, is read back below
    _norm_bwd_apply(dy_ptr, pre_ptr, N, nw_ptr, rstd_ptr, dpre_ptr, dv_ptr, m1, m2, rows, rmask, ACT, NORM, COMPUTE,
                    BLOCK_N)


@triton.jit
def _norm_bwd_sums(dy_ptr, pre_ptr, N, nw_ptr, nb_ptr, dv_ptr, rows, rmask, ACT: tl.constexpr, COMPUTE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # The LayerNorm backward's first pass over column blocks nb0, nb0 + nb_step, ...: dv = dy * act'(LN output)
    # written, and the row sums of dv * g and dv * g * xhat returned (tiles summed across the loop, reduced once).
    a1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    a2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for nb in range(nb0, tl.cdiv(N, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        xhat = tl.load(pre_ptr + offs, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        g = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        b = tl.load(nb_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        dv = dy * _act_grad(xhat * g[None, :] + b[None, :], ACT)
        tl.store(dv_ptr + offs, dv, mask=mask)
        dxh = dv * g[None, :]
        a1 += dxh
        a2 += dxh * xhat
    return tl.sum(a1, axis=1), tl.sum(a2, axis=1)


@triton.jit
def _norm_bwd_apply(dy_ptr, pre_ptr, N, nw_ptr, rstd_ptr, dpre_ptr, dv_ptr, m1, m2, rows, rmask, ACT: tl.constexpr,
                    NORM: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # The second pass over column blocks nb0, nb0 + nb_step, ...: with NORM, dpre from dv and the row means m1, m2
    # of _norm_bwd_sums; without, dpre = dy * act'(pre).
    if NORM:
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    for nb in range(nb0, tl.cdiv(N, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        v = tl.load(pre_ptr + offs, mask=mask, other=0.0)
        if NORM:
            dv = tl.load(dv_ptr + offs, mask=mask, other=0.0)
            g = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
            dpre = rstd[:, None] * (dv * g[None, :] - m1[:, None] - v * m2[:, None])
        else:
            dpre = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE) * _act_grad(v, ACT)
        tl.store(dpre_ptr + offs, dpre, mask=mask)


@triton.jit
def _gru_fwd(x_ptr, ldx, X, h_ptr, D, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, hout_ptr, save_ptr, rows, rmask,
             HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SAVE: tl.constexpr,
             nb0=0, nb_step=1):
    # torch.nn.GRUCell on x [rows, X] (row stride ldx) and h (X dtype, [B, D]); weight_ih [3D, X], weight_hh [3D, D].
    # Gate math in the epilogue of the six products. Saves [r, z, n, W_hn h + b_hn] per row (C, [B, 4D]). Feature
    # blocks nb0, nb0 + nb_step, ... of BLOCK_N only (all by default).
    for nb in range(nb0, tl.cdiv(D, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
        i_r = _dot_acc(zero, x_ptr, ldx, X, wih_ptr, X, 1, rows, rmask, cols, cmask, PREC, BLOCK_K)
        i_z = _dot_acc(zero, x_ptr, ldx, X, wih_ptr + D * X, X, 1, rows, rmask, cols, cmask, PREC, BLOCK_K)
        i_n = _dot_acc(zero, x_ptr, ldx, X, wih_ptr + 2 * D * X, X, 1, rows, rmask, cols, cmask, PREC, BLOCK_K)
        h_r = _dot_acc(zero, h_ptr, D, D, whh_ptr, D, 1, rows, rmask, cols, cmask, PREC, BLOCK_K)
        h_z = _dot_acc(zero, h_ptr, D, D, whh_ptr + D * D, D, 1, rows, rmask, cols, cmask, PREC, BLOCK_K)
        h_n = _dot_acc(zero, h_ptr, D, D, whh_ptr + 2 * D * D, D, 1, rows, rmask, cols, cmask, PREC, BLOCK_K)
        if HAS_BIH:
            i_r += tl.load(bih_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
            i_z += tl.load(bih_ptr + D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
            i_n += tl.load(bih_ptr + 2 * D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        if HAS_BHH:
            h_r += tl.load(bhh_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
            h_z += tl.load(bhh_ptr + D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
            h_n += tl.load(bhh_ptr + 2 * D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        r = tl.sigmoid(i_r + h_r)
        z = tl.sigmoid(i_z + h_z)
        n = _tanh(i_n + r * h_n)
        offs = rows[:, None] * D + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(hout_ptr + offs, ((1.0 - z) * n + z * h).to(hout_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            soffs = rows[:, None] * (4 * D) + cols[None, :]
            tl.store(save_ptr + soffs, r, mask=mask)
            tl.store(save_ptr + soffs + D, z, mask=mask)
            tl.store(save_ptr + soffs + 2 * D, n, mask=mask)
            tl.store(save_ptr + soffs + 3 * D, h_n, mask=mask)


@triton.jit
def _gru_bwd(g_ptr, h_ptr, save_ptr, dgi_ptr, dgh_ptr, dh_ptr, D, rows, rmask, COMPUTE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # From g = d loss / d h' ([B, D]): the gate pre-activation gradients d gi ([B, 3D], C) and d gh ([B, 3D], C),
    # and the direct part of d h (g * z, [B, D]); the caller adds d gh @ W_hh to d h and forms d x = d gi @ W_ih.
    # Feature blocks nb0, nb0 + nb_step, ... of BLOCK_N (all by default).
    for nb in range(nb0, tl.cdiv(D, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        soffs = rows[:, None] * (4 * D) + cols[None, :]
        r = tl.load(save_ptr + soffs, mask=mask, other=0.0)
        z = tl.load(save_ptr + soffs + D, mask=mask, other=0.0)
        n = tl.load(save_ptr + soffs + 2 * D, mask=mask, other=0.0)
        hn = tl.load(save_ptr + soffs + 3 * D, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        dn = g * (1.0 - z) * (1.0 - n * n)
        dz = g * (h - n) * z * (1.0 - z)
        dr = dn * hn * r * (1.0 - r)
        goffs = rows[:, None] * (3 * D) + cols[None, :]
        tl.store(dgi_ptr + goffs, dr, mask=mask)
        tl.store(dgi_ptr + goffs + D, dz, mask=mask)
        tl.store(dgi_ptr + goffs + 2 * D, dn, mask=mask)
        tl.store(dgh_ptr + goffs, dr, mask=mask)
        tl.store(dgh_ptr + goffs + D, dz, mask=mask)
        tl.store(dgh_ptr + goffs + 2 * D, dn * r, mask=mask)
        tl.store(dh_ptr + offs, (g * z).to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lngru_fwd(x_ptr, ldx, X, h_ptr, D, w_ptr, nw_ptr, nb_ptr, parts_ptr, rstd_ptr, hout_ptr, rows, rmask,
               EPS: tl.constexpr, UPDATE_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The Dreamer LayerNorm GRU: parts = [x, h] @ W.T ([B, 3D], C; left holding the normalised xhat), LayerNorm
    # over the 3D outputs (rstd [B], C), then the gates per column chunk of D.
    _linear(parts_ptr, 3 * D, x_ptr, ldx, X, h_ptr, D, D, w_ptr, X + D, 1, 3 * D, w_ptr, rows, rmask,
            True, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    mean, rstd = _row_stats(parts_ptr, 3 * D, rows, rmask, EPS, COMPUTE, BLOCK_M, BLOCK_N)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    # the gates overwrite parts in place, column chunk by chunk of D: other threads than the ones that read a
    # column for the statistics may write it (write-after-read)
    tl.debug_barrier()
    _lngru_gates(h_ptr, D, nw_ptr, nb_ptr, parts_ptr, mean, rstd, hout_ptr, rows, rmask, UPDATE_BIAS, COMPUTE,
                 BLOCK_N)


@triton.jit
def _lngru_gates(h_ptr, D, nw_ptr, nb_ptr, parts_ptr, mean, rstd, hout_ptr, rows, rmask, UPDATE_BIAS: tl.constexpr,
                 COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # The LayerNorm GRU's gates from parts [B, 3D] and its row statistics, for feature blocks nb0, nb0 + nb_step,
    # ... of BLOCK_N: parts is left holding the normalised xhat, h' is written.
    for nb in range(nb0, tl.cdiv(D, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        poffs = rows[:, None] * (3 * D) + cols[None, :]
        xr = (tl.load(parts_ptr + poffs, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
        xc = (tl.load(parts_ptr + poffs + D, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
        xu = (tl.load(parts_ptr + poffs + 2 * D, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
        tl.store(parts_ptr + poffs, xr, mask=mask)
        tl.store(parts_ptr + poffs + D, xc, mask=mask)
        tl.store(parts_ptr + poffs + 2 * D, xu, mask=mask)
        pr = xr * tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :] + \
            tl.load(nb_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        pc = xc * tl.load(nw_ptr + D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :] + \
            tl.load(nb_ptr + D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        pu = xu * tl.load(nw_ptr + 2 * D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :] + \
            tl.load(nb_ptr + 2 * D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        r = tl.sigmoid(pr)
        c = _tanh(r * pc)
        u = tl.sigmoid(pu + UPDATE_BIAS)
        offs = rows[:, None] * D + cols[None, :]
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(hout_ptr + offs, (u * c + (1.0 - u) * h).to(hout_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lngru_bwd(g_ptr, h_ptr, D, nw_ptr, nb_ptr, xhat_ptr, rstd_ptr, dpv_ptr, dparts_ptr, dh_ptr, rows, rmask,
               UPDATE_BIAS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # From g = d loss / d h': dpv = d loss / d (LayerNorm output) ([B, 3D], C; summed into the norm's weight and
    # bias gradients), dparts = d loss / d ([x, h] @ W.T) ([B, 3D], C) and the direct part of d h ((1 - u) g).
    m1, m2 = _lngru_bwd_gates(g_ptr, h_ptr, D, nw_ptr, nb_ptr, xhat_ptr, dpv_ptr, dh_ptr, rows, rmask, UPDATE_BIAS,
                              COMPUTE, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _lngru_bwd_parts(D, nw_ptr, xhat_ptr, rstd_ptr, dpv_ptr, dparts_ptr, m1 / (3 * D), m2 / (3 * D), rows, rmask,
                     COMPUTE, BLOCK_N)


@triton.jit
def _lngru_bwd_gates(g_ptr, h_ptr, D, nw_ptr, nb_ptr, xhat_ptr, dpv_ptr, dh_ptr, rows, rmask,
                     UPDATE_BIAS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     nb0=0, nb_step=1):
    # The gates' backward for feature blocks nb0, nb0 + nb_step, ...: dpv (3 chunks) and the direct part of d h
    # written; returns the row sums over those features of dpv * gamma and dpv * gamma * xhat (the LayerNorm's).
    a1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    a2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for nb in range(nb0, tl.cdiv(D, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        poffs = rows[:, None] * (3 * D) + cols[None, :]
        xr = tl.load(xhat_ptr + poffs, mask=mask, other=0.0)
        xc = tl.load(xhat_ptr + poffs + D, mask=mask, other=0.0)
        xu = tl.load(xhat_ptr + poffs + 2 * D, mask=mask, other=0.0)
        gr = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        gc = tl.load(nw_ptr + D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        gu = tl.load(nw_ptr + 2 * D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        pr = xr * gr + tl.load(nb_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        pc = xc * gc + tl.load(nb_ptr + D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        pu = xu * gu + tl.load(nb_ptr + 2 * D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        r = tl.sigmoid(pr)
        c = _tanh(r * pc)
        u = tl.sigmoid(pu + UPDATE_BIAS)
        offs = rows[:, None] * D + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        dpu = g * (c - h) * u * (1.0 - u)
        dc_pre = g * u * (1.0 - c * c)
        dpc = dc_pre * r
        dpr = dc_pre * pc * r * (1.0 - r)
        tl.store(dpv_ptr + poffs, dpr, mask=mask)
        tl.store(dpv_ptr + poffs + D, dpc, mask=mask)
        tl.store(dpv_ptr + poffs + 2 * D, dpu, mask=mask)
        tl.store(dh_ptr + offs, (g * (1.0 - u)).to(dh_ptr.dtype.element_ty), mask=mask)
        a1 += dpr * gr + dpc * gc + dpu * gu
        a2 += dpr * gr * xr + dpc * gc * xc + dpu * gu * xu
    return tl.sum(a1, axis=1), tl.sum(a2, axis=1)


@triton.jit
def _lngru_bwd_parts(D, nw_ptr, xhat_ptr, rstd_ptr, dpv_ptr, dparts_ptr, m1, m2, rows, rmask, COMPUTE: tl.constexpr,
                     BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # dparts from dpv and the row means m1, m2 of the gates' sums, for feature blocks nb0, nb0 + nb_step, ... of
    # each of the three chunks.
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    for nb in range(nb0, tl.cdiv(D, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        for c in tl.static_range(3):
            poffs = rows[:, None] * (3 * D) + c * D + cols[None, :]
            xhat = tl.load(xhat_ptr + poffs, mask=mask, other=0.0)
            dv = tl.load(dpv_ptr + poffs, mask=mask, other=0.0)
            gam = tl.load(nw_ptr + c * D + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
            tl.store(dparts_ptr + poffs, rstd[:, None] * (dv * gam - m1[:, None] - xhat * m2[:, None]), mask=mask)


@triton.jit
def _kl_operands(raw_ptr, praw_ptr, S, chunk, rows, rmask, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    # Chunk ``chunk`` of q's and p's (mean, std) from their raw [B, 2S] (C), with its offsets into raw and its mask.
    cols = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = rmask[:, None] & (cols < S)[None, :]
    roffs = rows[:, None] * (2 * S) + cols[None, :]
    mean = tl.load(raw_ptr + roffs, mask=mask, other=0.0)
    std = _std_from_raw(tl.load(raw_ptr + roffs + S, mask=mask, other=0.0), MIN_STD, STD_MODE)
    pm = tl.load(praw_ptr + roffs, mask=mask, other=0.0)
    ps = _std_from_raw(tl.load(praw_ptr + roffs + S, mask=mask, other=0.0), MIN_STD, STD_MODE)
    return mean, std, pm, ps, roffs, mask


@triton.jit
def _kl_bwd(raw_ptr, praw_ptr, S, gkl_ptr, draw_ptr, dpraw_ptr, rows, rmask, STD_MODE: tl.constexpr,
            MIN_STD: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    # The gradients of kl [B] = KL(q || p) with respect to q's (mean, std) into draw [B, 2S] and p's into dpraw
    # (before the std transform's chain rule: _gauss_bwd with ACC_IN adds them and applies it).
    gkl = tl.load(gkl_ptr + rows, mask=rmask, other=0.0).to(COMPUTE)
    for chunk in range(0, tl.cdiv(S, BLOCK_S)):
        mean, std, pm, ps, roffs, mask = _kl_operands(raw_ptr, praw_ptr, S, chunk, rows, rmask, STD_MODE, MIN_STD,
                                                      BLOCK_S)
        dm_q, ds_q, ds_p = _kl_term_grad(mean, std, pm, ps, gkl[:, None])
        tl.store(draw_ptr + roffs, dm_q, mask=mask)
        tl.store(draw_ptr + roffs + S, ds_q, mask=mask)
        tl.store(dpraw_ptr + roffs, -dm_q, mask=mask)
        tl.store(dpraw_ptr + roffs + S, ds_p, mask=mask)


@triton.jit
def _gauss_fwd(raw_ptr, S, noise_ptr, ldn, seed, z_ptr, ldz, m_ptr, s_ptr, ldo, praw_ptr, kl_ptr, rows, rmask,
               NOISE: tl.constexpr, HAS_KL: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
               COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, STORE_MS: tl.constexpr):
    # raw [B, 2S] (C, mean first) -> z = mean + std * noise ([B, S], row stride ldz) and, with STORE_MS, mean and std
    # ([B, S], row stride ldo); with HAS_KL also KL(this || prior) summed over S into kl [B] from the prior's raw
    # [B, 2S]. NOISE 1: read (row stride ldn), 2: Philox from the int64 ``seed``.
    S4 = (S + 3) // 4
    kl = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for chunk in range(0, tl.cdiv(S, BLOCK_S)):
        s0 = chunk * BLOCK_S
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (cols < S)[None, :]
        roffs = rows[:, None] * (2 * S) + cols[None, :]
        offs = rows[:, None] * ldo + cols[None, :]
        mean = tl.load(raw_ptr + roffs, mask=mask, other=0.0)
        std = _std_from_raw(tl.load(raw_ptr + roffs + S, mask=mask, other=0.0), MIN_STD, STD_MODE)
        if NOISE == 1:
            eps = tl.load(noise_ptr + rows[:, None] * ldn + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        else:
            eps = _philox_normal_tile(seed, rows, s0, S4, COMPUTE, BLOCK_M, BLOCK_S)
        if STORE_MS:
            tl.store(m_ptr + offs, mean.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(s_ptr + offs, std.to(s_ptr.dtype.element_ty), mask=mask)
        tl.store(z_ptr + rows[:, None] * ldz + cols[None, :], (mean + std * eps).to(z_ptr.dtype.element_ty), mask=mask)
        if HAS_KL:
            pm = tl.load(praw_ptr + roffs, mask=mask, other=0.0)
            ps = _std_from_raw(tl.load(praw_ptr + roffs + S, mask=mask, other=0.0), MIN_STD, STD_MODE)
            kl += tl.sum(tl.where(mask, _kl_term(mean, std, pm, ps), 0.0), axis=1)
    if HAS_KL:
        tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _kl_fwd(raw_ptr, praw_ptr, S, kl_ptr, rows, rmask, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
            COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    # kl [B] = KL(q || p) summed over S, from the raw [B, 2S] (C) of q (raw) and p (praw).
    kl = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for chunk in range(0, tl.cdiv(S, BLOCK_S)):
        mean, std, pm, ps, _, mask = _kl_operands(raw_ptr, praw_ptr, S, chunk, rows, rmask, STD_MODE, MIN_STD,
                                                  BLOCK_S)
        kl += tl.sum(tl.where(mask, _kl_term(mean, std, pm, ps), 0.0), axis=1)
    tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _gauss_bwd(raw_ptr, S, noise_ptr, seed, gz_ptr, gm_ptr, gs_ptr, draw_ptr, praw_ptr, gkl_ptr, dpraw_ptr,
               rows, rmask, NOISE: tl.constexpr, HAS_KL: tl.constexpr, ACC_IN: tl.constexpr,
               STD_MODE: tl.constexpr, MIN_STD: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_S: tl.constexpr):
    # d raw [B, 2S] (C) from the upstream grads of z, mean, std ([B, S], X). ACC_IN: draw already holds gradients
    # with respect to (mean, std) (the KL's, written by the posterior's call) to add before the std chain rule.
    # HAS_KL: also writes the KL's gradients with respect to the prior's (mean, std) into dpraw.
    S4 = (S + 3) // 4
    gkl = tl.zeros([BLOCK_M], dtype=COMPUTE)
    if HAS_KL:
        gkl = tl.load(gkl_ptr + rows, mask=rmask, other=0.0).to(COMPUTE)
    for chunk in range(0, tl.cdiv(S, BLOCK_S)):
        s0 = chunk * BLOCK_S
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (cols < S)[None, :]
        roffs = rows[:, None] * (2 * S) + cols[None, :]
        offs = rows[:, None] * S + cols[None, :]
        mean = tl.load(raw_ptr + roffs, mask=mask, other=0.0)
        raw = tl.load(raw_ptr + roffs + S, mask=mask, other=0.0)
        std = _std_from_raw(raw, MIN_STD, STD_MODE)
        if NOISE == 1:
            eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        else:
            eps = _philox_normal_tile(seed, rows, s0, S4, COMPUTE, BLOCK_M, BLOCK_S)
        gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        d_mean = gz + tl.load(gm_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        d_std = gz * eps + tl.load(gs_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        if ACC_IN:
            d_mean += tl.load(draw_ptr + roffs, mask=mask, other=0.0)
            d_std += tl.load(draw_ptr + roffs + S, mask=mask, other=0.0)
        if HAS_KL:
            pm = tl.load(praw_ptr + roffs, mask=mask, other=0.0)
            ps = _std_from_raw(tl.load(praw_ptr + roffs + S, mask=mask, other=0.0), MIN_STD, STD_MODE)
            dm_q, ds_q, ds_p = _kl_term_grad(mean, std, pm, ps, gkl[:, None])
            d_mean += dm_q
            d_std += ds_q
            tl.store(dpraw_ptr + roffs, -dm_q, mask=mask)
            tl.store(dpraw_ptr + roffs + S, ds_p, mask=mask)
        tl.store(draw_ptr + roffs, d_mean, mask=mask)
        tl.store(draw_ptr + roffs + S, d_std * _std_from_raw_grad(raw, MIN_STD, STD_MODE), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _head_width(D, HD, CELL: tl.constexpr):
    # The width of what the prior and posterior heads read: D (h'), or Hd (x itself) when there is no cell.
    if CELL == 2:
        DH = HD
    else:
        DH = D
    return DH


@triton.jit
def _head_input(hout, x_act, D, HD, CELL: tl.constexpr):
    # What the prior and posterior heads read, and its width: h' (deter), or x itself when there is no cell.
    if CELL == 2:
        hin = x_act
    else:
        hin = hout
    return hin, _head_width(D, HD, CELL)


@triton.jit
def _head_fwd(raw, hin, DH, e_ptr, E, w1, b1, nw1, nb1, w2, b2, pre, rstd, y, S, HD, rows, rmask,
              HAS_E: tl.constexpr, ACC: tl.constexpr, HAS_B1: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr,
              EPS: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A Gaussian head up to its raw output: pre = [hin | e] @ W1.T (+ b1) (W1 [Hd, DH (+ E)]; HAS_E: the posterior
    # reads the embedding too; ACC: pre already holds the hoisted embedding product), y = act([LN] pre),
    # raw [B, 2S] = y @ W2.T + b2.
    LD1 = DH + E
    _linear(pre, HD, hin, DH, DH, e_ptr, E, E, w1, LD1, 1, HD, b1, rows, rmask,
            HAS_E, HAS_B1, ACC, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    _norm_act_fwd(pre, y, HD, nw1, nb1, rstd, rows, rmask, ACT, NORM, EPS, COMPUTE, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _linear(raw, 2 * S, y, HD, HD, y, HD, 0, w2, HD, 1, 2 * S, b2, rows, rmask,
            False, True, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()


@triton.jit
def _head_bwd(d_raw, d_y, d_pre, d_v, d_hin, DH, LD1, w1, nw1, nb1, w2, pre, rstd, S, HD, rows, rmask,
              ACT: tl.constexpr, NORM: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The backward of _head_fwd from d raw [B, 2S]: d y = d raw @ W2, d pre (and d v, the LayerNorm output's, with
    # NORM), and d_hin [B, DH] += d pre @ W1[:, :DH] (W1's row length LD1). The embedding's share is the caller's.
    _linear(d_y, HD, d_raw, 2 * S, 2 * S, d_raw, 0, 0, w2, 1, HD, HD, w2, rows, rmask,
            False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    _norm_act_bwd(d_y, pre, HD, nw1, nb1, rstd, d_pre, d_v, rows, rmask, ACT, NORM, COMPUTE, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _linear(d_hin, DH, d_pre, HD, HD, d_pre, 0, 0, w1, 1, LD1, DH, w1, rows, rmask,
            False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()


@triton.jit
def _prior_fwd(
    z_ptr, a_ptr, lda, h_ptr,  # [B, S], [B, A] (row stride lda), [B, D] (X): the state and the action
    noise_ptr, ldn, seed,  # noise [B, S] (row stride ldn) or the int64 seed of the sample
    hout, z_out, ldz, m_out, s_out, ldo,  # h' [B, D]; the sample (row stride ldz), mean and std (row stride ldo)
    w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
    x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw,  # saved / scratch, as in _step_fwd_body
    S, A, D, HD, rows, rmask,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, NOISE: tl.constexpr, STD_MODE: tl.constexpr,
    MIN_STD: tl.constexpr, EPS: tl.constexpr, UPDATE_BIAS: tl.constexpr,
    HAS_B_IN: tl.constexpr, HAS_B_C1: tl.constexpr, HAS_B_C2: tl.constexpr, HAS_B_P1: tl.constexpr,
    SAVE_GATES: tl.constexpr, STORE_MS: tl.constexpr, HOISTED: tl.constexpr, HEAD: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # The prior step for rows [rows]: input layer on [z, a], the cell, then (HEAD) the prior head, std and sample.
    # Shared by the step kernels (which save the GRU gates for the backward) and the rollout kernel (which does
    # not). HOISTED: x_pre already holds a @ W_in[:, S:].T (one product over all rows before a time loop); only the
    # z part and the bias are added here.
    if HOISTED:
        _linear(x_pre, HD, z_ptr, S, S, z_ptr, 0, 0, w_in, S + A, 1, HD, b_in, rows, rmask,
                False, HAS_B_IN, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _linear(x_pre, HD, z_ptr, S, S, a_ptr, lda, A, w_in, S + A, 1, HD, b_in, rows, rmask,
                True, HAS_B_IN, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    _norm_act_fwd(x_pre, x_act, HD, nw_in, nb_in, x_rstd, rows, rmask, ACT, NORM, EPS, COMPUTE, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    # the cell; the head reads h' (or x itself when there is no cell)
    if CELL == 0:
        _gru_fwd(x_act, HD, HD, h_ptr, D, w_c1, w_c2, b_c1, b_c2, hout, c_save, rows, rmask,
                 HAS_B_C1, HAS_B_C2, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, SAVE_GATES)
    elif CELL == 1:
        _lngru_fwd(x_act, HD, HD, h_ptr, D, w_c1, nw_c, nb_c, c_save, c_rstd, hout, rows, rmask,
                   EPS, UPDATE_BIAS, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    if HEAD:
        hin, DH = _head_input(hout, x_act, D, HD, CELL)
        _head_fwd(p_raw, hin, DH, hin, 0, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2, p_pre, p_rstd, p_y, S, HD, rows,
                  rmask, False, False, HAS_B_P1, ACT, NORM, EPS, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        _gauss_fwd(p_raw, S, noise_ptr, ldn, seed, z_out, ldz, m_out, s_out, ldo, p_raw, p_raw, rows, rmask,
                   NOISE, False, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S, STORE_MS)


@triton.jit
def _step_fwd_body(
    z_ptr, a_ptr, h_ptr, e_ptr,  # [B, S], [B, A], [B, D], [B, E] (X) inputs; e only with POST
    nq_ptr, np_ptr, q_seed, p_seed,  # noise [B, S] (X) of the posterior and the prior sample, or int64 seeds
    w_in, b_in, nw_in, nb_in,  # input layer [Hd, S + A], [Hd], LayerNorm [Hd] x 2
    w_c1, w_c2, b_c1, b_c2, nw_c, nb_c,  # cell: GRU W_ih [3D, Hd], W_hh [3D, D], biases; LN-GRU W [3D, Hd + D], norm
    w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,  # prior head [Hd, D'], [2S, Hd]
    w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2,  # posterior head [Hd, D' + E], [2S, Hd]
    hout, zp_out, pm_out, ps_out,  # [B, D], [B, S] x 3 (X): deter and the prior sample, mean, std
    zq_out, qm_out, qs_out, kl_out,  # [B, S] x 3 (X), [B] (fp32 / fp64): the posterior and KL(q || p)
    x_pre, x_rstd, x_act,  # saved: input layer pre-activation (xhat with NORM) [B, Hd], rstd [B], output [B, Hd]
    c_save, c_rstd,  # saved: GRU [B, 4D] gates; LN-GRU [B, 3D] xhat and rstd [B]
    p_pre, p_rstd, p_y, p_raw,  # saved: prior head [B, Hd], [B], [B, Hd], [B, 2S]
    q_pre, q_rstd, q_y, q_raw,  # saved: posterior head, same shapes
    B, S, A, D, E, HD, rows, rmask,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, POST: tl.constexpr,
    NOISE_Q: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
    EPS: tl.constexpr, UPDATE_BIAS: tl.constexpr,
    HAS_B_IN: tl.constexpr, HAS_B_C1: tl.constexpr, HAS_B_C2: tl.constexpr, HAS_B_P1: tl.constexpr,
    HAS_B_Q1: tl.constexpr, HOISTED: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One RSSM step for rows [rows] (the prior step, or the posterior step with POST); see _step_fwd_kernel.
    # HOISTED (observe's time loop): x_pre and q_pre arrive holding the action and embedding products
    # a @ W_in[:, S:].T and e @ W_q1[:, D':].T, computed for all T x B rows before the loop (e_ptr is unused), and
    # the prior head, its sample and the KL are left out: they do not feed the recurrence, so observe runs them
    # over all T x B rows after the loop.
    _prior_fwd(z_ptr, a_ptr, A, h_ptr, np_ptr, S, p_seed, hout, zp_out, S, pm_out, ps_out, S,
               w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
               x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw,
               S, A, D, HD, rows, rmask, CELL, ACT, NORM, NOISE_P, STD_MODE, MIN_STD, EPS, UPDATE_BIAS,
               HAS_B_IN, HAS_B_C1, HAS_B_C2, HAS_B_P1, True, True, HOISTED, not HOISTED,
               COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S)
    if POST:
        hin, DH = _head_input(hout, x_act, D, HD, CELL)
        _head_fwd(q_raw, hin, DH, e_ptr, E, w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2, q_pre, q_rstd, q_y, S, HD, rows,
                  rmask, not HOISTED, HOISTED, HAS_B_Q1, ACT, NORM, EPS, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        _gauss_fwd(q_raw, S, nq_ptr, S, q_seed, zq_out, S, qm_out, qs_out, S, p_raw, kl_out, rows, rmask,
                   NOISE_Q, not HOISTED, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S, True)


@triton.jit
def _load_seeds(seed_ptr, NOISE_Q: tl.constexpr, NOISE_P: tl.constexpr, POST: tl.constexpr):
    # (posterior seed, prior seed) from the int64 seeds [2]: seed[0] for the posterior's sample (or a prior step's),
    # seed[1] for a posterior step's prior sample; 0 where that noise is given (NOISE 1).
    q_seed = tl.full([], 0, tl.int64)
    p_seed = tl.full([], 0, tl.int64)
    if NOISE_Q == 2:
        q_seed = tl.load(seed_ptr)
    if NOISE_P == 2:
        if POST:
            p_seed = tl.load(seed_ptr + 1)
        else:
            p_seed = tl.load(seed_ptr)
    return q_seed, p_seed


@triton.jit
def _step_fwd_kernel(
    z_ptr, a_ptr, h_ptr, e_ptr,  # [B, S], [B, A], [B, D], [B, E] (X) inputs; e only with POST
    nq_ptr, np_ptr, seed_ptr,  # noise [B, S] (X) of the posterior and the prior sample, seeds [2] int64
    w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
    w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2,  # the weights, as in _step_fwd_body
    hout, zp_out, pm_out, ps_out, zq_out, qm_out, qs_out, kl_out,  # outputs, as in _step_fwd_body
    x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw, q_pre, q_rstd, q_y, q_raw,  # saved
    B, S, A, D, E, HD,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, POST: tl.constexpr,
    NOISE_Q: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
    EPS: tl.constexpr, UPDATE_BIAS: tl.constexpr,
    HAS_B_IN: tl.constexpr, HAS_B_C1: tl.constexpr, HAS_B_C2: tl.constexpr, HAS_B_P1: tl.constexpr,
    HAS_B_Q1: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    q_seed, p_seed = _load_seeds(seed_ptr, NOISE_Q, NOISE_P, POST)
    _step_fwd_body(
        z_ptr, a_ptr, h_ptr, e_ptr, nq_ptr, np_ptr, q_seed, p_seed,
        w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
        w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2,
        hout, zp_out, pm_out, ps_out, zq_out, qm_out, qs_out, kl_out,
        x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw, q_pre, q_rstd, q_y, q_raw,
        B, S, A, D, E, HD, rows, rows < B,
        CELL, ACT, NORM, POST, NOISE_Q, NOISE_P, STD_MODE, MIN_STD, EPS, UPDATE_BIAS,
        HAS_B_IN, HAS_B_C1, HAS_B_C2, HAS_B_P1, HAS_B_Q1, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S,
    )


@triton.jit
def _step_bwd_body(
    z_ptr, a_ptr, h_ptr, e_ptr, nq_ptr, np_ptr, q_seed, p_seed,  # as in the forward
    w_in, nw_in, nb_in, w_c1, w_c2, nw_c, nb_c, w_p1, nw_p1, nb_p1, w_p2, w_q1, nw_q1, nb_q1, w_q2,
    x_pre, x_rstd, c_save, c_rstd, p_pre, p_rstd, p_raw, q_pre, q_rstd, q_raw,  # saved by the forward
    g_h, g_zp, g_pm, g_ps, g_zq, g_qm, g_qs, g_kl,  # upstream grads of the forward's outputs ([B, D], [B, S] x 6, [B])
    d_z, d_a, d_h, d_e,  # out: input grads [B, S], [B, A], [B, D], [B, E] (C)
    d_xpre, d_xv, d_x,  # out: input layer: d pre [B, Hd], d LayerNorm output [B, Hd] (NORM), d x [B, Hd]
    d_c1, d_c2,  # out: GRU d gi, d gh [B, 3D]; LN-GRU d parts, d norm output [B, 3D]
    d_hin,  # out: d of what the heads read [B, D'] (h', or x for cell "none")
    d_praw, d_py, d_ppre, d_pv,  # out: prior head [B, 2S], [B, Hd] x 3
    d_qraw, d_qy, d_qpre, d_qv,  # out: posterior head
    B, S, A, D, E, HD, rows, rmask,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, POST: tl.constexpr,
    NOISE_Q: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
    UPDATE_BIAS: tl.constexpr, HOISTED: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # The backward of one RSSM step for rows [rows]; see _step_bwd_kernel. HOISTED (observe's reverse loop): d_a and
    # d_e are not written (the caller takes them from d_xpre and d_qpre as one product over all rows after the
    # loop), and the prior head and the KL were done before the loop over all rows: g_h then holds the whole
    # gradient at the heads' input but the posterior head's share (for cell "none" too: the prior head's share),
    # and d_qraw the KL's gradient with respect to the posterior's (mean, std).
    DH = _head_width(D, HD, CELL)
    _copy_rows(d_hin, g_h, DH, rows, rmask, (CELL != 2) or HOISTED, COMPUTE, BLOCK_M, BLOCK_N)
    if POST:
        _gauss_bwd(q_raw, S, nq_ptr, q_seed, g_zq, g_qm, g_qs, d_qraw, p_raw, g_kl, d_praw, rows, rmask,
                   NOISE_Q, not HOISTED, HOISTED, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S)
        tl.debug_barrier()
        _head_bwd(d_qraw, d_qy, d_qpre, d_qv, d_hin, DH, DH + E, w_q1, nw_q1, nb_q1, w_q2, q_pre, q_rstd, S, HD,
                  rows, rmask, ACT, NORM, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        if not HOISTED:
            _linear(d_e, E, d_qpre, HD, HD, d_qpre, 0, 0, w_q1 + DH, 1, DH + E, E, w_q1, rows, rmask,
                    False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    if not HOISTED:
        _gauss_bwd(p_raw, S, np_ptr, p_seed, g_zp, g_pm, g_ps, d_praw, p_raw, g_kl, d_praw, rows, rmask,
                   NOISE_P, False, POST, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S)
        tl.debug_barrier()
        _head_bwd(d_praw, d_py, d_ppre, d_pv, d_hin, DH, DH, w_p1, nw_p1, nb_p1, w_p2, p_pre, p_rstd, S, HD,
                  rows, rmask, ACT, NORM, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    if CELL == 0:
        _gru_bwd(d_hin, h_ptr, c_save, d_c1, d_c2, d_h, D, rows, rmask, COMPUTE, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        _linear(d_x, HD, d_c1, 3 * D, 3 * D, d_c1, 0, 0, w_c1, 1, HD, HD, w_c1, rows, rmask,
                False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        _linear(d_h, D, d_c2, 3 * D, 3 * D, d_c2, 0, 0, w_c2, 1, D, D, w_c2, rows, rmask,
                False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        dx = d_x
    elif CELL == 1:
        _lngru_bwd(d_hin, h_ptr, D, nw_c, nb_c, c_save, c_rstd, d_c2, d_c1, d_h, rows, rmask, UPDATE_BIAS, COMPUTE,
                   BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        _linear(d_x, HD, d_c1, 3 * D, 3 * D, d_c1, 0, 0, w_c1, 1, HD + D, HD, w_c1, rows, rmask,
                False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        _linear(d_h, D, d_c1, 3 * D, 3 * D, d_c1, 0, 0, w_c1 + HD, 1, HD + D, D, w_c1, rows, rmask,
                False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        dx = d_x
    else:
        dx = d_hin
    tl.debug_barrier()
    _norm_act_bwd(dx, x_pre, HD, nw_in, nb_in, x_rstd, d_xpre, d_xv, rows, rmask, ACT, NORM, COMPUTE,
                  BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _linear(d_z, S, d_xpre, HD, HD, d_xpre, 0, 0, w_in, 1, S + A, S, w_in, rows, rmask,
            False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    if not HOISTED:
        _linear(d_a, A, d_xpre, HD, HD, d_xpre, 0, 0, w_in + S, 1, S + A, A, w_in, rows, rmask,
                False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _step_bwd_kernel(
    z_ptr, a_ptr, h_ptr, e_ptr, nq_ptr, np_ptr, seed_ptr,  # as in the forward
    w_in, nw_in, nb_in, w_c1, w_c2, nw_c, nb_c, w_p1, nw_p1, nb_p1, w_p2, w_q1, nw_q1, nb_q1, w_q2,
    x_pre, x_rstd, c_save, c_rstd, p_pre, p_rstd, p_raw, q_pre, q_rstd, q_raw,  # saved by the forward
    g_h, g_zp, g_pm, g_ps, g_zq, g_qm, g_qs, g_kl,  # upstream grads, as in _step_bwd_body
    d_z, d_a, d_h, d_e, d_xpre, d_xv, d_x, d_c1, d_c2, d_hin, d_praw, d_py, d_ppre, d_pv, d_qraw, d_qy, d_qpre, d_qv,
    B, S, A, D, E, HD,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, POST: tl.constexpr,
    NOISE_Q: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
    UPDATE_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    q_seed, p_seed = _load_seeds(seed_ptr, NOISE_Q, NOISE_P, POST)
    _step_bwd_body(
        z_ptr, a_ptr, h_ptr, e_ptr, nq_ptr, np_ptr, q_seed, p_seed,
        w_in, nw_in, nb_in, w_c1, w_c2, nw_c, nb_c, w_p1, nw_p1, nb_p1, w_p2, w_q1, nw_q1, nb_q1, w_q2,
        x_pre, x_rstd, c_save, c_rstd, p_pre, p_rstd, p_raw, q_pre, q_rstd, q_raw,
        g_h, g_zp, g_pm, g_ps, g_zq, g_qm, g_qs, g_kl,
        d_z, d_a, d_h, d_e, d_xpre, d_xv, d_x, d_c1, d_c2, d_hin, d_praw, d_py, d_ppre, d_pv, d_qraw, d_qy, d_qpre, d_qv,
        B, S, A, D, E, HD, rows, rows < B,
        CELL, ACT, NORM, POST, NOISE_Q, NOISE_P, STD_MODE, MIN_STD, UPDATE_BIAS, False,
        COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S,
    )


@triton.jit
def _gru_cell_fwd_kernel(x_ptr, h_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, hout_ptr, save_ptr, B, X, D,
                         HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x [B, X], h [B, D] (X) -> h' [B, D] (X); save [B, 4D] (C)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    _gru_fwd(x_ptr, X, X, h_ptr, D, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, hout_ptr, save_ptr, rows, rows < B,
             HAS_BIH, HAS_BHH, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, True)


@triton.jit
def _gru_cell_bwd_kernel(g_ptr, h_ptr, wih_ptr, whh_ptr, save_ptr, dgi_ptr, dgh_ptr, dx_ptr, dh_ptr, B, X, D,
                         COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    # g [B, D] (X) -> d gi, d gh [B, 3D] (C), d x [B, X] (C), d h [B, D] (C)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < B
    _gru_bwd(g_ptr, h_ptr, save_ptr, dgi_ptr, dgh_ptr, dh_ptr, D, rows, rmask, COMPUTE, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _linear(dx_ptr, X, dgi_ptr, 3 * D, 3 * D, dgi_ptr, 0, 0, wih_ptr, 1, X, X, wih_ptr, rows, rmask,
            False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    _linear(dh_ptr, D, dgh_ptr, 3 * D, 3 * D, dgh_ptr, 0, 0, whh_ptr, 1, D, D, whh_ptr, rows, rmask,
            False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _lngru_cell_fwd_kernel(x_ptr, h_ptr, w_ptr, nw_ptr, nb_ptr, hout_ptr, parts_ptr, rstd_ptr, B, X, D,
                           EPS: tl.constexpr, UPDATE_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x [B, X], h [B, D] (X) -> h' [B, D] (X); saves xhat [B, 3D] and rstd [B] (C)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    _lngru_fwd(x_ptr, X, X, h_ptr, D, w_ptr, nw_ptr, nb_ptr, parts_ptr, rstd_ptr, hout_ptr, rows, rows < B,
               EPS, UPDATE_BIAS, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _lngru_cell_bwd_kernel(g_ptr, h_ptr, w_ptr, nw_ptr, nb_ptr, xhat_ptr, rstd_ptr, dpv_ptr, dparts_ptr, dx_ptr,
                           dh_ptr, B, X, D, UPDATE_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # g [B, D] (X) -> d norm output, d parts [B, 3D] (C), d x [B, X] (C), d h [B, D] (C)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < B
    _lngru_bwd(g_ptr, h_ptr, D, nw_ptr, nb_ptr, xhat_ptr, rstd_ptr, dpv_ptr, dparts_ptr, dh_ptr, rows, rmask,
               UPDATE_BIAS, COMPUTE, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _linear(dx_ptr, X, dparts_ptr, 3 * D, 3 * D, dparts_ptr, 0, 0, w_ptr, 1, X + D, X, w_ptr, rows, rmask,
            False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    _linear(dh_ptr, D, dparts_ptr, 3 * D, 3 * D, dparts_ptr, 0, 0, w_ptr + X, 1, X + D, D, w_ptr, rows, rmask,
            False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------

BLOCK_N = 64
BLOCK_K = 32
NUM_WARPS = 4  # the cell kernels and observe's launches over all T x B rows
# The whole-step kernels, observe's two time loops and the rollout: 8 warps. Compiled for sm_90 (benchmarks.aot,
# dreamerv3 sizes 32/512/512), 4 warps left these kernels at the 255-register cap with up to ~270 bytes of spills per
# thread (bf16 observe backward, rollout); 8 warps hold them at 200-255 registers with no more than 24. Not yet timed
# on a GPU: the first GPU session should time 4 against 8.
NUM_WARPS_STEP = 8
# A register ceiling (Triton's ``maxnreg``, PTX ``.maxnreg``) for three of those 8-warp launches: observe's forward
# loops (row split and feature split) and the step backward. Triton declares the block size (``.reqntid 256``) and
# no ceiling; ptxas then sometimes aims for two programs per SM and caps a kernel at 128 registers, spilling what does
# not fit. Compiled for sm_90 (benchmarks.aot, fp32 and bf16, both sizes, each variant with and without the ceiling):
# with 255, the fp32 GRU observe forward loop at 32/512/512 goes from 128 registers and 208 bytes of stack (176
# spilled, read and written every step) to 232 and none spilled, the fp32 step backwards at that size from 48 to
# none, the feature-split forward at 30/200/200 from 88 to 40 bytes; no variant of these three spills more. Two
# programs per SM buy nothing here: a training batch is one or two row blocks. Elsewhere the ceiling made ptxas spill
# more (stack per thread: the fp32 rollout at its larger row blocks up to 528 bytes more; the GRU step forwards at
# 30/200/200 from 32 to 88; the LayerNorm-GRU observe backward there from 144 to 200), so those launches keep ptxas's
# own choice. None everywhere: benchmarks.tune times that variant (not yet timed on a GPU).
MAXNREG: int | None = 255


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the saved buffers and of the pre-activation gradients: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prec(dtype: torch.dtype, device: torch.device) -> str:
    # float32 products follow torch's own switch (off by default): TF32 only where the user allowed it for matmuls.
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _block_s(s: int) -> int:
    return max(4, min(triton.next_power_of_2(s), 64))


def _grid(b: int) -> tuple[int]:
    return (triton.cdiv(b, BLOCK_M),)


def step_fwd(
    z: torch.Tensor, a: torch.Tensor, h: torch.Tensor, e: torch.Tensor | None,
    noise: torch.Tensor | None, prior_noise: torch.Tensor | None, seed: torch.Tensor | None,
    w: list[torch.Tensor | None], *, cell: int, act: int, norm: bool, post: bool, std_mode: int, min_std: float,
    eps: float, update_bias: float = -1.0,
) -> tuple[torch.Tensor, ...]:
    """One fused RSSM step (prior step, or posterior step with ``post``) on contiguous 2-D inputs.

    ``w`` holds the 22 tensors of :class:`fastwm.reference.StepWeights` in order (None where absent). The prior step
    samples with ``noise`` (or seed[0]); the posterior step samples the posterior with ``noise`` (or seed[0]) and the
    prior with ``prior_noise`` (or seed[1]). Returns the 8 outputs (deter', prior z, mean, std, posterior z, mean,
    std, kl) followed by the 13 buffers the backward reads; what a configuration does not produce is an empty tensor.
    """
    (w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
     w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2) = w
    bsz, s = z.shape
    a_dim, d, hd = a.shape[1], h.shape[1], w_in.shape[0]
    e_dim = e.shape[1] if post else 0
    dt, cdt = z.dtype, compute_dtype(z.dtype)
    kl_dt = torch.float64 if dt == torch.float64 else torch.float32

    def buf(wanted: bool, shape: tuple[int, ...], dtype: torch.dtype = cdt) -> torch.Tensor:
        return empty(shape if wanted else (0,), like=z, dtype=dtype)

    hout = buf(cell != 2, (bsz, d), dt)
    zp, pm, ps = buf(True, (bsz, s), dt), buf(True, (bsz, s), dt), buf(True, (bsz, s), dt)
    zq, qm, qs = buf(post, (bsz, s), dt), buf(post, (bsz, s), dt), buf(post, (bsz, s), dt)
    kl = buf(post, (bsz,), kl_dt)
    x_pre, x_rstd, x_act = buf(True, (bsz, hd)), buf(norm, (bsz,)), buf(True, (bsz, hd))
    c_save = buf(cell != 2, (bsz, 4 * d if cell == 0 else 3 * d))
    c_rstd = buf(cell == 1, (bsz,))
    p_pre, p_rstd, p_y, p_raw = buf(True, (bsz, hd)), buf(norm, (bsz,)), buf(True, (bsz, hd)), buf(True, (bsz, 2 * s))
    q_pre, q_rstd, q_y, q_raw = (buf(post, (bsz, hd)), buf(post and norm, (bsz,)), buf(post, (bsz, hd)),
                                 buf(post, (bsz, 2 * s)))
    outs = (hout, zp, pm, ps, zq, qm, qs, kl)
    saved = (x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw, q_pre, q_rstd, q_y, q_raw)
    if bsz == 0:
        return outs + saved
    x = z  # placeholder pointer for arguments a configuration never touches

    def p(t: torch.Tensor | None) -> torch.Tensor:
        return x if t is None or t.numel() == 0 else t

    # posterior step: the posterior samples noise / seed[0], the prior prior_noise / seed[1]; prior step: noise / seed[0]
    q_noise, p_noise = (noise, prior_noise) if post else (None, noise)
    _step_fwd_kernel[_grid(bsz)](
        z, a, p(h), p(e), p(q_noise), p(p_noise), p(seed),
        w_in, p(b_in), p(nw_in), p(nb_in), p(w_c1), p(w_c2), p(b_c1), p(b_c2), p(nw_c), p(nb_c),
        w_p1, p(b_p1), p(nw_p1), p(nb_p1), w_p2, b_p2, p(w_q1), p(b_q1), p(nw_q1), p(nb_q1), p(w_q2), p(b_q2),
        *(p(t) for t in outs), *(p(t) for t in saved),
        bsz, s, a_dim, d, e_dim, hd,
        CELL=cell, ACT=act, NORM=norm, POST=post,
        NOISE_Q=1 if q_noise is not None else 2, NOISE_P=1 if p_noise is not None else 2,
        STD_MODE=std_mode, MIN_STD=float(min_std), EPS=float(eps), UPDATE_BIAS=float(update_bias),
        HAS_B_IN=b_in is not None, HAS_B_C1=b_c1 is not None, HAS_B_C2=b_c2 is not None,
        HAS_B_P1=b_p1 is not None, HAS_B_Q1=b_q1 is not None,
        COMPUTE=_compute_dtype(dt), PREC=_prec(dt, z.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_S=_block_s(s), num_warps=NUM_WARPS_STEP,
    )
    return outs + saved


def step_bwd(
    z: torch.Tensor, a: torch.Tensor, h: torch.Tensor, e: torch.Tensor | None,
    noise: torch.Tensor | None, prior_noise: torch.Tensor | None, seed: torch.Tensor | None,
    w: list[torch.Tensor | None], saved: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...], *,
    cell: int, act: int, norm: bool, post: bool, std_mode: int, min_std: float, update_bias: float = -1.0,
) -> tuple[torch.Tensor, ...]:
    """The fused backward of :func:`step_fwd`. ``grads`` = upstream grads of the 8 outputs, contiguous (zeros where
    none flowed; g_h empty for cell "none", the posterior's empty for a prior step). Returns (d_z, d_a, d_h, d_e) and
    the per-row pre-activation gradients (d_xpre, d_xv, d_x, d_c1, d_c2, d_hin, d_praw, d_ppre, d_pv, d_qraw,
    d_qpre, d_qv) from which the weight gradients are summed; all in the compute dtype."""
    (w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
     w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2) = w
    x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw, q_pre, q_rstd, q_y, q_raw = saved
    bsz, s = z.shape
    a_dim, d, hd = a.shape[1], h.shape[1], w_in.shape[0]
    e_dim = e.shape[1] if post else 0
    dh_in = hd if cell == 2 else d
    cdt = compute_dtype(z.dtype)

    def buf(wanted: bool, shape: tuple[int, ...]) -> torch.Tensor:
        return empty(shape if wanted else (0,), like=z, dtype=cdt)

    d_z, d_a, d_h, d_e = buf(True, (bsz, s)), buf(True, (bsz, a_dim)), buf(cell != 2, (bsz, d)), buf(post, (bsz, e_dim))
    d_xpre, d_xv, d_x = buf(True, (bsz, hd)), buf(norm, (bsz, hd)), buf(cell != 2, (bsz, hd))
    d_c1, d_c2 = buf(cell != 2, (bsz, 3 * d)), buf(cell != 2, (bsz, 3 * d))
    d_hin = buf(True, (bsz, dh_in))
    d_praw, d_py, d_ppre, d_pv = buf(True, (bsz, 2 * s)), buf(True, (bsz, hd)), buf(True, (bsz, hd)), buf(norm, (bsz, hd))
    d_qraw, d_qy, d_qpre, d_qv = (buf(post, (bsz, 2 * s)), buf(post, (bsz, hd)), buf(post, (bsz, hd)),
                                  buf(post and norm, (bsz, hd)))
    if bsz:
        x = z

        def p(t: torch.Tensor | None) -> torch.Tensor:
            return x if t is None or t.numel() == 0 else t

        q_noise, p_noise = (noise, prior_noise) if post else (None, noise)
        _step_bwd_kernel[_grid(bsz)](
            z, a, p(h), p(e), p(q_noise), p(p_noise), p(seed),
            w_in, p(nw_in), p(nb_in), p(w_c1), p(w_c2), p(nw_c), p(nb_c), w_p1, p(nw_p1), p(nb_p1), w_p2,
            p(w_q1), p(nw_q1), p(nb_q1), p(w_q2),
            x_pre, p(x_rstd), p(c_save), p(c_rstd), p_pre, p(p_rstd), p_raw, p(q_pre), p(q_rstd), p(q_raw),
            *(p(g) for g in grads),
            d_z, d_a, p(d_h), p(d_e), d_xpre, p(d_xv), p(d_x), p(d_c1), p(d_c2), d_hin,
            d_praw, d_py, d_ppre, p(d_pv), p(d_qraw), p(d_qy), p(d_qpre), p(d_qv),
            bsz, s, a_dim, d, e_dim, hd,
            CELL=cell, ACT=act, NORM=norm, POST=post,
            NOISE_Q=1 if q_noise is not None else 2, NOISE_P=1 if p_noise is not None else 2,
            STD_MODE=std_mode, MIN_STD=float(min_std), UPDATE_BIAS=float(update_bias),
            COMPUTE=_compute_dtype(z.dtype), PREC=_prec(z.dtype, z.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, BLOCK_S=_block_s(s), num_warps=NUM_WARPS_STEP, maxnreg=MAXNREG,
        )
    return (d_z, d_a, d_h, d_e, d_xpre, d_xv, d_x, d_c1, d_c2, d_hin, d_praw, d_ppre, d_pv, d_qraw, d_qpre, d_qv)


def gru_cell_fwd(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                 b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.GRUCell on contiguous x [B, X], h [B, D] -> (h' [B, D], saved gates [B, 4D])."""
    bsz, xw = x.shape
    d = h.shape[1]
    hout = empty((bsz, d), like=x)
    save = empty((bsz, 4 * d), like=x, dtype=compute_dtype(x.dtype))
    if bsz:
        _gru_cell_fwd_kernel[_grid(bsz)](
            x, h, w_ih, w_hh, x if b_ih is None else b_ih, x if b_hh is None else b_hh, hout, save, bsz, xw, d,
            HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, COMPUTE=_compute_dtype(x.dtype),
            PREC=_prec(x.dtype, x.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return hout, save


def gru_cell_bwd(g: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                 save: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Backward of :func:`gru_cell_fwd` from g = d loss / d h' (contiguous) -> (d gi, d gh [B, 3D], d x, d h)."""
    bsz, d = h.shape
    xw = w_ih.shape[1]
    cdt = compute_dtype(h.dtype)
    dgi, dgh = empty((bsz, 3 * d), like=h, dtype=cdt), empty((bsz, 3 * d), like=h, dtype=cdt)
    dx, dh = empty((bsz, xw), like=h, dtype=cdt), empty((bsz, d), like=h, dtype=cdt)
    if bsz:
        _gru_cell_bwd_kernel[_grid(bsz)](
            g, h, w_ih, w_hh, save, dgi, dgh, dx, dh, bsz, xw, d, COMPUTE=_compute_dtype(h.dtype),
            PREC=_prec(h.dtype, h.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return dgi, dgh, dx, dh


def lngru_cell_fwd(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor, *,
                   eps: float, update_bias: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Dreamer LayerNorm GRU on contiguous x [B, X], h [B, D] -> (h', saved xhat [B, 3D], saved rstd [B])."""
    bsz, xw = x.shape
    d = h.shape[1]
    cdt = compute_dtype(x.dtype)
    hout = empty((bsz, d), like=x)
    xhat, rstd = empty((bsz, 3 * d), like=x, dtype=cdt), empty((bsz,), like=x, dtype=cdt)
    if bsz:
        _lngru_cell_fwd_kernel[_grid(bsz)](
            x, h, w, nw, nb, hout, xhat, rstd, bsz, xw, d, EPS=float(eps), UPDATE_BIAS=float(update_bias),
            COMPUTE=_compute_dtype(x.dtype), PREC=_prec(x.dtype, x.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return hout, xhat, rstd


def lngru_cell_bwd(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor,
                   xhat: torch.Tensor, rstd: torch.Tensor, *, update_bias: float) -> tuple[torch.Tensor, ...]:
    """Backward of :func:`lngru_cell_fwd` -> (d norm output, d parts [B, 3D], d x, d h), compute dtype."""
    bsz, d = h.shape
    xw = w.shape[1] - d
    cdt = compute_dtype(h.dtype)
    dpv, dparts = empty((bsz, 3 * d), like=h, dtype=cdt), empty((bsz, 3 * d), like=h, dtype=cdt)
    dx, dh = empty((bsz, xw), like=h, dtype=cdt), empty((bsz, d), like=h, dtype=cdt)
    if bsz:
        _lngru_cell_bwd_kernel[_grid(bsz)](
            g, h, w, nw, nb, xhat, rstd, dpv, dparts, dx, dh, bsz, xw, d, UPDATE_BIAS=float(update_bias),
            COMPUTE=_compute_dtype(h.dtype), PREC=_prec(h.dtype, h.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return dpv, dparts, dx, dh
