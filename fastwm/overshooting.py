"""Latent overshooting (PlaNet): the KL between the posterior and the prior rolled open loop several steps ahead.

The ELBO's KL term compares the posterior q(z_t | o_<=t) with the one-step prior p(z_t | z_{t-1}, a_{t-1}). PlaNet's
latent overshooting adds the same comparison for priors predicted d > 1 steps ahead with no observation in between,
so that multi-step imagination is trained too (Hafner et al. 2019, section 4; google-research/planet's
``tools/overshooting.py`` and the ``overshooting`` objective of ``training/utility.py``)::

    L_os = mean over d in 2..D and the batch of  mean over t of  f(KL(sg(q_t) || p_d(z_t)))

where p_d(z_t) starts from the state before step t - d + 1, as observe saw it (the posterior at t - d; the given
initial state before step 0; :meth:`RSSM.initial` at a reset), and applies the prior step d times with the actions
a_{t-d+1}, ..., a_t, sampling each step's latent from its prior; f is the free-nats rule of the one-step term, applied
to each (t, d) term before the means: max(0, KL - free) (``mode="shifted"``, google-research/planet's current code,
as its one-step KL) or max(free, KL) (``mode="per_step"``, its first release). max(free, x) = free + max(0, x - free),
so the two always differ by exactly ``free`` and have the same gradient. ``sg`` stops the gradient into the target
posterior (PlaNet's ``os_stop_posterior_grad``, on by default there); the start of each open-loop rollout keeps its
gradient, so the overshooting term trains the posterior that begins it as well as the prior steps. The d = 1 term
is the ELBO's own KL and is not included: add ``scale * latent_overshooting_kl(...)`` to the sequence ELBO's loss
(PlaNet's ``overshooting_scale``).

Counting: PlaNet's ``overshooting_distance`` is ``distance`` here (its rollouts predict 2 to that many steps ahead;
its first release's ``overshooting`` setting D' went to D' + 1). A rollout that would pass the end of the sequence or
a reset (``is_first``) is left out.

Averaging: each (sequence, d) pair is the mean over its valid t, then the pairs are averaged, as PlaNet's first
release did (there, each masked term also added ``free`` to the sum before the division by the valid count: a shift
of the value, not the gradient, that fastwm leaves out). With T = D = 50 the longest distance, one valid t, weighs
as much as d = 2 with its 49: a flat mean over every valid (b, t, d) would give it about 1/49 of that, so scales
tuned for one reduction do not carry over to the other. PlaNet's current code takes a flat mean over all positions
and does not apply the mask it computes (its padded targets have zero std), with the overshooting scale 0 by
default.

All rollouts run as one batch through :meth:`fastwm.RSSM.imagine`: min(D, T) prior steps over the B x T starts, each
one fused prior-step kernel on the Triton backend, forward and backward (one launch for the whole horizon when no
gradient is needed). Starts with no valid term (the last step, the step before a reset) run from the initial state,
so that whatever they hold cannot reach the result or its gradient; about half of the B x T x K steps are discarded
when D is near T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_generator, check_values
from .gaussian import gaussian_kl
from .kl import _check_scalar
from .rssm import RSSM, State, check_is_first

__all__ = ["OVERSHOOTING_MODES", "latent_overshooting_kl", "overshooting_rollouts"]

#: The free-nats rules of :func:`latent_overshooting_kl`, named as :func:`fastwm.kl_loss`'s modes.
OVERSHOOTING_MODES = ("shifted", "per_step")


def _args(rssm: object, post: object, action: object, distance: object, is_first: object, state: object,
          noise: object) -> tuple[State, Tensor, int, int, int, Tensor, State, State]:
    """Every argument checked: (post, action, B, T, K, is_first as bool [B, T], the state before step 0, the state
    a reset restores: RSSM.initial in post's dtype, the learned one computed once for both)."""
    if not isinstance(rssm, RSSM):
        raise TypeError(f"rssm must be a fastwm.RSSM, got {type(rssm).__name__}")
    if not isinstance(post, State):
        if not (isinstance(post, tuple) and len(post) == 4):
            raise TypeError(f"post must be a fastwm.State with [B, T, ...] fields (what RSSM.observe returns), got "
                            f"{type(post).__name__}")
        post = State(*post)
    if not isinstance(post.stoch, Tensor) or post.stoch.dim() != 3:
        got = list(post.stoch.shape) if isinstance(post.stoch, Tensor) else type(post.stoch).__name__
        raise ValueError(f"post.stoch must have shape [B, T, {rssm.stoch}], got {got}")
    b, t_len = post.stoch.shape[:2]
    widths = {"deter": rssm.deter, "stoch": rssm.stoch, "mean": rssm.stoch, "std": rssm.stoch}
    amp = rssm._amp()  # under autocast: everything in its dtype, as observe returned the posterior
    post = State(*(rssm._check_input(f"post.{n}", part, widths[n], (b, t_len), amp)
                   for n, part in zip(State._fields, post)))
    action = rssm._check_input("action", action, rssm.action_dim, (b, t_len), amp)
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 2:
        raise ValueError(f"distance must be an int >= 2 (the longest open-loop prediction, in steps; 1 is the ELBO's "
                         f"own KL), got {distance!r}")
    first = check_is_first(is_first, b, t_len, post.stoch.device)
    if first is None:
        first = torch.zeros(b, t_len, dtype=torch.bool, device=post.stoch.device)
    k_len = min(distance, t_len)
    reset = rssm._initial(b, amp)
    init = reset if state is None else rssm._check_state(state, amp=amp)
    if init.stoch.shape[0] != b:
        raise ValueError(f"state must have batch size {b} (from post), got {init.stoch.shape[0]}")
    if noise is not None:
        noise = rssm._check_input("noise", noise, rssm.stoch, (b, t_len, k_len), amp)
    check_values({"post.deter": post.deter, "post.stoch": post.stoch, "post.mean": post.mean, "action": action,
                  "noise": noise}, {"post.std": post.std})
    return post, action, b, t_len, k_len, first, init, reset


def _rollouts(rssm: RSSM, post: State, action: Tensor, first: Tensor, init: State, reset: State, k_len: int,
              noise: Tensor | None, generator: torch.Generator | None,
              used: Tensor | None = None) -> tuple[State, Tensor]:
    """overshooting_rollouts on checked arguments; ``used`` [B, T] bool: the other starts run from the initial state
    (their outputs are not to be used)."""
    b, t_len = post.stoch.shape[:2]
    device = post.stoch.device
    # The state before each step, as observe saw it: the posterior of the step before, the given state before step
    # 0, RSSM.initial at a reset (the given state included).
    keep = ~first[..., None]
    prev = State(*(torch.where(keep, torch.cat([i[:, None], p[:, :-1]], dim=1), r[:, None].expand_as(p))
                   for i, r, p in zip(init, reset, post)))
    if used is not None:
        prev = State(*(torch.where(used[..., None], p, r[:, None].expand_as(p)) for r, p in zip(reset, prev)))
    # Step k of the rollout from t takes action[t + k - 1] (zeroed at a reset start, as observe does).
    steps = torch.arange(t_len, device=device)[:, None] + torch.arange(k_len, device=device)  # [T, K]
    idx = steps.clamp(max=t_len - 1)
    acts = action[:, idx]  # [B, T, K, A]
    acts = torch.cat([torch.where(keep[:, :, None], acts[:, :, :1], torch.zeros_like(acts[:, :, :1])), acts[:, :, 1:]],
                     dim=2)
    resets = torch.cumsum(first.to(torch.int32), dim=1)  # a reset in t+1 .. t+k-1: resets[t+k-1] > resets[t]
    valid = (steps < t_len)[None] & (resets[:, idx] == resets[:, :, None])
    n = b * t_len
    starts = State(*(p.reshape(n, p.shape[-1]) for p in prev))
    prior = rssm.imagine(acts.reshape(n, k_len, rssm.action_dim), starts,
                         None if noise is None else noise.reshape(n, k_len, rssm.stoch), generator=generator)
    return State(*(p.reshape(b, t_len, k_len, p.shape[-1]) for p in prior)), valid


def overshooting_rollouts(rssm: RSSM, post: State, action: Tensor, *, distance: int, is_first: Tensor | None = None,
                          state: State | None = None, noise: Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[State, Tensor]:
    """The open-loop priors of latent overshooting, from every step of a filtered sequence at once.

    Args:
        rssm: the model that filtered the sequence.
        post: the posterior States [B, T, ...] of :meth:`RSSM.observe`.
        action: [B, T, A], ``action[:, t]`` the action that led to step t (as observe takes it).
        distance: K = min(distance, T) prior steps are rolled from each start.
        is_first: [B, T] resets, as given to observe (a start at a reset is :meth:`RSSM.initial`, with its action
            zeroed, as observe does).
        state: the state before step 0 (:meth:`RSSM.initial` when None), as given to observe.
        noise: [B, T, K, S] the prior samples' noise (drawn when None; ``generator`` draws it).

    Returns:
        (prior, valid): ``prior`` a State with [B, T, K, ...] fields, ``prior[:, t, k - 1]`` the prior of step
        t + k - 1 after k open-loop steps from the state before step t (k = 1 is observe's own prior, given the
        same noise); ``valid`` [B, T, K] bool, False where step t + k - 1 lies past the sequence's end or a reset
        falls in t + 1 .. t + k - 1.
    """
    post, action, _, _, k_len, first, init, reset = _args(rssm, post, action, distance, is_first, state, noise)
    return _rollouts(rssm, post, action, first, init, reset, k_len, noise, generator)


def latent_overshooting_kl(rssm: RSSM, post: State, action: Tensor, *, distance: int,
                           is_first: Tensor | None = None, state: State | None = None, free_nats: float = 3.0,
                           mode: str = "shifted", stop_posterior_grad: bool = True, noise: Tensor | None = None,
                           generator: torch.Generator | None = None) -> Tensor:
    """PlaNet's latent overshooting divergence, for open-loop predictions 2 to ``distance`` steps ahead.

    Args:
        rssm, post, action, is_first, state: the model, its posterior States [B, T, ...] from
            :meth:`RSSM.observe`, and what observe was given (``action[:, t]`` led to step t).
        distance: D >= 2, the longest open-loop prediction, in steps (PlaNet's ``overshooting_distance``); only
            distances up to T can have a target.
        free_nats: the free nats of each (t, d) term (PlaNet's 3.0 by default; 0 for none).
        mode: "shifted", each term max(0, KL - free_nats) (google-research/planet now, and fastwm's "planet" KL
            preset), or "per_step", max(free_nats, KL) (PlaNet's first release): the same gradient.
        stop_posterior_grad: no gradient into the target posteriors (PlaNet's default); the starts of the rollouts
            and the prior steps get theirs either way.
        noise: [B, T, min(distance, T), S] the open-loop samples' noise (drawn when None, from ``generator``).

    Returns:
        A scalar in float32 (float64 for float64 inputs): the mean over the distances 2..D and the B sequences of
        the mean over the valid steps t of the floored KL(q_t || p_d(z_t)); pairs with no valid step are left out
        of the mean, and with none at all (T < 2) the result is 0.
    """
    check_generator(generator)
    free = _check_scalar("free_nats", free_nats)
    if mode not in OVERSHOOTING_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, OVERSHOOTING_MODES))}, got {mode!r}")
    if not isinstance(stop_posterior_grad, bool):
        raise TypeError(f"stop_posterior_grad must be a bool, got {type(stop_posterior_grad).__name__}")
    post, action, b, t_len, k_len, first, init, reset = _args(rssm, post, action, distance, is_first, state, noise)
    kl_dtype = torch.float64 if post.stoch.dtype == torch.float64 else torch.float32
    if t_len < 2:  # no prediction of two steps or more has a target
        return post.stoch.new_zeros((), dtype=kl_dtype)
    # A start is used when its rollout has a valid term of k >= 2: not the last step, nor the step before a reset.
    used = torch.zeros_like(first)
    used[:, :-1] = ~first[:, 1:]
    prior, valid = _rollouts(rssm, post, action, first, init, reset, k_len, noise, generator, used)
    device = post.stoch.device
    # Targets: the posterior at step t + k - 1, for k = 2..K.
    idx = (torch.arange(t_len, device=device)[:, None] + torch.arange(1, k_len, device=device)).clamp(max=t_len - 1)
    q_mean, q_std = post.mean[:, idx], post.std[:, idx]  # [B, T, K - 1, S]
    if stop_posterior_grad:
        q_mean, q_std = q_mean.detach(), q_std.detach()
    valid = valid[:, :, 1:]
    ok = valid[..., None]
    # The invalid terms get harmless stand-ins before the KL: nothing they hold reaches the value or the gradient.
    p_mean, p_std = prior.mean[:, :, 1:], prior.std[:, :, 1:]
    kl = gaussian_kl(torch.where(ok, q_mean, torch.zeros_like(q_mean)), torch.where(ok, q_std, torch.ones_like(q_std)),
                     torch.where(ok, p_mean, torch.zeros_like(p_mean)), torch.where(ok, p_std, torch.ones_like(p_std)))
    floored = torch.clamp(kl, min=free) if mode == "per_step" else torch.clamp(kl - free, min=0.0)
    floored = torch.where(valid, floored, torch.zeros_like(floored))
    count = valid.sum(dim=1)  # [B, K - 1]: valid steps per (sequence, distance)
    per_pair = floored.sum(dim=1) / count.clamp(min=1)
    pairs = count > 0
    return (per_pair * pairs).sum() / pairs.sum().clamp(min=1)
