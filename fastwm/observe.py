"""``RSSM.observe`` fused: the whole sequence in one forward time loop and one reverse-time backward loop.

The custom op ``fastwm::rssm_observe`` runs ``fastwm.kernels.observe`` on time-major [T, B, ...] tensors (the loop,
plus what does not depend on the recurrence batched over all T x B rows); its backward
(``fastwm::rssm_observe_backward``) returns the gradients of the inputs and every layer's pre-activation gradient for
all T x B row-steps, from which the weight gradients are one matrix product per parameter over all T x B rows
(:func:`fastwm.step_ops.weight_grads`, deterministic). With ``recompute`` the forward keeps only each step's input
state and the backward rebuilds the rest in one step launch over all rows (:func:`saved_bytes` counts what is kept).
:meth:`fastwm.RSSM.observe` calls :func:`fused_observe` on the Triton backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._amp import without_autocast
from ._validation import check_generator
from .step_ops import (
    _ACT_IDS,
    _CELL_IDS,
    _STD_IDS,
    _UPDATE_BIAS,
    POST_OUTPUTS,
    PRIOR_OUTPUTS,
    _cdt,
    _present,
    _reached,
    _step_op,
    weight_grads,
)
from .step_ops import _N_OUT as _N_STEP_OUT

__all__ = ["fused_observe", "saved_bytes"]

_N_OUT = 8
_N_SAVED = 16


def _kernels():
    from .kernels import observe as kernels

    return kernels


_OBS_SCHEMA = (
    "(Tensor stoch0, Tensor deter0, Tensor action, Tensor embed, Tensor? first, Tensor? init_stoch, "
    "Tensor? init_deter, Tensor? noise, Tensor? prior_noise, Tensor seed, "
    "Tensor[] weights, int cell, int act, bool norm, int std_mode, float min_std, float eps, bool recompute) -> ("
    + ", ".join(["Tensor"] * (_N_OUT + _N_SAVED)) + ")"
)


@torch.library.custom_op("fastwm::rssm_observe", mutates_args=(), schema=_OBS_SCHEMA)
def _observe_op(stoch0, deter0, action, embed, first, init_stoch, init_deter, noise, prior_noise, seed, weights, cell,
                act, norm, std_mode, min_std, eps, recompute):
    return _kernels().observe_fwd(
        stoch0.contiguous(), deter0.contiguous(), action.contiguous(), embed.contiguous(),
        None if first is None else first.contiguous(), None if noise is None else noise.contiguous(),
        None if prior_noise is None else prior_noise.contiguous(), seed,
        [_present(w) for w in weights], cell=cell, act=act, norm=norm, std_mode=std_mode, min_std=min_std, eps=eps,
        update_bias=_UPDATE_BIAS, init=_init(init_stoch, init_deter, cell),
    )


def _init(init_stoch: Tensor | None, init_deter: Tensor | None, cell: int) -> tuple[Tensor, Tensor] | None:
    # the initial state a reset restores, as the kernels take it (None: zeros); cell "none" has no deter
    if init_stoch is None:
        if init_deter is not None:
            raise ValueError("rssm_observe: init_deter was given without init_stoch (give both, or neither for zeros)")
        return None
    if cell == 2:
        return init_stoch.contiguous(), init_stoch.new_empty(0)
    if init_deter is None:
        raise ValueError("rssm_observe: init_stoch needs init_deter: this cell has a deterministic state to reset")
    return init_stoch.contiguous(), init_deter.contiguous()


def _saved_shapes(t_len: int, b: int, cell: int, norm: bool, s: int, a: int, d: int, hd: int) -> list[tuple]:
    c_w = 4 * d if cell == 0 else 3 * d
    rstd = (t_len, b) if norm else (0,)
    return [(t_len, b, s), (t_len, b, d) if cell != 2 else (0,), (t_len, b, a), (t_len, b, hd), rstd,
            (t_len, b, hd), (t_len, b, c_w) if cell != 2 else (0,), (t_len, b) if cell == 1 else (0,),
            (t_len, b, hd), rstd, (t_len, b, hd), (t_len, b, 2 * s), (t_len, b, hd), rstd, (t_len, b, hd),
            (t_len, b, 2 * s)]


@_observe_op.register_fake
def _(stoch0, deter0, action, embed, first, init_stoch, init_deter, noise, prior_noise, seed, weights, cell, act, norm,
      std_mode, min_std, eps, recompute):
    t_len, b, a = action.shape
    s, d, hd = stoch0.shape[1], deter0.shape[1], weights[0].shape[0]
    dt, cdt = stoch0.dtype, _cdt(stoch0.dtype)
    outs = [stoch0.new_empty((t_len, b, d) if cell != 2 else (0,))]
    outs += [stoch0.new_empty((t_len, b, s)) for _ in range(6)]
    outs.append(stoch0.new_empty((t_len, b), dtype=cdt))
    saved = [stoch0.new_empty(shape, dtype=dt if i < 3 else cdt)
             for i, shape in enumerate(_saved_shapes(t_len, b, cell, norm, s, a, d, hd))]
    return tuple(outs + saved)


_OBS_BWD_SCHEMA = (
    "(Tensor stoch0, Tensor deter0, Tensor embed, Tensor? first, Tensor? noise, Tensor? prior_noise, Tensor seed, "
    "Tensor[] weights, "
    "Tensor[] saved, Tensor[] grads, int cell, int act, bool norm, int std_mode, float min_std, bool init) -> ("
    + ", ".join(["Tensor"] * 16) + ")"
)


@torch.library.custom_op("fastwm::rssm_observe_backward", mutates_args=(), schema=_OBS_BWD_SCHEMA)
def _observe_backward_op(stoch0, deter0, embed, first, noise, prior_noise, seed, weights, saved, grads, cell, act, norm,
                         std_mode, min_std, init):
    return _kernels().observe_bwd(
        stoch0.contiguous(), deter0.contiguous(), embed.contiguous(), None if first is None else first.contiguous(),
        None if noise is None else noise.contiguous(), None if prior_noise is None else prior_noise.contiguous(), seed,
        [_present(w) for w in weights], tuple(saved),
        tuple(g.contiguous() for g in grads), cell=cell, act=act, norm=norm, std_mode=std_mode, min_std=min_std,
        update_bias=_UPDATE_BIAS, init=init,
    )


@_observe_backward_op.register_fake
def _(stoch0, deter0, embed, first, noise, prior_noise, seed, weights, saved, grads, cell, act, norm, std_mode, min_std,
      init):
    t_len, b, e = embed.shape
    s, d, hd = stoch0.shape[1], deter0.shape[1], weights[0].shape[0]
    a = weights[0].shape[1] - s
    cdt = _cdt(stoch0.dtype)
    has_init = init and first is not None
    shapes = [(b, s), (b, d) if cell != 2 else (0,), (t_len, b, a), (t_len, b, e), (s,) if has_init else (0,),
              (d,) if has_init and cell != 2 else (0,),
              (t_len, b, hd), (t_len, b, hd) if norm else (0,), (t_len, b, 3 * d) if cell != 2 else (0,),
              (t_len, b, 3 * d) if cell != 2 else (0,), (t_len, b, 2 * s), (t_len, b, hd),
              (t_len, b, hd) if norm else (0,), (t_len, b, 2 * s), (t_len, b, hd), (t_len, b, hd) if norm else (0,)]
    return tuple(stoch0.new_empty(shape, dtype=cdt) for shape in shapes)


def _setup_context(ctx, inputs, output):
    (stoch0, deter0, action, embed, first, init_stoch, init_deter, noise, prior_noise, seed, weights, cell, act, norm,
     std_mode, min_std, eps, recompute) = inputs
    # h_in (each step's input deter) is not kept: it is the deter output shifted by one step, reset where is_first.
    # recompute: only z_in and a_in besides.
    z_in, _, a_in, *step_saved = output[_N_OUT:]
    saved = (z_in, a_in) if recompute else (z_in, a_in, *step_saved)
    has_init = init_stoch is not None and first is not None
    ctx.save_for_backward(stoch0, deter0, embed, first, init_deter if has_init else None, noise, prior_noise, seed,
                          output[0], *weights, *saved)
    ctx.has_init = has_init
    ctx.n_weights = len(weights)
    ctx.config = (cell, act, norm, std_mode, min_std, eps)
    ctx.set_materialize_grads(False)


def _recompute_saved(z_in: Tensor, h_in: Tensor, a_in: Tensor, embed: Tensor, seed: Tensor, weights: list[Tensor],
                     cell: int, act: int, norm: bool, std_mode: int, min_std: float, eps: float) -> list[Tensor]:
    """The 13 per-step buffers of the time loop, rebuilt from each step's saved input state: with (z_in, h_in, a_in)
    known for every (t, b), the steps no longer depend on one another, so this is ONE posterior-step launch over all
    T x B rows, no time loop. Its samples are thrown away (the backward regenerates the noise from the seed)."""
    t_len, b = embed.shape[:2]
    rows = t_len * b
    d = h_in.shape[-1] if h_in.dim() == 3 else 0  # cell "none" has no deter
    step = _step_op(z_in.reshape(rows, z_in.shape[-1]), a_in.reshape(rows, a_in.shape[-1]), h_in.reshape(rows, d),
                    embed.reshape(rows, embed.shape[-1]), None, None, seed, weights, cell, act, norm, True, std_mode,
                    min_std, eps)
    # [T * B, ...] -> [T, B, ...]; an absent buffer (shape [0]) stays as it is (B = 0: only the 2-d ones are real)
    return [t.view(t_len, b, *t.shape[1:]) if t.numel() or (rows == 0 and t.dim() >= 2) else t
            for t in step[_N_STEP_OUT:]]


def _backward(ctx, *grads):
    n_w = ctx.n_weights
    stoch0, deter0, embed, first, init_deter, noise, prior_noise, seed, hs, *rest = ctx.saved_tensors
    weights, saved = rest[:n_w], rest[n_w:]
    cell, act, norm, std_mode, min_std, eps = ctx.config
    z_in, a_in, *step_saved = saved
    h_in = hs
    if cell != 2:  # the kernel's own _reset_copy: a select, exact in every dtype
        h_in = torch.cat([deter0[None], hs[:-1]])
        if first is not None:
            reset = init_deter.to(h_in.dtype) if ctx.has_init else h_in.new_zeros(())
            h_in = torch.where(first[..., None] != 0, reset, h_in)
    if not step_saved:  # recompute
        step_saved = _recompute_saved(z_in, h_in, a_in, embed, seed, list(weights), cell, act, norm, std_mode, min_std,
                                      eps)
    saved = [z_in, h_in, a_in, *step_saved]
    t_len, b, _ = embed.shape
    s, d = stoch0.shape[1], deter0.shape[1]
    shapes = [(t_len, b, d) if cell != 2 else (0,)] + [(t_len, b, s)] * 6 + [(t_len, b)]
    g_list = []
    for i, shape in enumerate(shapes):
        g = grads[i]
        if g is None:  # no gradient flowed into this output: zeros (the kernel reads every one)
            g = stoch0.new_zeros(shape, dtype=_cdt(stoch0.dtype) if i == 7 else stoch0.dtype)
        g_list.append(g)
    d_z0, d_h0, d_a, d_e, d_iz, d_ih, *d_pre = _observe_backward_op(stoch0, deter0, embed, first, noise, prior_noise,
                                                                      seed, list(weights), list(saved), g_list, cell,
                                                                      act, norm, std_mode, min_std, ctx.has_init)
    rows = t_len * b

    def flat(t: Tensor) -> Tensor:  # [T, B, ...] -> [T * B, ...]; an absent one (shape [0]) stays as it is
        return t.reshape(rows, *t.shape[2:]) if t.dim() >= 2 else t

    # The posterior at step t feeds every later step: past one step, any gradient reaches the posterior head.
    post_used = _reached(grads, POST_OUTPUTS) or (t_len > 1 and _reached(grads, range(_N_OUT)))
    gw = weight_grads(cell, norm, True, weights, [flat(t) for t in step_saved], flat(z_in), flat(a_in), flat(h_in),
                      flat(embed), flat(hs), [flat(t) for t in d_pre], prior_used=_reached(grads, PRIOR_OUTPUTS),
                      post_used=post_used)
    dt = stoch0.dtype
    if first is not None:
        d_a = d_a * (first == 0).to(d_a.dtype)[..., None]  # a reset step's action was zeroed: no gradient
    d_init = (d_iz.to(dt), d_ih.to(dt) if cell != 2 else None) if ctx.has_init else (None, None)
    return (d_z0.to(dt), d_h0.to(dt) if cell != 2 else None, d_a.to(dt), d_e.to(dt), None, *d_init, None, None, None,
            gw, None, None, None, None, None, None, None)


_observe_op.register_autograd(without_autocast(_backward), setup_context=_setup_context)


def saved_bytes(rssm, *, recompute: bool = False) -> int:
    """Bytes the fused :meth:`fastwm.RSSM.observe` keeps for its backward per row-step (one sequence at one step),
    beyond the inputs and the outputs the caller holds.

    Always: the deter output in time-major order (the backward rebuilds each step's input deter from it) and each
    step's input stoch and action, in the parameters' dtype. Without ``recompute`` also every layer's
    pre-activation, activation and LayerNorm 1/std, the GRU gates and both heads' raw outputs, in the compute dtype
    (float32, or float64 for float64); with it, the backward rebuilds those in one launch over all rows. Not per
    row-step: the 16-byte seed, and with ``is_first`` one byte per row-step for the reset flags."""
    cfg, w = rssm.config, rssm.inp.weight
    cell, s, a, d, hd = _CELL_IDS[cfg.cell], rssm.stoch, rssm.action_dim, rssm.deter, rssm.hidden
    shapes = _saved_shapes(1, 1, cell, bool(cfg.norm), s, a, d, hd)
    sizes = [w.element_size()] * 3 + [torch.empty(0, dtype=_cdt(w.dtype)).element_size()] * (_N_SAVED - 3)
    kept = (0, 2) if recompute else (0, *range(2, _N_SAVED))  # h_in is rebuilt from the deter output
    return d * w.element_size() + sum(math.prod(shapes[i]) * sizes[i] for i in kept if shapes[i] != (0,))


def fused_observe(cfg: reference.StepConfig, w: reference.StepWeights, stoch0: Tensor, deter0: Tensor,
                  embed: Tensor, action: Tensor, is_first: Tensor | None, noise: Tensor | None,
                  prior_noise: Tensor | None, generator: torch.Generator | None,
                  recompute: bool = False, init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, ...]:
    """observe on batch-first inputs embed [B, T, E], action [B, T, A], is_first [B, T] (bool) or None, noise and
    prior_noise [B, T, S] or None -> batch-first contiguous (deter, post stoch, mean, std, prior stoch, mean, std,
    kl [B, T]). ``recompute``: keep only each step's input state for the backward (see :func:`saved_bytes`).
    ``init``: the state (stoch [S], deter [D], in stoch0's dtype) an is_first reset restores, differentiable
    (RSSM's learned initial state); None: zeros."""
    check_generator(generator)
    if noise is not None and prior_noise is not None:  # nothing to draw: the random state stays as it is
        seed = stoch0.new_zeros(2, dtype=torch.int64)
    else:
        device = stoch0.device if generator is None else generator.device
        seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=generator).to(stoch0.device)
    weights = [stoch0.new_empty(0) if t is None else t for t in w]
    first = None if is_first is None else is_first.transpose(0, 1).to(torch.int8).contiguous()
    init_stoch, init_deter = (None, None) if init is None else init
    out = _observe_op(stoch0, deter0, action.transpose(0, 1), embed.transpose(0, 1), first, init_stoch,
                      None if cfg.cell == "none" else init_deter, None if noise is None else noise.transpose(0, 1),
                      None if prior_noise is None else prior_noise.transpose(0, 1), seed, weights, _CELL_IDS[cfg.cell],
                      _ACT_IDS[cfg.act], bool(cfg.norm), _STD_IDS[cfg.std_mode], float(cfg.min_std), float(cfg.eps),
                      bool(recompute))
    hs, zp, pm, ps, zq, qm, qs, kl = out[:_N_OUT]
    b, t_len = embed.shape[:2]
    deter = hs.transpose(0, 1).contiguous() if cfg.cell != "none" else deter0.new_zeros(b, t_len, 0)
    return (deter, *(t.transpose(0, 1).contiguous() for t in (zq, qm, qs, zp, pm, ps, kl)))
