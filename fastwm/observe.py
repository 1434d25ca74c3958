"""``RSSM.observe`` fused: the whole sequence in one forward launch and one reverse-time backward launch.

The custom op ``fastwm::rssm_observe`` runs ``fastwm.kernels.observe`` on time-major [T, B, ...] tensors; its backward
(``fastwm::rssm_observe_backward``) returns the gradients of the inputs and every layer's pre-activation gradient for
all T x B row-steps, from which the weight gradients are one matrix product per parameter over all T x B rows
(:func:`fastwm.step_ops.weight_grads`, deterministic). :meth:`fastwm.RSSM.observe` calls :func:`fused_observe` on the
Triton backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .step_ops import _ACT_IDS, _CELL_IDS, _STD_IDS, _UPDATE_BIAS, _cdt, _present, weight_grads

__all__ = ["fused_observe"]

_N_OUT = 8
_N_SAVED = 16


def _kernels():
    from .kernels import observe as kernels

    return kernels


_OBS_SCHEMA = (
    "(Tensor stoch0, Tensor deter0, Tensor action, Tensor embed, Tensor? first, Tensor? noise, Tensor? prior_noise, "
    "Tensor seed, "
    "Tensor[] weights, int cell, int act, bool norm, int std_mode, float min_std, float eps) -> ("
    + ", ".join(["Tensor"] * (_N_OUT + _N_SAVED)) + ")"
)


@torch.library.custom_op("fastwm::rssm_observe", mutates_args=(), schema=_OBS_SCHEMA)
def _observe_op(stoch0, deter0, action, embed, first, noise, prior_noise, seed, weights, cell, act, norm, std_mode,
                min_std, eps):
    return _kernels().observe_fwd(
        stoch0.contiguous(), deter0.contiguous(), action.contiguous(), embed.contiguous(),
        None if first is None else first.contiguous(), None if noise is None else noise.contiguous(),
        None if prior_noise is None else prior_noise.contiguous(), seed,
        [_present(w) for w in weights], cell=cell, act=act, norm=norm, std_mode=std_mode, min_std=min_std, eps=eps,
        update_bias=_UPDATE_BIAS,
    )


def _saved_shapes(t_len: int, b: int, cell: int, norm: bool, s: int, a: int, d: int, hd: int) -> list[tuple]:
    c_w = 4 * d if cell == 0 else 3 * d
    rstd = (t_len, b) if norm else (0,)
    return [(t_len, b, s), (t_len, b, d) if cell != 2 else (0,), (t_len, b, a), (t_len, b, hd), rstd,
            (t_len, b, hd), (t_len, b, c_w) if cell != 2 else (0,), (t_len, b) if cell == 1 else (0,),
            (t_len, b, hd), rstd, (t_len, b, hd), (t_len, b, 2 * s), (t_len, b, hd), rstd, (t_len, b, hd),
            (t_len, b, 2 * s)]


@_observe_op.register_fake
def _(stoch0, deter0, action, embed, first, noise, prior_noise, seed, weights, cell, act, norm, std_mode, min_std, eps):
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
    "Tensor[] saved, Tensor[] grads, int cell, int act, bool norm, int std_mode, float min_std) -> ("
    + ", ".join(["Tensor"] * 14) + ")"
)


@torch.library.custom_op("fastwm::rssm_observe_backward", mutates_args=(), schema=_OBS_BWD_SCHEMA)
def _observe_backward_op(stoch0, deter0, embed, first, noise, prior_noise, seed, weights, saved, grads, cell, act, norm,
                         std_mode, min_std):
    return _kernels().observe_bwd(
        stoch0.contiguous(), deter0.contiguous(), embed.contiguous(), None if first is None else first.contiguous(),
        None if noise is None else noise.contiguous(), None if prior_noise is None else prior_noise.contiguous(), seed,
        [_present(w) for w in weights], tuple(saved),
        tuple(g.contiguous() for g in grads), cell=cell, act=act, norm=norm, std_mode=std_mode, min_std=min_std,
        update_bias=_UPDATE_BIAS,
    )


@_observe_backward_op.register_fake
def _(stoch0, deter0, embed, first, noise, prior_noise, seed, weights, saved, grads, cell, act, norm, std_mode, min_std):
    t_len, b, e = embed.shape
    s, d, hd = stoch0.shape[1], deter0.shape[1], weights[0].shape[0]
    a = weights[0].shape[1] - s
    cdt = _cdt(stoch0.dtype)
    shapes = [(b, s), (b, d) if cell != 2 else (0,), (t_len, b, a), (t_len, b, e),
              (t_len, b, hd), (t_len, b, hd) if norm else (0,), (t_len, b, 3 * d) if cell != 2 else (0,),
              (t_len, b, 3 * d) if cell != 2 else (0,), (t_len, b, 2 * s), (t_len, b, hd),
              (t_len, b, hd) if norm else (0,), (t_len, b, 2 * s), (t_len, b, hd), (t_len, b, hd) if norm else (0,)]
    return tuple(stoch0.new_empty(shape, dtype=cdt) for shape in shapes)


def _setup_context(ctx, inputs, output):
    stoch0, deter0, action, embed, first, noise, prior_noise, seed, weights, cell, act, norm, std_mode, min_std, eps = \
        inputs
    ctx.save_for_backward(stoch0, deter0, embed, first, noise, prior_noise, seed, output[0], *weights,
                          *output[_N_OUT:])
    ctx.n_weights = len(weights)
    ctx.config = (cell, act, norm, std_mode, min_std)
    ctx.set_materialize_grads(False)


def _backward(ctx, *grads):
    n_w = ctx.n_weights
    stoch0, deter0, embed, first, noise, prior_noise, seed, hs, *rest = ctx.saved_tensors
    weights, saved = rest[:n_w], rest[n_w:]
    cell, act, norm, std_mode, min_std = ctx.config
    t_len, b, _ = embed.shape
    s, d = stoch0.shape[1], deter0.shape[1]
    shapes = [(t_len, b, d) if cell != 2 else (0,)] + [(t_len, b, s)] * 6 + [(t_len, b)]
    g_list = []
    for i, shape in enumerate(shapes):
        g = grads[i]
        if g is None:  # no gradient flowed into this output: zeros (the kernel reads every one)
            g = stoch0.new_zeros(shape, dtype=_cdt(stoch0.dtype) if i == 7 else stoch0.dtype)
        g_list.append(g)
    d_z0, d_h0, d_a, d_e, *d_pre = _observe_backward_op(stoch0, deter0, embed, first, noise, prior_noise, seed,
                                                          list(weights), list(saved), g_list, cell, act, norm,
                                                          std_mode, min_std)
    z_in, h_in, a_in, *step_saved = saved
    rows = t_len * b

    def flat(t: Tensor) -> Tensor:
        return t.reshape(rows, *t.shape[2:]) if t.numel() else t

    gw = weight_grads(cell, norm, True, weights, [flat(t) for t in step_saved], flat(z_in), flat(a_in), flat(h_in),
                      flat(embed), flat(hs), [flat(t) for t in d_pre])
    dt = stoch0.dtype
    if first is not None:
        d_a = d_a * (first == 0).to(d_a.dtype)[..., None]  # a reset step's action was zeroed: no gradient
    return (d_z0.to(dt), d_h0.to(dt) if cell != 2 else None, d_a.to(dt), d_e.to(dt), None, None, None, None, gw,
            None, None, None, None, None, None)


_observe_op.register_autograd(_backward, setup_context=_setup_context)


def fused_observe(cfg: reference.StepConfig, w: reference.StepWeights, stoch0: Tensor, deter0: Tensor,
                  embed: Tensor, action: Tensor, is_first: Tensor | None, noise: Tensor | None,
                  prior_noise: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, ...]:
    """observe on batch-first inputs embed [B, T, E], action [B, T, A], is_first [B, T] (bool) or None, noise and
    prior_noise [B, T, S] or None -> batch-first contiguous (deter, post stoch, mean, std, prior stoch, mean, std,
    kl [B, T])."""
    device = stoch0.device if generator is None else generator.device
    seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=generator).to(stoch0.device)
    weights = [stoch0.new_empty(0) if t is None else t for t in w]
    first = None if is_first is None else is_first.transpose(0, 1).to(torch.int8).contiguous()
    out = _observe_op(stoch0, deter0, action.transpose(0, 1), embed.transpose(0, 1), first,
                      None if noise is None else noise.transpose(0, 1),
                      None if prior_noise is None else prior_noise.transpose(0, 1), seed, weights, _CELL_IDS[cfg.cell],
                      _ACT_IDS[cfg.act], bool(cfg.norm), _STD_IDS[cfg.std_mode], float(cfg.min_std), float(cfg.eps))
    hs, zp, pm, ps, zq, qm, qs, kl = out[:_N_OUT]
    b, t_len = embed.shape[:2]
    deter = hs.transpose(0, 1).contiguous() if cfg.cell != "none" else deter0.new_zeros(b, t_len, 0)
    return (deter, *(t.transpose(0, 1).contiguous() for t in (zq, qm, qs, zp, pm, ps, kl)))
