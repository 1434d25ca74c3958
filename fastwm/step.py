"""The RSSM step, functional: the prior step and the posterior step, each one fused Triton launch forward and one
backward (plus the weight gradients as a few matrix products over the batch).

:class:`fastwm.RSSM` calls these; they take the step's :class:`fastwm.reference.StepConfig` and
:class:`fastwm.reference.StepWeights` and dispatch on the active backend like every fastwm op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import use_triton
from ._validation import check_generator, check_values

__all__ = ["prior_step", "posterior_step"]


def _noise(noise: Tensor | None, like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Noise is a constant of the step on both backends: no gradient flows into a given noise tensor.
    if noise is not None:
        return noise.detach()
    device = like.device if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _values(stoch: Tensor, action: Tensor, deter: Tensor, embed: Tensor | None = None, noise: Tensor | None = None,
            prior_noise: Tensor | None = None) -> None:
    check_values({"state.stoch": stoch, "action": action, "state.deter": deter, "embed": embed, "noise": noise,
                  "prior_noise": prior_noise})


def prior_step(
    cfg: reference.StepConfig,
    w: reference.StepWeights,
    stoch: Tensor,
    action: Tensor,
    deter: Tensor,
    noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
    seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One prior step: stoch [B, S], action [B, A], deter [B, D] -> (deter' [B, D], stoch' [B, S], mean, std).

    ``noise`` [B, S] is used for the sample when given (as a constant: no gradient flows into it); otherwise the
    kernels draw it from a seed taken from ``generator`` (the reference backend draws it with torch.randn).
    ``validate=False`` skips the value checks (see :func:`fastwm.set_validate_args`): for a caller that has checked
    these values already, such as a time loop that checked its whole sequence once. ``seed`` (Triton backend, no
    noise given): the int64 seeds [2] on the device to draw with instead of drawing them from ``generator``, so
    that a time loop can give step t the seed the whole-horizon kernel gives it."""
    check_generator(generator)
    if noise is not None and generator is not None:
        raise ValueError("give either noise or generator, not both (the generator only draws noise)")
    if validate:
        _values(stoch, action, deter, noise=noise)
    if use_triton(stoch):
        from .step_ops import fused_prior_step

        return fused_prior_step(cfg, w, stoch, action, deter, noise, generator, None if noise is not None else seed)
    return reference.rssm_prior_step(cfg, w, stoch, action, deter, _noise(noise, stoch, generator))


def posterior_step(
    cfg: reference.StepConfig,
    w: reference.StepWeights,
    stoch: Tensor,
    action: Tensor,
    deter: Tensor,
    embed: Tensor,
    noise: Tensor | None = None,
    prior_noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> tuple[Tensor, ...]:
    """One posterior step: the prior step, the posterior head on [h', embed], both samples and KL(q || p).

    Returns (deter', post_stoch, post_mean, post_std, prior_stoch, prior_mean, prior_std, kl [B]). ``validate`` as
    in :func:`prior_step`."""
    check_generator(generator)
    if noise is not None and prior_noise is not None and generator is not None:
        raise ValueError("give either noise and prior_noise or generator, not all three (the generator only draws "
                         "noise)")
    if validate:
        _values(stoch, action, deter, embed, noise, prior_noise)
    if use_triton(stoch):
        from .step_ops import fused_posterior_step

        return fused_posterior_step(cfg, w, stoch, action, deter, embed, noise, prior_noise, generator)
    return reference.rssm_posterior_step(cfg, w, stoch, action, deter, embed, _noise(noise, stoch, generator),
                                         _noise(prior_noise, stoch, generator))
