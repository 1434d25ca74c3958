"""Whole-horizon imagination: H prior steps in ONE launch, no gradient.

Each program owns ``BLOCK_M`` trajectories (16 to 128, by launch size and dtype: :func:`_rollout_tiles`) and runs the
prior step (input layer, cell, prior head, std transform, sample) H times: the ``_prior_fwd`` helper of
:mod:`fastwm.kernels.rssm`, the one the step kernels run. The state (h, z) lives in two small per-row ping-pong buffers
that stay in L1/L2; the weights are read from L2 every step. Optional, also inside the loop:

* a policy MLP (closed loop): a_t = policy([z_t, h_t]), written out per step;
* a reward MLP on [z_{t+1}, h_{t+1}]: per-step rewards, or only their sum over the horizon (then memory is O(N));
* what is written per step: the state (deter, stoch, mean, std), the features cat([stoch, deter]), or nothing (only
  the final state and the returns).

An MLP here is up to three Linear layers with one activation between them and an optional final activation
(``fastwm.rollout.pack_mlp`` reads it from an ``nn.Sequential``). Seeded noise: step t draws with seed + t, so it is
``fastwm.reference.philox_normal(seed + t, (N, S))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gaussian import _compute_dtype, empty
from .rssm import (
    NUM_WARPS_STEP,
    _block_s,
    _linear,
    _norm_act_fwd,
    _prec,
    _prior_fwd,
    compute_dtype,
)

__all__ = ["rollout_fwd", "MLP_MAX_LAYERS"]

MLP_MAX_LAYERS = 3


@triton.jit
def _copy_strided(dst_ptr, ldd, src_ptr, lds, N, rows, rmask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dst[rows, :N] = src[rows, :N] (row strides ldd, lds), cast to dst's dtype.
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < N)[None, :]
        v = tl.load(src_ptr + rows[:, None] * lds + cols[None, :], mask=mask, other=0.0)
        tl.store(dst_ptr + rows[:, None] * ldd + cols[None, :], v.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp(z_ptr, S, h_ptr, D, HAS_H: tl.constexpr,
         w1, b1, w2, b2, w3, b3, R1, R2, O,
         t1, t2, t3, t4, out_ptr, rows, rmask,
         N_LAYERS: tl.constexpr, ACT: tl.constexpr, OUT_ACT: tl.constexpr,
         COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr):
    # out [B, O] (C) = MLP([z, h]) with 1-3 Linear layers (widths R1, R2 between them), ACT between layers and
    # OUT_ACT at the end. t1/t2 ([B, R1]) and t3/t4 ([B, R2]) are scratch (C). Every layer has a bias.
    if N_LAYERS == 1:
        _linear(t1, O, z_ptr, S, S, h_ptr, D, D, w1, S + D, 1, O, b1, rows, rmask,
                HAS_H, True, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.debug_barrier()
        _norm_act_fwd(t1, out_ptr, O, w1, w1, t1, rows, rmask, OUT_ACT, False, 1e-3, COMPUTE, BLOCK_M, BLOCK_N)
    else:
        _linear(t1, R1, z_ptr, S, S, h_ptr, D, D, w1, S + D, 1, R1, b1, rows, rmask,
                HAS_H, True, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.debug_barrier()
        _norm_act_fwd(t1, t2, R1, w1, w1, t1, rows, rmask, ACT, False, 1e-3, COMPUTE, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        if N_LAYERS == 2:
            _linear(t1, O, t2, R1, R1, t2, R1, 0, w2, R1, 1, O, b2, rows, rmask,
                    False, True, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
            _norm_act_fwd(t1, out_ptr, O, w1, w1, t1, rows, rmask, OUT_ACT, False, 1e-3, COMPUTE, BLOCK_M, BLOCK_N)
        else:
            _linear(t3, R2, t2, R1, R1, t2, R1, 0, w2, R1, 1, R2, b2, rows, rmask,
                    False, True, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
            _norm_act_fwd(t3, t4, R2, w1, w1, t3, rows, rmask, ACT, False, 1e-3, COMPUTE, BLOCK_M, BLOCK_N)
            tl.debug_barrier()
            _linear(t1, O, t4, R2, R2, t4, R2, 0, w3, R2, 1, O, b3, rows, rmask,
                    False, True, False, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
            _norm_act_fwd(t1, out_ptr, O, w1, w1, t1, rows, rmask, OUT_ACT, False, 1e-3, COMPUTE, BLOCK_M, BLOCK_N)


@triton.jit
def _rollout_kernel(
    z0_ptr, h0_ptr,  # [N, S], [N, D] (X) the start state
    act_ptr,  # [N, H, A] (X) open-loop actions (OPEN_LOOP)
    noise_ptr, seed_ptr,  # [N, H, S] (X) noise (NOISE 1), or [1] int64 seed (NOISE 2)
    w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c,  # as in the step kernel
    w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
    pw1, pb1, pw2, pb2, pw3, pb3,  # policy MLP (closed loop): [P1, S + D], [P2, P1], [A, P2] and biases
    rw1, rb1, rw2, rb2, rw3, rb3,  # reward MLP: [R1, S + D], [R2, R1], [1, R2] and biases
    zbuf, hbuf,  # scratch [2, N, S], [2, N, D] (C): the ping-pong state
    x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw,  # scratch as in the step kernel (C)
    a_buf, m1, m2, m3, m4, r_buf,  # scratch: action [N, A], MLP hidden [N, max width] x 4, reward [N, 1] (C)
    out_deter, out_stoch, out_mean, out_std,  # [N, H, D], [N, H, S] x 3 (X), WRITE_STATE
    out_feat,  # [N, H, S + D] (X), WRITE_FEAT
    out_actions,  # [N, H, A] (X), closed loop
    out_reward,  # [N, H] (fp32 / fp64), REWARD == 1
    out_return,  # [N] (fp32 / fp64), REWARD == 2
    out_final_deter, out_final_stoch,  # [N, D], [N, S] (X), always
    N, H, S, A, D, HD, P1, P2, R1, R2,
    CELL: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, STD_MODE: tl.constexpr, MIN_STD: tl.constexpr,
    EPS: tl.constexpr, UPDATE_BIAS: tl.constexpr, NOISE: tl.constexpr,
    HAS_B_IN: tl.constexpr, HAS_B_C1: tl.constexpr, HAS_B_C2: tl.constexpr, HAS_B_P1: tl.constexpr,
    OPEN_LOOP: tl.constexpr, POLICY_LAYERS: tl.constexpr, POLICY_ACT: tl.constexpr, POLICY_OUT_ACT: tl.constexpr,
    REWARD: tl.constexpr, REWARD_LAYERS: tl.constexpr, REWARD_ACT: tl.constexpr, REWARD_OUT_ACT: tl.constexpr,
    WRITE_STATE: tl.constexpr, WRITE_FEAT: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < N
    HAS_D: tl.constexpr = CELL != 2
    F = S + D
    seed = 0
    if NOISE == 2:
        seed = tl.load(seed_ptr)
    # the start state into slot 0 of the ping-pong buffers
    _copy_strided(zbuf, S, z0_ptr, S, S, rows, rmask, BLOCK_M, BLOCK_N)
    if HAS_D:
        _copy_strided(hbuf, D, h0_ptr, D, D, rows, rmask, BLOCK_M, BLOCK_N)
    ret = tl.zeros([BLOCK_M], dtype=COMPUTE)
    # the ping-pong slots' offsets in 64 bits: N x D passes 2**31 at 4.2 M trajectories of D 512
    slot_s = (tl.full([], 0, tl.int64) + N) * S
    slot_d = (tl.full([], 0, tl.int64) + N) * D
    tl.debug_barrier()
    for t in range(0, H):
        cur = t % 2
        z_cur = zbuf + cur * slot_s
        h_cur = hbuf + cur * slot_d
        z_next = zbuf + (1 - cur) * slot_s
        h_next = hbuf + (1 - cur) * slot_d
        # the action of step t
        if OPEN_LOOP:
            a_src = act_ptr + t * A
            lda = H * A
        else:
            _mlp(z_cur, S, h_cur, D, HAS_D, pw1, pb1, pw2, pb2, pw3, pb3, P1, P2, A, m1, m2, m3, m4, a_buf,
                 rows, rmask, POLICY_LAYERS, POLICY_ACT, POLICY_OUT_ACT, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
            _copy_strided(out_actions + t * A, H * A, a_buf, A, A, rows, rmask, BLOCK_M, BLOCK_N)
            a_src = a_buf
            lda = A
        # the prior step (input layer, cell, prior head, sample) into slot 1 - cur
        _prior_fwd(z_cur, a_src, lda, h_cur, noise_ptr + t * S, H * S, seed + t, h_next, z_next, S,
                   out_mean + t * S, out_std + t * S, H * S,
                   w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2,
                   b_p2, x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw,
                   S, A, D, HD, rows, rmask, CELL, ACT, NORM, NOISE, STD_MODE, MIN_STD, EPS, UPDATE_BIAS,
                   HAS_B_IN, HAS_B_C1, HAS_B_C2, HAS_B_P1, False, WRITE_STATE, False, True,
                   COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S)
        tl.debug_barrier()
        if WRITE_STATE:
            _copy_strided(out_stoch + t * S, H * S, z_next, S, S, rows, rmask, BLOCK_M, BLOCK_N)
            if HAS_D:
                _copy_strided(out_deter + t * D, H * D, h_next, D, D, rows, rmask, BLOCK_M, BLOCK_N)
        if WRITE_FEAT:
            _copy_strided(out_feat + t * F, H * F, z_next, S, S, rows, rmask, BLOCK_M, BLOCK_N)
            if HAS_D:
                _copy_strided(out_feat + t * F + S, H * F, h_next, D, D, rows, rmask, BLOCK_M, BLOCK_N)
        if REWARD > 0:
            _mlp(z_next, S, h_next, D, HAS_D, rw1, rb1, rw2, rb2, rw3, rb3, R1, R2, 1, m1, m2, m3, m4, r_buf,
                 rows, rmask, REWARD_LAYERS, REWARD_ACT, REWARD_OUT_ACT, COMPUTE, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
            r = tl.load(r_buf + rows, mask=rmask, other=0.0)
            if REWARD == 1:
                tl.store(out_reward + rows * H + t, r.to(out_reward.dtype.element_ty), mask=rmask)
            else:
                ret += r
        tl.debug_barrier()
    last = H % 2
    _copy_strided(out_final_stoch, S, zbuf + last * slot_s, S, S, rows, rmask, BLOCK_M, BLOCK_N)
    if HAS_D:
        _copy_strided(out_final_deter, D, hbuf + last * slot_d, D, D, rows, rmask, BLOCK_M, BLOCK_N)
    if REWARD == 2:
        tl.store(out_return + rows, ret.to(out_return.dtype.element_ty), mask=rmask)


# --------------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, BLOCK_K), biggest row block first. Each program reads every weight from L2 once per step for its
# BLOCK_M rows, so a step does about BLOCK_M multiply-adds per weight read: at 16 rows the L2 bandwidth, not the tensor
# cores, bounds a large imagination launch; bigger blocks lift that bound as long as the grid still covers every SM.
# The tiles are those the sm_90 compile (benchmarks.aot, 32/512/512, 8 warps) shows without register spills in bf16;
# the closed loop (a policy MLP in the loop) spills above 32 rows. 16 rows take 32 x 16 product tiles: with the
# 64 x 32 of the step kernels, the bf16 LayerNorm-GRU rollout at PlaNet's sizes (30/200/200) kept 288-568 bytes per
# thread on the stack, with 32 x 16 0-192.
# float32 (IEEE products) and float64 run their products on the FMA path, not the tensor cores, and stop at 32 rows
# with 16 x 16 product tiles: there a 4-byte weight read feeds 32 multiply-adds (16 flops per byte), so the FMA units'
# peak (about 67 TFLOP/s fp32 on an H100, NVIDIA's figure) needs only about 4 TB/s of L2 reads, while the bigger row
# blocks spill heavily in fp32. sm_90 stack per thread, fp32, open loop (imagination, and the planners' return-only
# launch): with the bf16 tiles, GRU at 30/200/200 320-864 bytes at 64 and 128 rows and 88-104 at 32 x 32 x 32;
# LayerNorm GRU there 1,104-1,992 and 496-544; at 32/512/512 64-112 and 32-64. 32 x 16 x 16 compiles without spills
# at both sizes for every cell kind but the LayerNorm GRU at 30/200/200 (104-184 bytes).
# bf16 / fp16 take the same tiles where deter or hidden is not a multiple of 64: at 30/200/200 the 64- and 128-row
# blocks spill 328-1,880 bytes per thread (GRU 720-1,224, LayerNorm GRU 1,144-1,880), 32 x 32 x 32 144-488 (GRU,
# LayerNorm GRU), 32 x 16 x 16 none (GRU, no cell) or 88-104 (LayerNorm GRU). Only 200 and 512 were compiled.
# A reward MLP in the kernel (imagine_return, the planners' return-only launch) also stops at 32 rows: bf16, LayerNorm
# GRU at 32/512/512 with the bench's 2-layer reward MLP, 8 warps, sm_90: 296 bytes per thread on the stack at
# 128 x 16 x 16, 320 at 64 x 32 x 32, none at 32 x 32 x 32 (benchmarks.aot --session, 2026-12-01).
# Not yet timed on a GPU: benchmarks.tune times the tiles.
_OPEN_LOOP_TILES = ((128, 16, 16), (64, 32, 32), (32, 32, 32))
_FMA_TILES = ((32, 16, 16),)
_CLOSED_LOOP_TILES = ((32, 32, 32),)
_REWARD_TILES = ((32, 32, 32),)
_SMALL_TILES = (16, 32, 16)


def _tile_candidates(closed_loop: bool, narrow: bool, reward: bool = False) -> tuple[tuple[int, int, int], ...]:
    """The tiles a GPU launch picks from when it has rows enough (biggest row block first); else ``_SMALL_TILES``.
    ``narrow``: at most 32 rows (see :func:`_narrow`); ``reward``: a reward MLP runs in the kernel (at most 32
    rows too)."""
    if closed_loop:
        return _CLOSED_LOOP_TILES
    return _FMA_TILES if narrow else _REWARD_TILES if reward else _OPEN_LOOP_TILES


def _narrow(dtype: torch.dtype, device: torch.device, d: int, hd: int) -> bool:
    """Whether a rollout stops at 32-row blocks: float32 with IEEE products and float64 (the FMA path), or a deter
    or hidden width that is not a multiple of 64 (see the comment above)."""
    fma = dtype == torch.float64 or (dtype == torch.float32 and _prec(dtype, device) == "ieee")
    return fma or d % 64 != 0 or hd % 64 != 0


def _rollout_tiles(n: int, device: torch.device, closed_loop: bool, narrow: bool = False,
                   reward: bool = False, sms: int | None = None) -> tuple[int, int, int]:
    """The row block and the product tiles of an n-row rollout: the biggest row block that still gives every SM a
    program, else 16 rows (tl.dot needs >= 16). ``sms``: the SM count to plan for instead of the device's (a CPU
    device, or none given, takes 16 rows)."""
    if sms is None:
        if device.type != "cuda":
            return _SMALL_TILES
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    for tiles in _tile_candidates(closed_loop, narrow, reward):
        if triton.cdiv(n, tiles[0]) >= sms:
            return tiles
    return _SMALL_TILES


def rollout_fwd(
    z0: torch.Tensor, h0: torch.Tensor, actions: torch.Tensor | None, horizon: int,
    noise: torch.Tensor | None, seed: torch.Tensor | None, w: list[torch.Tensor | None], *,
    cell: int, act: int, norm: bool, std_mode: int, min_std: float, eps: float, update_bias: float = -1.0,
    policy: tuple | None = None, reward: tuple | None = None, reward_sum: bool = False,
    write_state: bool = True, write_feat: bool = False,
) -> dict[str, torch.Tensor]:
    """H prior steps in one launch on contiguous inputs. ``policy`` / ``reward`` are packed MLPs
    ``(weights [(w, b) x L], act_id, out_act_id)``; ``actions`` [N, H, A] when ``policy`` is None.

    Returns a dict with "final_deter" [N, D], "final_stoch" [N, S] and, as asked, "deter", "stoch", "mean", "std"
    [N, H, ...], "features" [N, H, S + D], "actions" [N, H, A] (closed loop), "reward" [N, H] or "return" [N]."""
    (w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
     *_posterior) = w
    n, s = z0.shape
    d, hd, h = h0.shape[1], w_in.shape[0], int(horizon)
    a_dim = w_in.shape[1] - s
    dt, cdt = z0.dtype, compute_dtype(z0.dtype)
    r_dt = torch.float64 if dt == torch.float64 else torch.float32

    def buf(shape: tuple[int, ...], dtype: torch.dtype = cdt) -> torch.Tensor:
        return empty(shape, like=z0, dtype=dtype)

    out: dict[str, torch.Tensor] = {"final_deter": buf((n, d), dt), "final_stoch": buf((n, s), dt)}
    if write_state:
        out.update(deter=buf((n, h, d), dt), stoch=buf((n, h, s), dt), mean=buf((n, h, s), dt), std=buf((n, h, s), dt))
    if write_feat:
        out["features"] = buf((n, h, s + d), dt)
    if policy is not None:
        out["actions"] = buf((n, h, a_dim), dt)
    if reward is not None:
        out["return" if reward_sum else "reward"] = buf((n,) if reward_sum else (n, h), r_dt)
    if n == 0 or h == 0:
        return out

    def mlp_args(packed: tuple | None) -> tuple[list[torch.Tensor], int, int, int, int, int]:
        if packed is None:
            return [z0] * 6, 0, 1, 1, 4, 4
        layers, act_id, out_act_id = packed
        flat: list[torch.Tensor] = []
        for wt, bs in layers:
            flat += [wt, bs]
        flat += [z0] * (6 - len(flat))
        widths = [wt.shape[0] for wt, _ in layers[:-1]] + [1, 1]
        return flat, len(layers), widths[0], widths[1], act_id, out_act_id

    pol, pol_layers, p1, p2, pol_act, pol_out = mlp_args(policy)
    rew, rew_layers, r1, r2, rew_act, rew_out = mlp_args(reward)
    width = max(p1, p2, r1, r2, a_dim, 1)
    x = z0

    def p(t: torch.Tensor | None) -> torch.Tensor:
        return x if t is None or t.numel() == 0 else t

    scratch = [buf((2, n, s)), buf((2, n, max(d, 1))), buf((n, hd)), buf((n,)), buf((n, hd)),
               buf((n, 3 * d)) if cell == 1 else x, buf((n,)), buf((n, hd)), buf((n,)), buf((n, hd)), buf((n, 2 * s)),
               buf((n, a_dim)), buf((n, width)), buf((n, width)), buf((n, width)), buf((n, width)), buf((n, 1))]
    narrow = _narrow(z0.dtype, z0.device, d, hd)
    block_m, block_n, block_k = _rollout_tiles(n, z0.device, policy is not None, narrow, reward is not None)
    _rollout_kernel[(triton.cdiv(n, block_m),)](
        z0, p(h0), p(actions), p(noise), p(seed),
        w_in, p(b_in), p(nw_in), p(nb_in), p(w_c1), p(w_c2), p(b_c1), p(b_c2), p(nw_c), p(nb_c),
        w_p1, p(b_p1), p(nw_p1), p(nb_p1), w_p2, b_p2,
        *pol, *rew, *scratch,
        p(out.get("deter")), p(out.get("stoch")), p(out.get("mean")), p(out.get("std")), p(out.get("features")),
        p(out.get("actions")), p(out.get("reward")), p(out.get("return")), p(out["final_deter"]), out["final_stoch"],
        n, h, s, a_dim, d, hd, p1, p2, r1, r2,
        CELL=cell, ACT=act, NORM=norm, STD_MODE=std_mode, MIN_STD=float(min_std), EPS=float(eps),
        UPDATE_BIAS=float(update_bias), NOISE=1 if noise is not None else 2,
        HAS_B_IN=b_in is not None, HAS_B_C1=b_c1 is not None, HAS_B_C2=b_c2 is not None, HAS_B_P1=b_p1 is not None,
        OPEN_LOOP=policy is None, POLICY_LAYERS=pol_layers, POLICY_ACT=pol_act, POLICY_OUT_ACT=pol_out,
        REWARD=0 if reward is None else (2 if reward_sum else 1), REWARD_LAYERS=rew_layers, REWARD_ACT=rew_act,
        REWARD_OUT_ACT=rew_out, WRITE_STATE=write_state, WRITE_FEAT=write_feat,
        COMPUTE=_compute_dtype(dt), PREC=_prec(dt, z0.device), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_S=_block_s(s), num_warps=NUM_WARPS_STEP,
    )
    return out
