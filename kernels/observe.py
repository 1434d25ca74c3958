"""The whole of ``RSSM.observe`` in two time loops, one forward and one reverse, each one launch.

The posterior sample at step t feeds the cell at step t + 1, so the cell, the posterior head and the sample sit inside
one time loop: each program owns ``BLOCK_M`` sequences and runs the posterior step (:func:`_step_fwd_body` of
``fastwm.kernels.rssm``) for t = 0 .. T - 1, applying the ``is_first`` resets on the fly: to zeros, or to the
initial state given as two vectors (RSSM's learned one), whose gradient the reverse loop adds up per row where a step
was reset. Everything is time-major ([T, B, ...]) so that step t's slice is a contiguous [B, ...] block.

What does not depend on the recurrence is hoisted out of the loop:

* before it, the action part of the input layer and the embedding part of the posterior's first layer (E x Hd, the
  largest product of a Dreamer step): one matrix product each over all T x B rows, which the loop adds the recurrent
  part to;
* after it, the prior head, its std and sample, and KL(q || p): one launch over all T x B rows
  (``_observe_prior_kernel``), as DreamerV3 computes the prior during training.

Per step the loop then runs the input layer's stoch part, the cell and the posterior head only.

The backward mirrors this: one launch over all T x B rows first (``_observe_prior_bwd_kernel``: the KL's and the prior
head's backward), then the reverse loop t = T - 1 .. 0 with :func:`_step_bwd_body`, carrying the gradients with
respect to the next step's input state (stoch, deter) back and writing every layer's pre-activation gradient for every
(t, b); then the action and embedding gradients one product each, and the weight gradients a few matrix products over
all T x B rows (``fastwm.observe``), deterministic, no atomics.

Small batches leave most of the GPU idle under the row split: ``FEATURE_SPLIT`` splits both loops' features across
programs that meet at grid barriers (``_observe_split_fwd_kernel``, ``_observe_split_bwd_kernel``; off by default).

Seeded noise: step t's posterior draws with seed[0] + t, its prior sample with seed[1] + t
(``fastwm.reference.philox_normal(seed + t, (B, S))``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gaussian import _compute_dtype, empty
from .rssm import (
    BLOCK_K,
    BLOCK_M,
    BLOCK_N,
    MAXNREG,
    NUM_WARPS,
    NUM_WARPS_STEP,
    _block_s,
    _copy_rows,
    _dot_acc,
    _gauss_bwd,
    _gauss_fwd,
    _gru_bwd,
    _gru_fwd,
    _head_bwd,
    _head_fwd,
    _head_input,
    _head_width,
    _kl_bwd,
    _kl_fwd,
    _linear,
    _lngru_bwd_gates,
    _lngru_bwd_parts,
    _lngru_gates,
    _load_seeds,
    _norm_act_apply,
    _norm_act_bwd,
    _norm_act_fwd,
    _norm_bwd_apply,
    _norm_bwd_sums,
    _prec,
    _step_bwd_body,
    _step_fwd_body,
    compute_dtype,
)

__all__ = ["observe_fwd", "observe_bwd", "N_SAVED"]

# The product tiles of the two time loops. Compiled for sm_90 (benchmarks.aot, 8 warps), the module's 64 x 32 tiles
# left the backward loop with 1.6-2 KB of stack per thread (spilled registers, read and written every step) at
# PlaNet's sizes in fp32 (30/200/200, GRU and LayerNorm GRU) and 416 bytes in bf16; 32 x 16 tiles compile both
# loops with at most 48 bytes spilled at both sizes and dtypes, but the fp32 GRU forward at 32/512/512 (176, where
# ptxas had capped it at 128 registers; none spilled with the register ceiling MAXNREG of kernels/rssm.py). Not yet
# timed on a GPU: benchmarks.tune times both.
LOOP_BLOCK_N, LOOP_BLOCK_K = 32, 16

N_SAVED = 16  # z_in, h_in, a_in and the 13 buffers of the step

# The register ceiling of the row-split reverse loop (None: ptxas's own choice; see MAXNREG in kernels/rssm.py).
# Compiled for sm_90 (fp32 and bf16, GRU and LayerNorm GRU, 30/200/200 and 32/512/512, resets to zeros and to a
# learned initial state): 255 spills no less anywhere and more in one case (the fp32 LayerNorm GRU at 30/200/200 with
# zeros: 200 bytes of stack per thread against 136); without it every variant but the LayerNorm GRU at 30/200/200
# (136-240 bytes fp32, 104-144 bf16) keeps to the 32 bytes of a Philox draw. Not timed on a GPU.
BWD_LOOP_MAXNREG: int | None = None

# The feature split of both loops (_observe_split_fwd_kernel, _observe_split_bwd_kernel): at most this many
# programs per row block, and only where row blocks x programs fit the SM count. 0 keeps the row-split loops
# everywhere: the default until the split is timed on a GPU (benchmarks.tune compares both).
FEATURE_SPLIT = 0
# Set by a test harness whose interpreter runs a launch's programs concurrently (tests/concurrent.py); the stock
# interpreter runs them one after another, and a grid barrier would wait forever.
INTERPRETER_RUNS_PROGRAMS_CONCURRENTLY = False


@triton.jit
def _keep_copy(dst_ptr, src_ptr, N, keep, rows, rmask, HAS_SRC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PAST_L1: tl.constexpr = False, nb0=0, nb_step=1):
    # dst[rows, :N] = keep[:, None] * src (0 without HAS_SRC); row-major, row length N, cast to dst's dtype.
    # PAST_L1 reads src past the L1 cache (".cg"): what other programs wrote. Column blocks nb0, nb0 + nb_step, ...
    for nb in range(nb0, tl.cdiv(N, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & (cols < N)[None, :]
        v = tl.zeros([BLOCK_M, BLOCK_N], dtype=keep.dtype)
        if HAS_SRC:
            if PAST_L1:
                v = tl.load(src_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            else:
                v = tl.load(src_ptr + offs, mask=mask, other=0.0)
            v = v.to(keep.dtype) * keep[:, None]
        tl.store(dst_ptr + offs, v.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reset_copy(dst_ptr, src_ptr, init_ptr, N, keep, rows, rmask, HAS_INIT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PAST_L1: tl.constexpr = False):
    # A step's input state with its reset applied: dst[rows, :N] = src where keep, else the initial state (init[:N],
    # one vector for every row: the learned one; 0 without HAS_INIT). A select, not a product: exact in every dtype.
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & (cols < N)[None, :]
        if PAST_L1:
            v = tl.load(src_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        else:
            v = tl.load(src_ptr + offs, mask=mask, other=0.0)
        if HAS_INIT:
            i = tl.load(init_ptr + cols, mask=cols < N, other=0.0).to(v.dtype)[None, :] + tl.zeros_like(v)
        else:
            i = tl.zeros_like(v)
        tl.store(dst_ptr + offs, tl.where(keep[:, None] != 0, v, i).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_reset(acc_ptr, src_ptr, N, keep, rows, rmask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # acc[rows, :N] += src where not keep: what a reset step's input-state gradient sends to the learned initial
    # state, per row (summed over the rows after the loop); column blocks nb0, nb0 + nb_step, ...
    for nb in range(nb0, tl.cdiv(N, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & (cols < N)[None, :]
        g = tl.load(src_ptr + offs, mask=mask, other=0.0).to(keep.dtype)
        v = tl.load(acc_ptr + offs, mask=mask, other=0.0) + tl.where(keep[:, None] != 0, 0.0, g)
        tl.store(acc_ptr + offs, v, mask=mask)


@triton.jit
def _add_keep(dst_ptr, a_ptr, b_ptr, N, keep, rows, rmask, acc_ptr, amask, HAS_ACC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, nb0=0, nb_step=1):
    # dst = a + keep[:, None] * b over rows [rows] of length N (a: upstream grads, b: the carried gradient, the next
    # step's input-state gradient), column blocks nb0, nb0 + nb_step, ...; with HAS_ACC also what a reset sends to
    # the initial state: acc += b where not keep (rows amask), from the same loads.
    for nb in range(nb0, tl.cdiv(N, BLOCK_N), nb_step):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = rows[:, None] * N + cols[None, :]
        mask = rmask[:, None] & (cols < N)[None, :]
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(keep.dtype)
        v = tl.load(a_ptr + offs, mask=mask, other=0.0).to(keep.dtype) + keep[:, None] * b
        tl.store(dst_ptr + offs, v.to(dst_ptr.dtype.element_ty), mask=mask)
        if HAS_ACC:
            am = amask[:, None] & (cols < N)[None, :]
            acc = tl.load(acc_ptr + offs, mask=am, other=0.0) + tl.where(keep[:, None] != 0, 0.0, b)
            tl.store(acc_ptr + offs, acc, mask=am)


@triton.jit
def _keep_of(first_ptr, rows, rmask, HAS_FIRST: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr):
    keep = tl.full([BLOCK_M], 1.0, COMPUTE)
    if HAS_FIRST:
        f = tl.load(first_ptr + rows, mask=rmask, other=0)
        keep = tl.where(f != 0, 0.0, keep)
    return keep


@triton.jit
def _observe_fwd_kernel(
    z0_ptr, h0_ptr,  # [B, S], [B, D] (X): the state before step 0
    iz_ptr, ih_ptr,  # [S], [D] (X): the initial state a reset restores (HAS_INIT; zeros without)
    act_ptr, emb_ptr, first_ptr,  # [T, B, A], [T, B, E] (X) (their products are hoisted: unused), [T, B] int8
    nq_ptr, np_ptr, seed_ptr,  # [T, B, S] (X) posterior / prior noise (NOISE_Q / NOISE_P 1), [2] int64 seeds
    w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
    w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2,  # the weights, as in the step kernel
    hs, zp, pm, ps, zq, qm, qs, kl,  # out [T, B, D], [T, B, S] x 6 (X), [T, B] (fp32 / fp64)
    z_in, h_in, a_in,  # saved [T, B, S], [T, B, D], [T, B, A] (X): each step's input state and action, reset applied
    x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw, q_pre, q_rstd, q_y, q_raw,  # saved [T, B, ...]
    B, T, S, A, D, E, HD, C_W,  # C_W: the width of c_save (4D for the GRU, 3D for the LN-GRU)
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, HAS_FIRST: tl.constexpr, HAS_INIT: tl.constexpr,
    NOISE_Q: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr, EPS: tl.constexpr,
    UPDATE_BIAS: tl.constexpr,
    HAS_B_IN: tl.constexpr, HAS_B_C1: tl.constexpr, HAS_B_C2: tl.constexpr, HAS_B_P1: tl.constexpr,
    HAS_B_Q1: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < B
    HAS_D: tl.constexpr = CELL != 2
    q_seed, p_seed = _load_seeds(seed_ptr, NOISE_Q, NOISE_P, True)
    for t in range(0, T):
        keep = _keep_of(first_ptr + t * B, rows, rmask, HAS_FIRST, COMPUTE, BLOCK_M)
        if t == 0:
            _reset_copy(z_in, z0_ptr, iz_ptr, S, keep, rows, rmask, HAS_INIT, BLOCK_M, BLOCK_N)
            if HAS_D:
                _reset_copy(h_in, h0_ptr, ih_ptr, D, keep, rows, rmask, HAS_INIT, BLOCK_M, BLOCK_N)
        else:
            _reset_copy(z_in + t * B * S, zq + (t - 1) * B * S, iz_ptr, S, keep, rows, rmask, HAS_INIT, BLOCK_M,
                        BLOCK_N)
            if HAS_D:
                _reset_copy(h_in + t * B * D, hs + (t - 1) * B * D, ih_ptr, D, keep, rows, rmask, HAS_INIT, BLOCK_M,
                            BLOCK_N)
        tl.debug_barrier()
        _step_fwd_body(
            z_in + t * B * S, a_in + t * B * A, h_in + t * B * D, emb_ptr + t * B * E,
            nq_ptr + t * B * S, np_ptr + t * B * S, q_seed + t, p_seed + t,
            w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
            w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2,
            hs + t * B * D, zp + t * B * S, pm + t * B * S, ps + t * B * S,
            zq + t * B * S, qm + t * B * S, qs + t * B * S, kl + t * B,
            x_pre + t * B * HD, x_rstd + t * B, x_act + t * B * HD, c_save + t * B * C_W, c_rstd + t * B,
            p_pre + t * B * HD, p_rstd + t * B, p_y + t * B * HD, p_raw + t * B * 2 * S,
            q_pre + t * B * HD, q_rstd + t * B, q_y + t * B * HD, q_raw + t * B * 2 * S,
            B, S, A, D, E, HD, rows, rmask,
            CELL, ACT, NORM, True, NOISE_Q, NOISE_P, STD_MODE, MIN_STD, EPS, UPDATE_BIAS,
            HAS_B_IN, HAS_B_C1, HAS_B_C2, HAS_B_P1, HAS_B_Q1, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K,
            BLOCK_S,
        )
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------------------------------
# The time loops with the features split across programs (small batches)
# --------------------------------------------------------------------------------------------------------------------
#
# A training batch of 16 sequences is one row block: the row-split loops run it on one SM. Here each row
# block gets P programs (grid [row blocks, P]); program p owns the column blocks p, p + P, ... of every layer that
# is split, and the P programs meet at a grid barrier where a layer needs all of the previous one. Per step:
#
#   every program, redundantly (small): step t - 1's posterior output from the P programs' shares and its sample,
#     the reset, the input layer;
#   split: the cell's features (the LayerNorm GRU: its 3D outputs, with the LayerNorm statistics combined from the
#     P programs' shares at a barrier);                                                              -> barrier
#   split: the posterior head's first layer (LayerNorm statistics likewise), and each program's share of its
#     output layer (a partial product over its columns), summed in program order by every program at the next
#     step: deterministic.                                                                           -> barrier
#
# (The reverse loop, _observe_split_bwd_kernel, is split the same way; its comment lists its barriers.)
#
# Program 0 writes the saved buffers the redundant part produces; the others write theirs to private scratch. What
# one program reads of another's writes it reads past L1 (".cg"). The barrier needs all P programs of a row block
# resident at once: the launcher keeps row blocks x P within the SM count, and on the CPU interpreter, which runs
# programs one after another, refuses P > 1 unless they run concurrently (the tests' threaded interpreter).


@triton.jit
def _split_program(B, BLOCK_M: tl.constexpr):
    # A program of a split loop (grid [row blocks, P]): its row block, its index p among the P, its rows and row
    # mask, and whether it is program 0 (the one that writes what every program computes).
    rb = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    return rb, p, tl.num_programs(1), rows, rows < B, p == 0


@triton.jit
def _grid_barrier(count_ptr, target):
    # Wait until `target` arrivals have been counted at count_ptr (the k-th barrier of P programs: k * P). One
    # thread of the program does the atomics; the CTA barrier before the release orders all its threads' writes
    # before the arrival, the one after the acquire orders all their later reads after everyone's.
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _pick(own, a, b):
    # a for program 0 (the saved buffers), b for the others (their private scratch)
    if own:
        r = a
    else:
        r = b
    return r


@triton.jit
def _part_stats(pre_ptr, ld, N, rows, rmask, stats_ptr, p, B, NCHUNK: tl.constexpr, COMPUTE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P):
    # This program's share of a LayerNorm's row statistics, over its column blocks (p, p + P, ...) of each of the
    # NCHUNK chunks of width N of pre (row stride ld): (count, mean, sum of squared deviations) -> stats[p, rows].
    # tiles summed across the loop, reduced once after it
    s1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    n = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for nb in range(p, tl.cdiv(N, BLOCK_N), P):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < N)[None, :]
        n += tl.where(mask, NCHUNK, 0.0)
        for c in tl.static_range(NCHUNK):
            s1 += tl.load(pre_ptr + rows[:, None] * ld + c * N + cols[None, :], mask=mask, other=0.0)
    n_row = tl.sum(n, axis=1)
    mean = tl.sum(s1, axis=1) / tl.maximum(n_row, 1.0)
    s2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for nb in range(p, tl.cdiv(N, BLOCK_N), P):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < N)[None, :]
        for c in tl.static_range(NCHUNK):
            v = tl.load(pre_ptr + rows[:, None] * ld + c * N + cols[None, :], mask=mask, other=0.0)
            d = tl.where(mask, v - mean[:, None], 0.0)
            s2 += d * d
    base = (p * B + rows) * 3
    tl.store(stats_ptr + base, n_row, mask=rmask)
    tl.store(stats_ptr + base + 1, mean, mask=rmask)
    tl.store(stats_ptr + base + 2, tl.sum(s2, axis=1), mask=rmask)


@triton.jit
def _combined_stats(stats_ptr, P, B, rows, rmask, EPS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr):
    # The row mean and 1 / sqrt(var + eps) from the P shares of _part_stats, combined in program order (Chan et
    # al.'s pairwise update: stable, and the same in every program).
    n = tl.zeros([BLOCK_M], dtype=COMPUTE)
    mean = tl.zeros([BLOCK_M], dtype=COMPUTE)
    m2 = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for q in range(0, P):
        base = (q * B + rows) * 3
        nq = tl.load(stats_ptr + base, mask=rmask, other=0.0, cache_modifier=".cg")
        mq = tl.load(stats_ptr + base + 1, mask=rmask, other=0.0, cache_modifier=".cg")
        m2q = tl.load(stats_ptr + base + 2, mask=rmask, other=0.0, cache_modifier=".cg")
        tot = n + nq
        frac = tl.where(tot > 0, nq / tl.maximum(tot, 1.0), 0.0)
        delta = mq - mean
        mean += delta * frac
        m2 += m2q + delta * delta * n * frac
        n = tot
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(n, 1.0) + EPS)
    return mean, rstd


@triton.jit
def _partial_out(part_ptr, y_ptr, HD, w2, S2, p, P, B, rows, rmask, COMPUTE: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S2: tl.constexpr):
    # part[p, rows, :S2] = y[rows, own columns] @ W2[:, own columns].T: this program's share of a head's output
    # layer (W2 [S2, Hd]), over its column blocks p, p + P, ... of y.
    ocols = tl.arange(0, BLOCK_S2)
    omask = ocols < S2
    acc = tl.zeros([BLOCK_M, BLOCK_S2], dtype=COMPUTE)
    for nb in range(p, tl.cdiv(HD, BLOCK_N), P):
        k0 = nb * BLOCK_N
        acc = _dot_acc(acc, y_ptr + k0, HD, tl.minimum(HD - k0, BLOCK_N), w2 + k0, HD, 1, rows, rmask, ocols, omask,
                       PREC, BLOCK_N)
    tl.store(part_ptr + (p * B + rows)[:, None] * S2 + ocols[None, :], acc, mask=rmask[:, None] & omask[None, :])


@triton.jit
def _sum_parts(raw_ptr, part_ptr, b_ptr, P, B, S2, rows, rmask, COMPUTE: tl.constexpr, BLOCK_S2: tl.constexpr):
    # raw[rows, :S2] = b + the P programs' shares of _partial_out, in program order
    ocols = tl.arange(0, BLOCK_S2)
    omask = ocols < S2
    mask = rmask[:, None] & omask[None, :]
    raw = tl.load(b_ptr + ocols, mask=omask, other=0.0).to(COMPUTE)[None, :] + \
        tl.zeros([rows.shape[0], BLOCK_S2], dtype=COMPUTE)
    for q in range(0, P):
        raw += tl.load(part_ptr + (q * B + rows)[:, None] * S2 + ocols[None, :], mask=mask, other=0.0,
                       cache_modifier=".cg")
    tl.store(raw_ptr + rows[:, None] * S2 + ocols[None, :], raw, mask=mask)


@triton.jit
def _observe_split_fwd_kernel(
    z0_ptr, h0_ptr, iz_ptr, ih_ptr, first_ptr, nq_ptr, seed_ptr,  # as in _observe_fwd_kernel
    w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2,
    hs, zq, qm, qs,  # out [T, B, D], [T, B, S] x 3 (X)
    z_in, h_in, a_in,  # saved [T, B, S], [T, B, D], [T, B, A] (X); a_in holds the action, resets applied
    x_pre, x_rstd, x_act, c_save, c_rstd, q_pre, q_rstd, q_y, q_raw,  # saved [T, B, ...] (C); q_pre: e @ W_q1e.T
    count_ptr, part, stats,  # int32 [row blocks] zeros; scratch [2, P, B, 2S] (by step parity), [P, B, 3] (C)
    pz, ph, pxp, pxr, pxa, praw, pzq, pqm, pqs, phc,  # private scratch [P, B, ...]: S, D, Hd, 1, Hd, 2S, S x 3, D
    B, T, S, A, D, E, HD, C_W,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, HAS_FIRST: tl.constexpr, HAS_INIT: tl.constexpr,
    NOISE_Q: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr, EPS: tl.constexpr, UPDATE_BIAS: tl.constexpr,
    HAS_B_IN: tl.constexpr, HAS_B_C1: tl.constexpr, HAS_B_C2: tl.constexpr, HAS_B_Q1: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_S2: tl.constexpr,
):
    rb, p, P, rows, rmask, own = _split_program(B, BLOCK_M)
    pp = p.to(tl.int64)
    HAS_D: tl.constexpr = CELL != 2
    count = count_ptr + rb
    n_bar = 0
    q_seed, _ = _load_seeds(seed_ptr, NOISE_Q, 1, True)
    ones = tl.full([BLOCK_M], 1.0, COMPUTE)
    z_o = _pick(own, z_in, pz + pp * B * S)
    h_o = _pick(own, h_in, ph + pp * B * D)
    hc = phc + pp * B * D
    for t in range(0, T + 1):
        zq_o = _pick(own, zq + (t - 1) * B * S, pzq + pp * B * S)
        if t > 0:
            # step t - 1's posterior: its output layer from the P shares, then the sample
            raw_o = _pick(own, q_raw + (t - 1) * B * 2 * S, praw + pp * B * 2 * S)
            # step t - 1's shares sit in the half of its parity: a program that runs ahead writes step t's into
            # the other half, so it never overwrites a share another program has still to read (with no cell and
            # no norm, the barrier at the end of the step is the only one between this read and that write)
            _sum_parts(raw_o, part + ((t - 1) % 2) * P * B * 2 * S, b_q2, P, B, 2 * S, rows, rmask, COMPUTE,
                       BLOCK_S2)
            tl.debug_barrier()
            _gauss_fwd(raw_o, S, nq_ptr + (t - 1) * B * S, S, q_seed + t - 1, zq_o, S,
                       _pick(own, qm + (t - 1) * B * S, pqm + pp * B * S),
                       _pick(own, qs + (t - 1) * B * S, pqs + pp * B * S), S, raw_o, raw_o, rows, rmask,
                       NOISE_Q, False, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S, True)
            tl.debug_barrier()
        if t < T:
            keep = _keep_of(first_ptr + t * B, rows, rmask, HAS_FIRST, COMPUTE, BLOCK_M)
            zt = _pick(own, z_o + t * B * S, z_o)
            ht = _pick(own, h_o + t * B * D, h_o)
            if t == 0:
                _reset_copy(zt, z0_ptr, iz_ptr, S, keep, rows, rmask, HAS_INIT, BLOCK_M, BLOCK_N)
                if HAS_D:
                    _reset_copy(ht, h0_ptr, ih_ptr, D, keep, rows, rmask, HAS_INIT, BLOCK_M, BLOCK_N)
            else:
                _reset_copy(zt, zq_o, iz_ptr, S, keep, rows, rmask, HAS_INIT, BLOCK_M, BLOCK_N)
                if HAS_D:
                    _reset_copy(ht, hs + (t - 1) * B * D, ih_ptr, D, keep, rows, rmask, HAS_INIT, BLOCK_M, BLOCK_N,
                                True)
            tl.debug_barrier()
            # the input layer, whole in every program (its action part too: no hoisted product to start from)
            xp_o = _pick(own, x_pre + t * B * HD, pxp + pp * B * HD)
            xa_o = _pick(own, x_act + t * B * HD, pxa + pp * B * HD)
            _linear(xp_o, HD, zt, S, S, a_in + t * B * A, A, A, w_in, S + A, 1, HD, b_in, rows, rmask,
                    True, HAS_B_IN, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
            _norm_act_fwd(xp_o, xa_o, HD, nw_in, nb_in, _pick(own, x_rstd + t * B, pxr + pp * B), rows, rmask, ACT,
                          NORM, EPS, COMPUTE, BLOCK_M, BLOCK_N)
            tl.debug_barrier()
            # the cell, this program's features
            if CELL == 0:
                _gru_fwd(xa_o, HD, HD, ht, D, w_c1, w_c2, b_c1, b_c2, hs + t * B * D, c_save + t * B * C_W, rows,
                         rmask, HAS_B_C1, HAS_B_C2, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, True, p, P)
            elif CELL == 1:
                parts = c_save + t * B * C_W
                for c in tl.static_range(3):
                    _linear(parts + c * D, 3 * D, xa_o, HD, HD, ht, D, D, w_c1 + c * D * (HD + D), HD + D, 1, D,
                            w_c1, rows, rmask, True, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
                tl.debug_barrier()
                _part_stats(parts, 3 * D, D, rows, rmask, stats, p, B, 3, COMPUTE, BLOCK_M, BLOCK_N, P)
                n_bar += 1
                _grid_barrier(count, n_bar * P)
                mean, rstd = _combined_stats(stats, P, B, rows, rmask, EPS, COMPUTE, BLOCK_M)
                tl.store(c_rstd + t * B + rows, rstd, mask=rmask & own)
                _lngru_gates(ht, D, nw_c, nb_c, parts, mean, rstd, hs + t * B * D, rows, rmask, UPDATE_BIAS,
                             COMPUTE, BLOCK_N, p, P)
            if HAS_D:
                # all of h' for the posterior head: everyone's features
                n_bar += 1
                _grid_barrier(count, n_bar * P)
                _keep_copy(hc, hs + t * B * D, D, ones, rows, rmask, True, BLOCK_M, BLOCK_N, True)
                tl.debug_barrier()
            hin, DH = _head_input(hc, xa_o, D, HD, CELL)
            # the posterior head's first layer, this program's columns (q_pre holds the embedding's product)
            qpre = q_pre + t * B * HD
            _linear(qpre, HD, hin, DH, DH, hin, 0, 0, w_q1, DH + E, 1, HD, b_q1, rows, rmask,
                    False, HAS_B_Q1, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
            tl.debug_barrier()
            mean2 = tl.zeros([BLOCK_M], dtype=COMPUTE)
            rstd2 = mean2
            if NORM:
                _part_stats(qpre, HD, HD, rows, rmask, stats, p, B, 1, COMPUTE, BLOCK_M, BLOCK_N, P)
                n_bar += 1
                _grid_barrier(count, n_bar * P)
                mean2, rstd2 = _combined_stats(stats, P, B, rows, rmask, EPS, COMPUTE, BLOCK_M)
                tl.store(q_rstd + t * B + rows, rstd2, mask=rmask & own)
            _norm_act_apply(qpre, q_y + t * B * HD, HD, nw_q1, nb_q1, mean2, rstd2, rows, rmask, ACT, NORM,
                            COMPUTE, BLOCK_N, p, P)
            tl.debug_barrier()
            _partial_out(part + (t % 2) * P * B * 2 * S, q_y + t * B * HD, HD, w_q2, 2 * S, p, P, B, rows, rmask,
                         COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_S2)
            n_bar += 1
            _grid_barrier(count, n_bar * P)


@triton.jit
def _put_sums(stats_ptr, p, B, rows, rmask, a, b):
    # this program's share of two row sums -> stats[p, rows, 0:2]
    base = (p * B + rows) * 3
    tl.store(stats_ptr + base, a, mask=rmask)
    tl.store(stats_ptr + base + 1, b, mask=rmask)


@triton.jit
def _sum_shares(stats_ptr, P, B, rows, rmask, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr):
    # the two row sums of _put_sums over the P programs, in program order
    a = tl.zeros([BLOCK_M], dtype=COMPUTE)
    b = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for q in range(0, P):
        base = (q * B + rows) * 3
        a += tl.load(stats_ptr + base, mask=rmask, other=0.0, cache_modifier=".cg")
        b += tl.load(stats_ptr + base + 1, mask=rmask, other=0.0, cache_modifier=".cg")
    return a, b


@triton.jit
def _observe_split_bwd_kernel(
    first_ptr, nq_ptr, seed_ptr,  # as in the forward
    w_in, nw_in, nb_in, w_c1, w_c2, nw_c, nb_c, w_q1, nw_q1, nb_q1, w_q2,
    h_in, x_pre, x_rstd, c_save, c_rstd, q_pre, q_rstd, q_raw,  # saved by the forward
    g_head, g_zq, g_qm, g_qs, d_qkl,  # g_head [T, B, D'], upstream [T, B, S] x 3, the KL's d q_raw [T, B, 2S] (C)
    d_z0, d_h0,  # out [B, S], [B, D] (C)
    g_iz, g_ih,  # [B, S], [B, D] (C) zeros (HAS_INIT): += each reset step's input-state gradient, per row
    d_xpre, d_xv, d_c1, d_c2, d_qraw, d_qpre, d_qv,  # out [T, B, ...] (C), as in _observe_bwd_kernel
    count_ptr, stats,  # int32 [row blocks] zeros; [P, B, 3] (C)
    d_qy, d_hin, d_x, carry_h,  # shared scratch [B, Hd], [B, D'], [B, Hd], [B, D] (C): each program its columns
    pgz, pcz, pdq, pdqp, pdc1, pdc2, pdx, pdxp, pdxv,  # private [P, B, ...]: S, S, 2S, Hd, 3D, 3D, Hd, Hd, Hd (C)
    B, T, S, A, D, E, HD, C_W,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, HAS_FIRST: tl.constexpr, HAS_INIT: tl.constexpr,
    NOISE_Q: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr, UPDATE_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # The reverse loop of _observe_bwd_kernel with the features split as in the forward: per step, in every
    # program the posterior sample's backward (2S wide); split, the posterior head's first layer (LayerNorm sums
    # from the P shares) -> barrier; the gradient at the heads' input and the cell's backward on this program's
    # features (the LayerNorm GRU's sums likewise) -> barrier; d x on its columns -> barrier; then in every
    # program the input layer's backward and the gradient carried to step t - 1's stoch. The carried deter
    # gradient stays split: each program carries its own features.
    rb, p, P, rows, rmask, own = _split_program(B, BLOCK_M)
    pp = p.to(tl.int64)
    HAS_D: tl.constexpr = CELL != 2
    DH = _head_width(D, HD, CELL)
    count = count_ptr + rb
    n_bar = 0
    q_seed, _ = _load_seeds(seed_ptr, NOISE_Q, 1, True)
    ones = tl.full([BLOCK_M], 1.0, COMPUTE)
    gz, cz = pgz + pp * B * S, pcz + pp * B * S
    dqp, dxc = pdqp + pp * B * HD, pdx + pp * B * HD
    dc1c, dc2c = pdc1 + pp * B * 3 * D, pdc2 + pp * B * 3 * D
    for i in range(0, T):
        t = T - 1 - i
        # the gradient reaching step t's outputs: upstream, plus what step t + 1 sends back through its input
        # state unless step t + 1 was reset (the stoch's in every program, the deter's on this program's features)
        if i == 0:
            _keep_copy(gz, g_zq + t * B * S, S, ones, rows, rmask, True, BLOCK_M, BLOCK_N)
            _keep_copy(d_hin, g_head + t * B * DH, DH, ones, rows, rmask, True, BLOCK_M, BLOCK_N, False, p, P)
        else:
            keep_next = _keep_of(first_ptr + (t + 1) * B, rows, rmask, HAS_FIRST, COMPUTE, BLOCK_M)
            # (and with HAS_INIT, where step t + 1 was reset, that gradient to the initial state instead)
            _add_keep(gz, g_zq + t * B * S, cz, S, keep_next, rows, rmask, g_iz, rmask & own, HAS_INIT, BLOCK_M,
                      BLOCK_N)
            if HAS_D:
                _add_keep(d_hin, g_head + t * B * D, carry_h, D, keep_next, rows, rmask, g_ih, rmask, HAS_INIT,
                          BLOCK_M, BLOCK_N, p, P)
            else:
                _keep_copy(d_hin, g_head + t * B * HD, HD, ones, rows, rmask, True, BLOCK_M, BLOCK_N, False, p, P)
        # the posterior sample's backward, whole in every program: d q_raw = the KL's + the sample's
        dq = _pick(own, d_qraw + t * B * 2 * S, pdq + pp * B * 2 * S)
        _keep_copy(dq, d_qkl + t * B * 2 * S, 2 * S, ones, rows, rmask, True, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        _gauss_bwd(q_raw + t * B * 2 * S, S, nq_ptr + t * B * S, q_seed + t, gz, g_qm + t * B * S, g_qs + t * B * S,
                   dq, q_raw, q_raw, dq, rows, rmask, NOISE_Q, False, True, STD_MODE, MIN_STD, COMPUTE, BLOCK_M,
                   BLOCK_S)
        tl.debug_barrier()
        # the posterior head's first layer, this program's columns
        _linear(d_qy, HD, dq, 2 * S, 2 * S, dq, 0, 0, w_q2, 1, HD, HD, w_q2, rows, rmask,
                False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
        tl.debug_barrier()
        qpre, dqpre, dqv = q_pre + t * B * HD, d_qpre + t * B * HD, d_qv + t * B * HD
        m1 = tl.zeros([BLOCK_M], dtype=COMPUTE)
        m2 = m1
        if NORM:
            s1, s2 = _norm_bwd_sums(d_qy, qpre, HD, nw_q1, nb_q1, dqv, rows, rmask, ACT, COMPUTE, BLOCK_M, BLOCK_N,
                                    p, P)
            _put_sums(stats, p, B, rows, rmask, s1, s2)
            n_bar += 1
            _grid_barrier(count, n_bar * P)
            m1, m2 = _sum_shares(stats, P, B, rows, rmask, COMPUTE, BLOCK_M)
            m1 = m1 / HD
            m2 = m2 / HD
        _norm_bwd_apply(d_qy, qpre, HD, nw_q1, q_rstd + t * B, dqpre, dqv, m1, m2, rows, rmask, ACT, NORM, COMPUTE,
                        BLOCK_N, p, P)
        n_bar += 1
        _grid_barrier(count, n_bar * P)
        # the gradient at the heads' input, this program's features: += d pre @ W_q1[:, :D'] (all of d pre)
        _keep_copy(dqp, dqpre, HD, ones, rows, rmask, True, BLOCK_M, BLOCK_N, True)
        tl.debug_barrier()
        _linear(d_hin, DH, dqp, HD, HD, dqp, 0, 0, w_q1, 1, DH + E, DH, w_q1, rows, rmask,
                False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
        tl.debug_barrier()
        # the cell's backward on this program's features, then d x and the carried d h on its columns
        hin_t, cs, dc1, dc2 = h_in + t * B * D, c_save + t * B * C_W, d_c1 + t * B * 3 * D, d_c2 + t * B * 3 * D
        if CELL == 0:
            _gru_bwd(d_hin, hin_t, cs, dc1, dc2, carry_h, D, rows, rmask, COMPUTE, BLOCK_M, BLOCK_N, p, P)
        elif CELL == 1:
            s1, s2 = _lngru_bwd_gates(d_hin, hin_t, D, nw_c, nb_c, cs, dc2, carry_h, rows, rmask, UPDATE_BIAS,
                                      COMPUTE, BLOCK_M, BLOCK_N, p, P)
            _put_sums(stats, p, B, rows, rmask, s1, s2)
            n_bar += 1
            _grid_barrier(count, n_bar * P)
            m1, m2 = _sum_shares(stats, P, B, rows, rmask, COMPUTE, BLOCK_M)
            _lngru_bwd_parts(D, nw_c, cs, c_rstd + t * B, dc2, dc1, m1 / (3 * D), m2 / (3 * D), rows, rmask,
                             COMPUTE, BLOCK_N, p, P)
        if HAS_D:
            n_bar += 1
            _grid_barrier(count, n_bar * P)
            _keep_copy(dc1c, dc1, 3 * D, ones, rows, rmask, True, BLOCK_M, BLOCK_N, True)
            if CELL == 0:
                _keep_copy(dc2c, dc2, 3 * D, ones, rows, rmask, True, BLOCK_M, BLOCK_N, True)
            tl.debug_barrier()
            if CELL == 0:
                _linear(d_x, HD, dc1c, 3 * D, 3 * D, dc1c, 0, 0, w_c1, 1, HD, HD, w_c1, rows, rmask,
                        False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
                _linear(carry_h, D, dc2c, 3 * D, 3 * D, dc2c, 0, 0, w_c2, 1, D, D, w_c2, rows, rmask,
                        False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
            else:
                _linear(d_x, HD, dc1c, 3 * D, 3 * D, dc1c, 0, 0, w_c1, 1, HD + D, HD, w_c1, rows, rmask,
                        False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
                _linear(carry_h, D, dc1c, 3 * D, 3 * D, dc1c, 0, 0, w_c1 + HD, 1, HD + D, D, w_c1, rows, rmask,
                        False, False, True, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, p, P)
        else:
            # no cell: d x is the heads' input gradient (copied: d_hin is rewritten before the next barrier)
            _keep_copy(d_x, d_hin, HD, ones, rows, rmask, True, BLOCK_M, BLOCK_N, False, p, P)
        n_bar += 1
        _grid_barrier(count, n_bar * P)
        # the input layer's backward and the stoch's carried gradient, whole in every program
        _keep_copy(dxc, d_x, HD, ones, rows, rmask, True, BLOCK_M, BLOCK_N, True)
        tl.debug_barrier()
        dxp = _pick(own, d_xpre + t * B * HD, pdxp + pp * B * HD)
        _norm_act_bwd(dxc, x_pre + t * B * HD, HD, nw_in, nb_in, x_rstd + t * B, dxp,
                      _pick(own, d_xv + t * B * HD, pdxv + pp * B * HD), rows, rmask, ACT, NORM, COMPUTE, BLOCK_M,
                      BLOCK_N)
        tl.debug_barrier()
        _linear(cz, S, dxp, HD, HD, dxp, 0, 0, w_in, 1, S + A, S, w_in, rows, rmask,
                False, False, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.debug_barrier()
    keep0 = _keep_of(first_ptr, rows, rmask, HAS_FIRST, COMPUTE, BLOCK_M)
    _keep_copy(d_z0, cz, S, keep0, rows, rmask & own, True, BLOCK_M, BLOCK_N)
    if HAS_D:
        _keep_copy(d_h0, carry_h, D, keep0, rows, rmask, True, BLOCK_M, BLOCK_N, False, p, P)
    if HAS_INIT:  # step 0 reset: its input-state gradient goes to the initial state
        _add_reset(g_iz, cz, S, keep0, rows, rmask & own, BLOCK_M, BLOCK_N)
        if HAS_D:
            _add_reset(g_ih, carry_h, D, keep0, rows, rmask, BLOCK_M, BLOCK_N, p, P)


@triton.jit
def _step_row_block(B, seed_ptr, NOISE_P: tl.constexpr, BLOCK_M: tl.constexpr):
    # A launch over all T x B rows, one program per (step, block of BLOCK_M rows): (t, rows, row mask, the prior's
    # seed of step 0).
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(B, BLOCK_M)
    t = pid // n_blocks
    rows = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    _, p_seed = _load_seeds(seed_ptr, 1, NOISE_P, True)
    return t, rows, rows < B, p_seed


@triton.jit
def _observe_prior_kernel(
    hs, x_act, np_ptr, seed_ptr,  # [T, B, D] deter (X), [T, B, Hd] saved input layer output (C), noise, seeds
    w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,  # the prior head
    zp, pm, ps, kl,  # out [T, B, S] x 3 (X), [T, B] (fp32 / fp64)
    p_pre, p_rstd, p_y, p_raw, q_raw,  # saved [T, B, ...] (C); q_raw: the posterior's, written by the time loop
    B, S, D, HD,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr,
    MIN_STD: tl.constexpr, EPS: tl.constexpr, HAS_B_P1: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # After the time loop, over all T x B rows at once (one program per row block and step): the prior head, its
    # std and sample (seed[1] + t, as inside the loop) and KL(q || p). Nothing here feeds the recurrence.
    t, rows, rmask, p_seed = _step_row_block(B, seed_ptr, NOISE_P, BLOCK_M)
    hin, DH = _head_input(hs + t * B * D, x_act + t * B * HD, D, HD, CELL)
    o2 = t * B * 2 * S
    _head_fwd(p_raw + o2, hin, DH, hin, 0, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2, p_pre + t * B * HD, p_rstd + t * B,
              p_y + t * B * HD, S, HD, rows, rmask, False, False, HAS_B_P1, ACT, NORM, EPS, COMPUTE, PREC,
              BLOCK_M, BLOCK_N, BLOCK_K)
    o = t * B * S
    _gauss_fwd(p_raw + o2, S, np_ptr + o, S, p_seed + t, zp + o, S, pm + o, ps + o, S, q_raw + o2, kl, rows, rmask,
               NOISE_P, False, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S, True)
    _kl_fwd(q_raw + o2, p_raw + o2, S, kl + t * B, rows, rmask, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S)


@triton.jit
def _observe_prior_bwd_kernel(
    hs_grad, np_ptr, seed_ptr,  # [T, B, D] the upstream grad of deter (C; absent for cell "none"), noise, seeds
    w_p1, nw_p1, nb_p1, w_p2,  # the prior head
    p_pre, p_rstd, p_raw, q_raw,  # saved by the forward
    g_zp, g_pm, g_ps, g_kl,  # upstream grads [T, B, S] x 3, [T, B]
    d_qraw, d_praw, d_py, d_ppre, d_pv, g_head,  # out [T, B, 2S] x 2, [T, B, Hd] x 3, [T, B, D'] (C)
    B, S, D, HD,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr,
    MIN_STD: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Before the reverse loop, over all T x B rows at once: the KL's gradients (the posterior's share, before its
    # std transform, into d_qraw for the loop to add), the prior sample's and the prior head's backward, and
    # g_head = (deter's upstream grad) + (the prior head's grad at its input): what the loop starts each step from.
    t, rows, rmask, p_seed = _step_row_block(B, seed_ptr, NOISE_P, BLOCK_M)
    o, o2, oh = t * B * S, t * B * 2 * S, t * B * HD
    _kl_bwd(q_raw + o2, p_raw + o2, S, g_kl + t * B, d_qraw + o2, d_praw + o2, rows, rmask, STD_MODE, MIN_STD,
            COMPUTE, BLOCK_M, BLOCK_S)
    tl.debug_barrier()
    _gauss_bwd(p_raw + o2, S, np_ptr + o, p_seed + t, g_zp + o, g_pm + o, g_ps + o, d_praw + o2, p_raw, g_kl,
               d_praw + o2, rows, rmask, NOISE_P, False, True, STD_MODE, MIN_STD, COMPUTE, BLOCK_M, BLOCK_S)
    tl.debug_barrier()
    DH = _head_width(D, HD, CELL)
    _copy_rows(g_head + t * B * DH, hs_grad + t * B * DH, DH, rows, rmask, CELL != 2, COMPUTE, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _head_bwd(d_praw + o2, d_py + oh, d_ppre + oh, d_pv + oh, g_head + t * B * DH, DH, DH, w_p1, nw_p1, nb_p1, w_p2,
              p_pre + oh, p_rstd + t * B, S, HD, rows, rmask, ACT, NORM, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _observe_bwd_kernel(
    emb_ptr, first_ptr, nq_ptr, np_ptr, seed_ptr,  # as in the forward
    w_in, nw_in, nb_in, w_c1, w_c2, nw_c, nb_c, w_p1, nw_p1, nb_p1, w_p2, w_q1, nw_q1, nb_q1, w_q2,
    z_in, h_in, a_in, x_pre, x_rstd, c_save, c_rstd, p_pre, p_rstd, p_raw, q_pre, q_rstd, q_raw,  # saved
    g_head, g_zp, g_pm, g_ps, g_zq, g_qm, g_qs, g_kl,  # g_head [T, B, D'] from _observe_prior_bwd_kernel; upstream
    d_z0, d_h0,  # out [B, S], [B, D] (C): grads of the state before step 0
    g_iz, g_ih,  # [B, S], [B, D] (C) zeros (HAS_INIT): += each reset step's input-state gradient, per row
    d_a, d_e,  # out [T, B, A], [T, B, E] (C): grads of a_in (the caller zeroes the reset steps) and of embed
    d_xpre, d_xv, d_c1, d_c2, d_praw, d_ppre, d_pv, d_qraw, d_qpre, d_qv,  # out [T, B, ...] (C) per-step pre-act grads
    g_h_tot, g_zq_tot, carry_h, carry_z,  # scratch [B, D], [B, S], [B, D], [B, S] (C)
    d_x, d_hin, d_py, d_qy,  # scratch [B, Hd], [B, D'], [B, Hd], [B, Hd] (C)
    B, T, S, A, D, E, HD, C_W,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, HAS_FIRST: tl.constexpr, HAS_INIT: tl.constexpr,
    NOISE_Q: tl.constexpr, NOISE_P: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
    UPDATE_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < B
    HAS_D: tl.constexpr = CELL != 2
    q_seed, p_seed = _load_seeds(seed_ptr, NOISE_Q, NOISE_P, True)
    for i in range(0, T):
        t = T - 1 - i
        # the gradient reaching step t's outputs (deter, post stoch): upstream, plus what step t + 1 sends back
        # through its input state unless step t + 1 was reset
        if i == 0:
            ones = tl.full([BLOCK_M], 1.0, COMPUTE)
            if HAS_D:
                _keep_copy(g_h_tot, g_head + t * B * D, D, ones, rows, rmask, True, BLOCK_M, BLOCK_N)
            _keep_copy(g_zq_tot, g_zq + t * B * S, S, ones, rows, rmask, True, BLOCK_M, BLOCK_N)
        else:
            keep_next = _keep_of(first_ptr + (t + 1) * B, rows, rmask, HAS_FIRST, COMPUTE, BLOCK_M)
            # (and with HAS_INIT, where step t + 1 was reset, that gradient to the initial state instead)
            if HAS_D:
                _add_keep(g_h_tot, g_head + t * B * D, carry_h, D, keep_next, rows, rmask, g_ih, rmask, HAS_INIT,
                          BLOCK_M, BLOCK_N)
            _add_keep(g_zq_tot, g_zq + t * B * S, carry_z, S, keep_next, rows, rmask, g_iz, rmask, HAS_INIT, BLOCK_M,
                      BLOCK_N)
        tl.debug_barrier()
        if HAS_D:
            g_h = g_h_tot
        else:
            g_h = g_head + t * B * HD
        _step_bwd_body(
            z_in + t * B * S, a_in + t * B * A, h_in + t * B * D, emb_ptr + t * B * E,
            nq_ptr + t * B * S, np_ptr + t * B * S, q_seed + t, p_seed + t,
            w_in, nw_in, nb_in, w_c1, w_c2, nw_c, nb_c, w_p1, nw_p1, nb_p1, w_p2, w_q1, nw_q1, nb_q1, w_q2,
            x_pre + t * B * HD, x_rstd + t * B, c_save + t * B * C_W, c_rstd + t * B,
            p_pre + t * B * HD, p_rstd + t * B, p_raw + t * B * 2 * S, q_pre + t * B * HD, q_rstd + t * B,
            q_raw + t * B * 2 * S,
            g_h, g_zp + t * B * S, g_pm + t * B * S, g_ps + t * B * S, g_zq_tot, g_qm + t * B * S,
            g_qs + t * B * S, g_kl + t * B,
            carry_z, d_a + t * B * A, carry_h, d_e + t * B * E,
            d_xpre + t * B * HD, d_xv + t * B * HD, d_x, d_c1 + t * B * 3 * D, d_c2 + t * B * 3 * D, d_hin,
            d_praw + t * B * 2 * S, d_py, d_ppre + t * B * HD, d_pv + t * B * HD,
            d_qraw + t * B * 2 * S, d_qy, d_qpre + t * B * HD, d_qv + t * B * HD,
            B, S, A, D, E, HD, rows, rmask,
            CELL, ACT, NORM, True, NOISE_Q, NOISE_P, STD_MODE, MIN_STD, UPDATE_BIAS, True,
            COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S,
        )
        tl.debug_barrier()
    keep0 = _keep_of(first_ptr, rows, rmask, HAS_FIRST, COMPUTE, BLOCK_M)
    _keep_copy(d_z0, carry_z, S, keep0, rows, rmask, True, BLOCK_M, BLOCK_N)
    if HAS_D:
        _keep_copy(d_h0, carry_h, D, keep0, rows, rmask, True, BLOCK_M, BLOCK_N)
    if HAS_INIT:  # step 0 reset: its input-state gradient goes to the initial state
        _add_reset(g_iz, carry_z, S, keep0, rows, rmask, BLOCK_M, BLOCK_N)
        if HAS_D:
            _add_reset(g_ih, carry_h, D, keep0, rows, rmask, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def _saved_widths(cell: int, norm: bool, s: int, a: int, d: int, hd: int) -> list[int | None]:
    """Per-(t, b) widths of the 16 saved buffers (None: one number per row; 0: absent)."""
    c_w = 4 * d if cell == 0 else (3 * d if cell == 1 else 0)
    rstd = None if norm else 0
    return [s, d if cell != 2 else 0, a, hd, rstd, hd, c_w, None if cell == 1 else 0, hd, rstd, hd, 2 * s, hd, rstd,
            hd, 2 * s]


def split_programs(bsz: int, d: int, hd: int, device: torch.device, cap: int | None = None,
                   sms: int | None = None) -> int:
    """Programs per row block for the time loops: 1 (the row split) unless ``cap`` (default FEATURE_SPLIT) allows
    more; then as many as there are column blocks of the widest split layer, at most ``cap``, with row blocks x
    programs within the device's SM count (they must all be resident for the grid barrier). Both split kernels are
    launched cooperatively (``launch_cooperative_grid``): where the driver cannot make every program resident at
    once, the launch fails with an error instead of waiting at the first barrier forever. ``sms``: the SM count to
    plan for instead of the device's."""
    cap = FEATURE_SPLIT if cap is None else cap
    if cap < 2 or bsz == 0:
        return 1
    n_rb = triton.cdiv(bsz, BLOCK_M)
    p = min(cap, triton.cdiv(max(d, hd), LOOP_BLOCK_N))
    if sms is None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    if sms is not None:
        p = min(p, sms // n_rb)
    elif not INTERPRETER_RUNS_PROGRAMS_CONCURRENTLY:
        return 1
    return p if p >= 2 else 1


def observe_fwd(
    z0: torch.Tensor, h0: torch.Tensor, action: torch.Tensor, embed: torch.Tensor, first: torch.Tensor | None,
    noise: torch.Tensor | None, prior_noise: torch.Tensor | None, seed: torch.Tensor, w: list[torch.Tensor | None],
    *, cell: int, act: int,
    norm: bool, std_mode: int, min_std: float, eps: float, update_bias: float = -1.0, split: int | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The fused observe on time-major contiguous inputs: action [T, B, A], embed [T, B, E], first [T, B] int8 or
    None, noise / prior_noise [T, B, S] or None (then seed[0] + t / seed[1] + t), seed [2] int64. Returns the 8
    outputs [T, B, ...] (deter, prior stoch / mean / std, posterior stoch / mean / std, kl) and the 16 saved
    buffers. ``split``: programs per row block of the forward loop (None: :func:`split_programs`; 1: the row
    split; more: the feature split, whose P programs must run concurrently). ``init``: the (stoch [S], deter [D])
    a reset restores, in z0's dtype (None: zeros)."""
    (w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
     w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2) = w
    t_len, bsz, a_dim = action.shape
    e_dim = embed.shape[2]
    s, d, hd = z0.shape[1], h0.shape[1], w_in.shape[0]
    dt, cdt = z0.dtype, compute_dtype(z0.dtype)
    kl_dt = torch.float64 if dt == torch.float64 else torch.float32
    widths = _saved_widths(cell, norm, s, a_dim, d, hd)
    if t_len * bsz * max(hd, 4 * d, e_dim, 2 * s, a_dim) >= 2**31:
        raise ValueError("observe: T x B x width must stay below 2**31 elements per buffer")

    def buf(width: int | None, dtype: torch.dtype = cdt) -> torch.Tensor:
        if width == 0:
            return empty((0,), like=z0, dtype=dtype)
        return empty((t_len, bsz) if width is None else (t_len, bsz, width), like=z0, dtype=dtype)

    outs = (buf(d if cell != 2 else 0, dt), buf(s, dt), buf(s, dt), buf(s, dt), buf(s, dt), buf(s, dt), buf(s, dt),
            buf(None, kl_dt))
    saved = tuple(buf(wd, dt if i < 3 else cdt) for i, wd in enumerate(widths))
    if t_len == 0 or bsz == 0:
        return outs + saved
    # Hoisted out of the time loop, one product each over all T x B rows: the action part of the input layer and
    # the embedding part of the posterior's first layer, written straight into the pre-activation buffers the loop
    # then adds the recurrent part to. a_in is the action with the resets applied (zero at a reset step).
    n_split = split_programs(bsz, d, hd, z0.device) if split is None else split
    a_in, x_pre, q_pre = saved[2], saved[3], saved[12]
    a_in.copy_(action if first is None else action * (first == 0).to(action.dtype)[..., None])
    dh = d if cell != 2 else hd
    if n_split == 1:  # the split loop computes the whole input layer in every program
        torch.matmul(a_in.reshape(-1, a_dim).to(cdt), w_in[:, s:].t().to(cdt), out=x_pre.view(-1, hd))
    torch.matmul(embed.reshape(-1, e_dim).to(cdt), w_q1[:, dh:].t().to(cdt), out=q_pre.view(-1, hd))
    x = z0

    def p(t: torch.Tensor | None) -> torch.Tensor:
        return x if t is None or t.numel() == 0 else t

    has_init = init is not None and first is not None
    iz, ih = (p(init[0]), p(init[1])) if has_init else (x, x)
    if n_split > 1:
        _observe_split_fwd(z0, p(h0), iz, ih, p(first), p(noise), seed, w, outs, saved, n_split, cell=cell, act=act,
                           norm=norm, std_mode=std_mode, min_std=min_std, eps=eps, update_bias=update_bias,
                           has_init=has_init)
    else:
        _observe_fwd_kernel[(triton.cdiv(bsz, BLOCK_M),)](
            z0, p(h0), iz, ih, action, embed, p(first), p(noise), p(prior_noise), seed,
            w_in, p(b_in), p(nw_in), p(nb_in), p(w_c1), p(w_c2), p(b_c1), p(b_c2), p(nw_c), p(nb_c),
            w_p1, p(b_p1), p(nw_p1), p(nb_p1), w_p2, b_p2, w_q1, p(b_q1), p(nw_q1), p(nb_q1), w_q2, b_q2,
            *(p(t) for t in outs), *(p(t) for t in saved),
            bsz, t_len, s, a_dim, d, e_dim, hd, widths[6],
            CELL=cell, ACT=act, NORM=norm, HAS_FIRST=first is not None, HAS_INIT=has_init,
            NOISE_Q=1 if noise is not None else 2, NOISE_P=1 if prior_noise is not None else 2, STD_MODE=std_mode,
            MIN_STD=float(min_std), EPS=float(eps), UPDATE_BIAS=float(update_bias),
            HAS_B_IN=b_in is not None, HAS_B_C1=b_c1 is not None, HAS_B_C2=b_c2 is not None, HAS_B_P1=b_p1 is not None,
            HAS_B_Q1=b_q1 is not None,
            COMPUTE=_compute_dtype(dt), PREC=_prec(dt, z0.device), BLOCK_M=BLOCK_M, BLOCK_N=LOOP_BLOCK_N,
            BLOCK_K=LOOP_BLOCK_K, BLOCK_S=_block_s(s), num_warps=NUM_WARPS_STEP, maxnreg=MAXNREG,
        )
    # After the loop, over all T x B rows: the prior head, its sample and the KL.
    hs, zp, pm, ps, kl = outs[0], outs[1], outs[2], outs[3], outs[7]
    x_act, p_pre, p_rstd, p_y, p_raw, q_raw = saved[5], saved[8], saved[9], saved[10], saved[11], saved[15]
    _observe_prior_kernel[(t_len * triton.cdiv(bsz, BLOCK_M),)](
        p(hs), x_act, p(prior_noise), seed, w_p1, p(b_p1), p(nw_p1), p(nb_p1), w_p2, b_p2, zp, pm, ps, kl,
        p_pre, p(p_rstd), p_y, p_raw, q_raw, bsz, s, d, hd,
        CELL=cell, ACT=act, NORM=norm, NOISE_P=1 if prior_noise is not None else 2, STD_MODE=std_mode,
        MIN_STD=float(min_std), EPS=float(eps), HAS_B_P1=b_p1 is not None,
        COMPUTE=_compute_dtype(dt), PREC=_prec(dt, z0.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_S=_block_s(s), num_warps=NUM_WARPS,
    )
    return outs + saved


def _observe_split_fwd(
    z0: torch.Tensor, h0: torch.Tensor, iz: torch.Tensor, ih: torch.Tensor, first: torch.Tensor, noise: torch.Tensor,
    seed: torch.Tensor, w: list[torch.Tensor | None], outs: tuple[torch.Tensor, ...], saved: tuple[torch.Tensor, ...],
    n_split: int, *, cell: int, act: int, norm: bool, std_mode: int, min_std: float, eps: float, update_bias: float,
    has_init: bool,
) -> None:
    """Launch _observe_split_fwd_kernel: grid [row blocks, n_split]; writes the loop's outputs and saved buffers as
    the row-split loop does (``first`` / ``noise`` / ``h0`` / ``iz`` / ``ih``: z0 stands for an absent one)."""
    (w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, _, _, _, _, _, _,
     w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2) = w
    t_len, bsz, a_dim = saved[2].shape
    s, d, hd = z0.shape[1], h0.shape[1] if cell != 2 else 0, w_in.shape[0]
    e_dim = w_q1.shape[1] - (d if cell != 2 else hd)
    n_rb = triton.cdiv(bsz, BLOCK_M)
    dt, cdt = z0.dtype, compute_dtype(z0.dtype)

    def scratch(width: int, dtype: torch.dtype) -> torch.Tensor:
        return empty((n_split, bsz, max(width, 1)), like=z0, dtype=dtype)

    count = torch.zeros(n_rb, device=z0.device, dtype=torch.int32)
    part = empty((2, n_split, bsz, max(2 * s, 1)), like=z0, dtype=cdt)  # by step parity
    stats = scratch(3, cdt)
    private = (scratch(s, dt), scratch(d, dt), scratch(hd, cdt), scratch(1, cdt), scratch(hd, cdt),
               scratch(2 * s, cdt), scratch(s, dt), scratch(s, dt), scratch(s, dt), scratch(d, dt))
    (z_in, h_in, a_in, x_pre, x_rstd, x_act, c_save, c_rstd, _, _, _, _, q_pre, q_rstd, q_y, q_raw) = saved

    def p(t: torch.Tensor | None, like: torch.Tensor = z0) -> torch.Tensor:
        # an absent buffer's stand-in, of the dtype the kernel expects (a picked pointer's two sides must agree)
        return like if t is None or t.numel() == 0 else t

    _observe_split_fwd_kernel[(n_rb, n_split)](
        z0, h0, iz, ih, first, noise, seed,
        w_in, p(b_in), p(nw_in), p(nb_in), p(w_c1), p(w_c2), p(b_c1), p(b_c2), p(nw_c), p(nb_c),
        w_q1, p(b_q1), p(nw_q1), p(nb_q1), w_q2, b_q2,
        p(outs[0]), outs[4], outs[5], outs[6],
        z_in, p(h_in), a_in, x_pre, p(x_rstd, part), x_act, p(c_save, part), p(c_rstd, part), q_pre,
        p(q_rstd, part), q_y, q_raw,
        count, part, stats, *private,
        bsz, t_len, s, a_dim, d, e_dim, hd, c_save.shape[-1] if c_save.dim() == 3 else 0,
        CELL=cell, ACT=act, NORM=norm, HAS_FIRST=first is not z0, HAS_INIT=has_init,
        NOISE_Q=1 if noise is not z0 else 2, STD_MODE=std_mode, MIN_STD=float(min_std), EPS=float(eps),
        UPDATE_BIAS=float(update_bias),
        HAS_B_IN=b_in is not None, HAS_B_C1=b_c1 is not None, HAS_B_C2=b_c2 is not None, HAS_B_Q1=b_q1 is not None,
        COMPUTE=_compute_dtype(dt), PREC=_prec(dt, z0.device), BLOCK_M=BLOCK_M, BLOCK_N=LOOP_BLOCK_N,
        BLOCK_K=LOOP_BLOCK_K, BLOCK_S=_block_s(s), BLOCK_S2=max(16, triton.next_power_of_2(2 * s)),
        num_warps=NUM_WARPS_STEP, maxnreg=MAXNREG, launch_cooperative_grid=True,
    )


def observe_bwd(
    z0: torch.Tensor, h0: torch.Tensor, embed: torch.Tensor, first: torch.Tensor | None, noise: torch.Tensor | None,
    prior_noise: torch.Tensor | None, seed: torch.Tensor, w: list[torch.Tensor | None],
    saved: tuple[torch.Tensor, ...],
    grads: tuple[torch.Tensor, ...], *, cell: int, act: int, norm: bool, std_mode: int, min_std: float,
    update_bias: float = -1.0, split: int | None = None, init: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The reverse-time backward of :func:`observe_fwd`. ``grads``: the upstream grads of the 8 outputs, contiguous
    time-major (zeros where none flowed). Returns (d_z0, d_h0, d_a [T, B, A] (before the reset mask), d_e, d_iz
    [S], d_ih [D], d_xpre, d_xv, d_c1, d_c2, d_praw, d_ppre, d_pv, d_qraw, d_qpre, d_qv), all in the compute dtype.
    d_iz, d_ih: the gradients of the initial state a reset restores, summed over every reset (t, b) (with ``init``
    and ``first``: the forward's ``init``; else empty). ``split``: programs per row block of the reverse loop, as in
    :func:`observe_fwd`."""
    (w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
     w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2) = w
    t_len, bsz, e_dim = embed.shape
    s, d, hd = z0.shape[1], h0.shape[1], w_in.shape[0]
    a_dim = w_in.shape[1] - s
    cdt = compute_dtype(z0.dtype)
    dh_in = hd if cell == 2 else d
    widths = _saved_widths(cell, norm, s, a_dim, d, hd)

    def buf(shape: tuple[int, ...], wanted: bool = True) -> torch.Tensor:
        return empty(shape if wanted else (0,), like=z0, dtype=cdt)

    d_z0, d_h0 = buf((bsz, s)), buf((bsz, d), cell != 2)
    d_a, d_e = buf((t_len, bsz, a_dim)), buf((t_len, bsz, e_dim))
    has_init = init and first is not None
    # per row, summed over the rows after the loop (deterministic: each program adds its own rows in time order)
    g_iz = torch.zeros((bsz, s) if has_init else (0,), device=z0.device, dtype=cdt)
    g_ih = torch.zeros((bsz, d) if has_init and cell != 2 else (0,), device=z0.device, dtype=cdt)
    per_step = (buf((t_len, bsz, hd)), buf((t_len, bsz, hd), norm), buf((t_len, bsz, 3 * d), cell != 2),
                buf((t_len, bsz, 3 * d), cell != 2), buf((t_len, bsz, 2 * s)), buf((t_len, bsz, hd)),
                buf((t_len, bsz, hd), norm), buf((t_len, bsz, 2 * s)), buf((t_len, bsz, hd)),
                buf((t_len, bsz, hd), norm))
    if t_len and bsz:
        x = z0

        def p(t: torch.Tensor | None) -> torch.Tensor:
            return x if t is None or t.numel() == 0 else t

        (z_in, h_in, a_in, x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw, q_pre, q_rstd, q_y,
         q_raw) = saved
        d_praw, d_ppre, d_pv, d_qraw = per_step[4], per_step[5], per_step[6], per_step[7]
        n_split = split_programs(bsz, d if cell != 2 else 0, hd, z0.device) if split is None else split
        # Before the loop, over all T x B rows: the KL's and the prior head's backward. g_head: the gradient at the
        # heads' input (deter, or x for cell "none") but the posterior head's share, which the loop adds. The KL's
        # gradient with respect to the posterior's raw output goes to d_qraw, which the loop adds to (the split
        # loop: to a buffer of its own, which every program reads while program 0 writes d_qraw).
        d_qkl = d_qraw if n_split == 1 else buf((t_len, bsz, 2 * s))
        g_head, d_py = buf((t_len, bsz, dh_in)), buf((t_len, bsz, hd))
        _observe_prior_bwd_kernel[(t_len * triton.cdiv(bsz, BLOCK_M),)](
            p(grads[0]), p(prior_noise), seed, w_p1, p(nw_p1), p(nb_p1), w_p2, p_pre, p(p_rstd), p_raw, q_raw,
            grads[1], grads[2], grads[3], grads[7], d_qkl, d_praw, d_py, d_ppre, p(d_pv), g_head, bsz, s, d, hd,
            CELL=cell, ACT=act, NORM=norm, NOISE_P=1 if prior_noise is not None else 2, STD_MODE=std_mode,
            MIN_STD=float(min_std), COMPUTE=_compute_dtype(z0.dtype), PREC=_prec(z0.dtype, z0.device),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_S=_block_s(s), num_warps=NUM_WARPS,
        )
        del d_py
        if n_split > 1:
            _observe_split_bwd(z0, first, noise, seed, w, saved, grads, g_head, d_qkl, d_z0, d_h0, g_iz, g_ih,
                               per_step, n_split, cell=cell, act=act, norm=norm, std_mode=std_mode, min_std=min_std,
                               update_bias=update_bias, has_init=has_init)
            return _hoisted_input_grads(w, s, d_z0, d_h0, d_a, d_e, g_iz, g_ih, per_step, cell)
        d_qy = buf((bsz, hd))
        # scratch; the loop's d_py (the prior head's, unused there) shares d_qy
        scratch = (buf((bsz, d), cell != 2), buf((bsz, s)), buf((bsz, d), cell != 2), buf((bsz, s)),
                   buf((bsz, hd)), buf((bsz, dh_in)), d_qy, d_qy)
        _observe_bwd_kernel[(triton.cdiv(bsz, BLOCK_M),)](
            embed, p(first), p(noise), p(prior_noise), seed,
            w_in, p(nw_in), p(nb_in), p(w_c1), p(w_c2), p(nw_c), p(nb_c), w_p1, p(nw_p1), p(nb_p1), w_p2,
            w_q1, p(nw_q1), p(nb_q1), w_q2,
            z_in, p(h_in), a_in, x_pre, p(x_rstd), p(c_save), p(c_rstd), p_pre, p(p_rstd), p_raw, q_pre, p(q_rstd),
            q_raw,
            g_head, *(p(g) for g in grads[1:]),
            d_z0, p(d_h0), p(g_iz), p(g_ih), d_a, d_e, *(p(t) for t in per_step), *(p(t) for t in scratch),
            bsz, t_len, s, a_dim, d, e_dim, hd, widths[6],
            CELL=cell, ACT=act, NORM=norm, HAS_FIRST=first is not None, HAS_INIT=has_init,
            NOISE_Q=1 if noise is not None else 2,
            NOISE_P=1 if prior_noise is not None else 2, STD_MODE=std_mode, MIN_STD=float(min_std),
            UPDATE_BIAS=float(update_bias),
            COMPUTE=_compute_dtype(z0.dtype), PREC=_prec(z0.dtype, z0.device), BLOCK_M=BLOCK_M,
            BLOCK_N=LOOP_BLOCK_N, BLOCK_K=LOOP_BLOCK_K, BLOCK_S=_block_s(s), num_warps=NUM_WARPS_STEP,
            maxnreg=BWD_LOOP_MAXNREG,
        )
        return _hoisted_input_grads(w, s, d_z0, d_h0, d_a, d_e, g_iz, g_ih, per_step, cell)
    # T = 0: the state before step 0 reaches no output (B = 0: nothing to write)
    return (d_z0.zero_(), d_h0.zero_(), d_a, d_e, _row_sum(g_iz), _row_sum(g_ih)) + per_step


def _row_sum(g: torch.Tensor) -> torch.Tensor:
    # the initial state's gradient [N] from its per-row shares [B, N]; an absent one (shape [0]) stays as it is
    return g.sum(0) if g.dim() == 2 else g


def _hoisted_input_grads(w: list[torch.Tensor | None], s: int, d_z0: torch.Tensor, d_h0: torch.Tensor,
                         d_a: torch.Tensor, d_e: torch.Tensor, g_iz: torch.Tensor, g_ih: torch.Tensor,
                         per_step: tuple[torch.Tensor, ...], cell: int) -> tuple[torch.Tensor, ...]:
    """The input gradients of the hoisted products, one product each over all T x B rows (the action's from d
    x_pre, the embedding's from d q_pre), and the initial state's, summed over the rows; returns observe_bwd's
    result."""
    w_in, w_q1 = w[0], w[16]
    hd, cdt = w_in.shape[0], d_a.dtype
    dh_in = hd if cell == 2 else w_q1.shape[1] - d_e.shape[2]
    torch.matmul(per_step[0].view(-1, hd), w_in[:, s:].to(cdt), out=d_a.view(-1, d_a.shape[2]))
    torch.matmul(per_step[8].view(-1, hd), w_q1[:, dh_in:].to(cdt), out=d_e.view(-1, d_e.shape[2]))
    return (d_z0, d_h0, d_a, d_e, _row_sum(g_iz), _row_sum(g_ih)) + per_step


def _observe_split_bwd(
    z0: torch.Tensor, first: torch.Tensor | None, noise: torch.Tensor | None, seed: torch.Tensor,
    w: list[torch.Tensor | None], saved: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...],
    g_head: torch.Tensor, d_qkl: torch.Tensor, d_z0: torch.Tensor, d_h0: torch.Tensor, g_iz: torch.Tensor,
    g_ih: torch.Tensor, per_step: tuple[torch.Tensor, ...], n_split: int, *, cell: int, act: int, norm: bool,
    std_mode: int, min_std: float, update_bias: float, has_init: bool,
) -> None:
    """Launch _observe_split_bwd_kernel: grid [row blocks, n_split]; writes d_z0, d_h0, the initial state's
    per-row gradients g_iz, g_ih (``has_init``) and the per-step pre-activation gradients as the row-split reverse
    loop does."""
    (w_in, _, nw_in, nb_in, w_c1, w_c2, _, _, nw_c, nb_c, _, _, _, _, _, _, w_q1, _, nw_q1, nb_q1, w_q2, _) = w
    (_, h_in, _, x_pre, x_rstd, _, c_save, c_rstd, _, _, _, _, q_pre, q_rstd, _, q_raw) = saved
    t_len, bsz, hd = x_pre.shape
    s, a_dim = z0.shape[1], w_in.shape[1] - z0.shape[1]
    d = d_h0.shape[1] if cell != 2 else 0
    e_dim = w_q1.shape[1] - (d if cell != 2 else hd)
    n_rb = triton.cdiv(bsz, BLOCK_M)
    cdt = compute_dtype(z0.dtype)

    def scratch(*shape: int) -> torch.Tensor:
        return empty(tuple(max(n, 1) for n in shape), like=z0, dtype=cdt)

    count = torch.zeros(n_rb, device=z0.device, dtype=torch.int32)
    shared = (scratch(bsz, hd), scratch(bsz, d if cell != 2 else hd), scratch(bsz, hd), scratch(bsz, d))
    private = tuple(scratch(n_split, bsz, wd) for wd in (s, s, 2 * s, hd, 3 * d, 3 * d, hd, hd, hd))
    stand_in = private[0]

    def p(t: torch.Tensor | None) -> torch.Tensor:
        return stand_in if t is None or t.numel() == 0 else t

    d_xpre, d_xv, d_c1, d_c2, d_qraw, d_qpre, d_qv = (per_step[i] for i in (0, 1, 2, 3, 7, 8, 9))
    _observe_split_bwd_kernel[(n_rb, n_split)](
        p(first), p(noise), seed,
        w_in, p(nw_in), p(nb_in), p(w_c1), p(w_c2), p(nw_c), p(nb_c), w_q1, p(nw_q1), p(nb_q1), w_q2,
        p(h_in), x_pre, p(x_rstd), p(c_save), p(c_rstd), q_pre, p(q_rstd), q_raw,
        g_head, grads[4], grads[5], grads[6], d_qkl,
        d_z0, p(d_h0), p(g_iz), p(g_ih), d_xpre, p(d_xv), p(d_c1), p(d_c2), d_qraw, d_qpre, p(d_qv),
        count, scratch(n_split, bsz, 3), *shared, *private,
        bsz, t_len, s, a_dim, d, e_dim, hd, c_save.shape[-1] if c_save.dim() == 3 else 0,
        CELL=cell, ACT=act, NORM=norm, HAS_FIRST=first is not None, HAS_INIT=has_init,
        NOISE_Q=1 if noise is not None else 2, STD_MODE=std_mode, MIN_STD=float(min_std),
        UPDATE_BIAS=float(update_bias), COMPUTE=_compute_dtype(z0.dtype), PREC=_prec(z0.dtype, z0.device),
        BLOCK_M=BLOCK_M, BLOCK_N=LOOP_BLOCK_N, BLOCK_K=LOOP_BLOCK_K, BLOCK_S=_block_s(s), num_warps=NUM_WARPS_STEP,
        launch_cooperative_grid=True,
    )
