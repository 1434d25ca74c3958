"""fastwm.latent_overshooting_kl (PlaNet's latent overshooting) against a plain loop over every (sequence, start,
distance), written with torch.distributions: values and gradients, resets, a given initial state, free nats, the
stop-gradient on the targets; the Triton backend against the float64 loop; bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import fastwm
from fastwm import State

from .conftest import assert_close

CONFIGS = [
    {"cell": "gru"},
    {"cell": "layernorm_gru", "act": "silu", "norm": True, "std_mode": "sigmoid2"},
    {"cell": "none", "std_mode": "softplus_clamp"},
]
CONFIG_IDS = ["gru", "lngru-norm-silu", "none"]
# with dreamerv3-torch's learned initial state, which every reset restores
WITH_LEARNED = CONFIGS + [{**CONFIGS[1], "initial": "learned"}]
WITH_LEARNED_IDS = CONFIG_IDS + ["lngru-learned"]
B, T, S, A = 3, 6, 4, 2


def _model(dtype, device="cpu", **kw) -> fastwm.RSSM:
    torch.manual_seed(0)
    m = fastwm.RSSM(A, 5, stoch=S, deter=7, hidden=9, **kw)
    if m.initial_deter is not None:  # away from its zero start
        with torch.no_grad():
            m.initial_deter.normal_()
    return m.to(device=device, dtype=dtype)


def _inputs(m: fastwm.RSSM, g: torch.Generator, k: int, dtype, device="cpu"):
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    post = State(randn(B, T, m.deter), randn(B, T, S), randn(B, T, S), (0.3 + randn(B, T, S).abs()))
    start = State(randn(B, m.deter), randn(B, S), randn(B, S), 0.5 + randn(B, S).abs())
    first = torch.zeros(B, T, dtype=torch.bool, device=device)
    first[0, 3] = True  # a reset in the middle of sequence 0
    first[1, 0] = True  # one at the start, where a given state is replaced
    first[2, 1] = True
    first[2, 2] = True  # two in a row
    return post, randn(B, T, A), first, start, randn(B, T, k, S)


def _loop(m, post, action, distance, first, start, free, noise, stop_grad=True, mode="shifted"):
    """The definition, one rollout at a time."""
    terms: dict[tuple[int, int], list[torch.Tensor]] = {}
    for b in range(B):
        for t in range(T):
            if first[b, t]:  # observe resets to RSSM.initial, whatever state it was given
                s = m.initial(1)
            elif t == 0:
                s = State(*(x[b:b + 1] for x in start))
            else:
                s = State(*(x[b:b + 1, t - 1] for x in post))
            a0 = torch.zeros_like(action[b, t]) if first[b, t] else action[b, t]
            for k in range(1, min(distance, T) + 1):
                step = t + k - 1
                if step >= T or (k >= 2 and first[b, step]):
                    break
                s = m.img_step(s, (a0 if k == 1 else action[b, step])[None], noise[b, t, k - 1][None])
                if k >= 2:
                    qm, qs = post.mean[b, step], post.std[b, step]
                    if stop_grad:
                        qm, qs = qm.detach(), qs.detach()
                    kl = kl_divergence(Normal(qm, qs), Normal(s.mean[0], s.std[0])).sum()
                    floored = torch.clamp(kl, min=free) if mode == "per_step" else torch.clamp(kl - free, min=0.0)
                    terms.setdefault((b, k), []).append(floored)
    per_pair = [torch.stack(v).mean() for v in terms.values()]
    return torch.stack(per_pair).mean()


def _leaves(post, start):
    post = State(*(x.clone().requires_grad_() for x in post))
    start = State(*(x.clone().requires_grad_() for x in start))
    return post, start


@pytest.mark.parametrize("cfg", WITH_LEARNED, ids=WITH_LEARNED_IDS)
@pytest.mark.parametrize("stop_grad,mode", [(True, "shifted"), (False, "shifted"), (True, "per_step")],
                         ids=["sg", "no-sg", "per-step"])
def test_matches_the_loop_values_and_gradients(cfg, stop_grad, mode):
    m = _model(torch.float64, **cfg)
    distance = 4
    post, action, first, start, noise = _inputs(m, torch.Generator().manual_seed(1), distance, torch.float64)
    grads = []
    for fn in ("fastwm", "loop"):
        p, s0 = _leaves(post, start)
        a = action.clone().requires_grad_()
        m.zero_grad()
        with fastwm.backend("reference"):
            if fn == "fastwm":
                value = fastwm.latent_overshooting_kl(m, p, a, distance=distance, is_first=first, state=s0,
                                                      free_nats=0.4, mode=mode, stop_posterior_grad=stop_grad,
                                                      noise=noise)
            else:
                value = _loop(m, p, a, distance, first, s0, 0.4, noise, stop_grad, mode)
        (0.7 * value).backward()  # an upstream gradient that is not one
        grads.append((value.detach(), [x.grad for x in (*p, *s0, a)],
                      {n: q.grad for n, q in m.named_parameters()}))
    (v, g_in, g_par), (v_ref, g_in_ref, g_par_ref) = grads
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    names = [f"post.{n}" for n in State._fields] + [f"state.{n}" for n in State._fields] + ["action"]
    for name, x, e in zip(names, g_in, g_in_ref):
        if e is None:
            assert x is None or not x.any(), name
        else:
            torch.testing.assert_close(x, e, rtol=1e-9, atol=1e-12, msg=name)
    for name, e in g_par_ref.items():
        torch.testing.assert_close(g_par[name], e, rtol=1e-9, atol=1e-12, msg=name)
    if stop_grad:  # the targets get no gradient: post.std enters only as a target (starts use deter and stoch)
        assert g_in[names.index("post.std")] is None


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_triton_backend_matches_the_float64_loop(device, dtype, cfg, poison):
    m = _model(dtype, device, **cfg)
    m64 = copy.deepcopy(m).double()
    distance = 3
    post, action, first, start, noise = _inputs(m, torch.Generator().manual_seed(2), distance, dtype, device)
    p, s0 = _leaves(post, start)
    with fastwm.backend("triton"):
        value = fastwm.latent_overshooting_kl(m, p, action, distance=distance, is_first=first, state=s0,
                                              free_nats=0.2, noise=noise)
    value.backward()
    p64, s64 = _leaves(State(*(x.double() for x in post)), State(*(x.double() for x in start)))
    with fastwm.backend("reference"):
        ref = _loop(m64, p64, action.double(), distance, first, s64, 0.2, noise.double())
    ref.backward()
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(value, ref, dtype, "overshooting kl")
    for name, x, e in zip(State._fields, p, p64):
        if e.grad is not None:
            assert_close(x.grad, e.grad, dtype, f"post.{name} grad")
    for (name, q), q64 in zip(m.named_parameters(), m64.parameters()):
        if q64.grad is None:  # the posterior head: overshooting runs the prior only
            assert q.grad is None, name
        else:
            assert_close(q.grad, q64.grad, dtype, f"{name} grad")


@pytest.mark.parametrize("cfg", WITH_LEARNED, ids=WITH_LEARNED_IDS)
def test_one_step_rollouts_are_observes_priors(cfg):
    # k = 1 from the state before each step is observe's prior, given state, resets at t = 0 and mid-sequence included
    m = _model(torch.float64, **cfg)
    g = torch.Generator().manual_seed(5)
    _, action, first, start, noise = _inputs(m, g, 3, torch.float64)
    embed = torch.randn(B, T, 5, generator=g, dtype=torch.float64)
    with fastwm.backend("reference"):
        post, prior = m.observe(embed, action, first, state=start, prior_noise=noise[:, :, 0])
        os_prior, valid = fastwm.overshooting.overshooting_rollouts(m, post, action, distance=3, is_first=first,
                                                                     state=start, noise=noise)
    for name, a, e in zip(State._fields, os_prior, prior):
        torch.testing.assert_close(a[:, :, 0], e, rtol=1e-12, atol=1e-12, msg=name)
    assert valid[:, :, 0].all()
    assert not valid[0, 1, 2] and not valid[0, 2, 1] and valid[0, 3, 2]  # the reset at 3 ends rollouts before it
    assert not valid[:, T - 1, 1:].any() and not valid[:, T - 2, 2].any()  # the sequence's end


def test_small_shapes_and_numeric_is_first():
    for b, t in ((1, 2), (2, 3)):
        m = _model(torch.float64)
        g = torch.Generator().manual_seed(6)
        post = State(*(torch.randn(b, t, w, generator=g, dtype=torch.float64) for w in (m.deter, S, S, S)))
        post = post._replace(std=post.std.abs() + 0.2)
        action = torch.randn(b, t, A, generator=g, dtype=torch.float64)
        noise = torch.randn(b, t, min(4, t), S, generator=g, dtype=torch.float64)
        first = torch.zeros(b, t, dtype=torch.bool)
        with fastwm.backend("reference"):
            value = fastwm.latent_overshooting_kl(m, post, action, distance=4, free_nats=0.0, noise=noise,
                                                  is_first=first.to(torch.int64))
            global B, T
            saved = B, T
            B, T = b, t
            try:
                ref = _loop(m, post, action, 4, first, m.initial(b), 0.0, noise)
            finally:
                B, T = saved
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)


def test_invalid_starts_cannot_poison_the_gradient():
    # the start of the last step, and the one before a reset, have no term: infinities there change nothing
    m = _model(torch.float64)
    post, action, first, start, noise = _inputs(m, torch.Generator().manual_seed(7), 3, torch.float64)
    results = []
    for poison in (False, True):
        p = State(*(x.clone() for x in post))
        if poison:
            for part in (p.deter, p.stoch):
                part[:, T - 2] = float("inf")  # starts the rollout from T - 1
                part[0, 1] = float("inf")  # starts the rollout from 2, before the reset at 3
        p = State(*(x.requires_grad_() for x in p))
        m.zero_grad()
        with fastwm.backend("reference"):
            value = fastwm.latent_overshooting_kl(m, p, action, distance=3, is_first=first, state=start, noise=noise)
        value.backward()
        results.append((value.detach(), [q.grad.clone() for q in m.parameters() if q.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, e in zip(results[1][1], results[0][1]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e)


def test_distances_sequence_end_and_seeded_noise():
    m = _model(torch.float64)
    post, action, _, _, _ = _inputs(m, torch.Generator().manual_seed(3), 2, torch.float64)
    with fastwm.backend("reference"):
        # distance past T: only predictions up to T steps can have a target
        prior, valid = fastwm.overshooting.overshooting_rollouts(m, post, action, distance=50)
        assert prior.mean.shape == (B, T, T, S) and valid.shape == (B, T, T)
        assert valid[:, 0].all() and valid[:, T - 1].sum() == B  # from the last step only the one-step prior
        one = fastwm.latent_overshooting_kl(m, State(*(x[:, :1] for x in post)), action[:, :1], distance=5)
        assert one.item() == 0.0  # T = 1: nothing to overshoot
        # k = 1 is the usual prior: the same as observe's prior step from the same states
        init = m.initial(B)
        step1 = m.img_step(init, action[:, 0], torch.zeros(B, S, dtype=torch.float64))
        torch.testing.assert_close(prior.mean[:, 0, 0], step1.mean)
        runs = [fastwm.latent_overshooting_kl(m, post, action, distance=3,
                                              generator=torch.Generator().manual_seed(7)) for _ in range(2)]
        assert runs[0].item() == runs[1].item()
        # free nats floor each term: a floor above every KL gives the floor itself (per_step), or 0 (shifted)
        assert fastwm.latent_overshooting_kl(m, post, action, distance=3, free_nats=1e6, mode="per_step").item() \
            == 1e6
        assert fastwm.latent_overshooting_kl(m, post, action, distance=3, free_nats=1e6).item() == 0.0
        # without free nats the two rules agree
        g = [torch.Generator().manual_seed(8) for _ in range(2)]
        a, b = (fastwm.latent_overshooting_kl(m, post, action, distance=3, free_nats=0.0, mode=mode, generator=gen)
                for mode, gen in zip(("shifted", "per_step"), g))
        assert a.item() == b.item() and a.item() > 0


def test_bad_arguments_are_named():
    m = _model(torch.float32)
    post, action, first, _, _ = _inputs(m, torch.Generator().manual_seed(4), 2, torch.float32)
    call = fastwm.latent_overshooting_kl
    with pytest.raises(ValueError, match="distance"):
        call(m, post, action, distance=1)
    with pytest.raises(ValueError, match="distance"):
        call(m, post, action, distance=True)
    with pytest.raises(TypeError, match="rssm"):
        call(object(), post, action, distance=3)
    with pytest.raises(TypeError, match="post"):
        call(m, post.stoch, action, distance=3)
    with pytest.raises(ValueError, match="post.std"):
        call(m, State(post.deter, post.stoch, post.mean, post.std[:, :, :2]), action, distance=3)
    with pytest.raises(ValueError, match="action"):
        call(m, post, action[:, 1:], distance=3)
    with pytest.raises(ValueError, match="is_first"):
        call(m, post, action, distance=3, is_first=first[:, 1:])
    with pytest.raises(ValueError, match="noise"):
        call(m, post, action, distance=3, noise=torch.zeros(B, T, 2, S))
    with pytest.raises(ValueError, match="free_nats"):
        call(m, post, action, distance=3, free_nats=-1.0)
    with pytest.raises(TypeError, match="free_nats"):
        call(m, post, action, distance=3, free_nats="3")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="free_nats"):
            call(m, post, action, distance=3, free_nats=bad)
    with pytest.raises(TypeError, match="action must have the RSSM parameters' dtype torch.float32"):
        call(m, post, action.double(), distance=3)
    with pytest.raises(ValueError, match="noise"):  # checked at T = 1 too, where nothing is computed
        call(m, State(*(x[:, :1] for x in post)), action[:, :1], distance=3, noise=torch.zeros(9))
    fastwm.set_validate_args(True)
    try:
        with pytest.raises(ValueError, match="is_first must hold only 0 and 1"):
            call(m, post, action, distance=3, is_first=first.to(torch.int64) * 2)
        bad_post = State(post.deter, post.stoch, post.mean.clone(), post.std)
        bad_post.mean[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="post.mean"):
            call(m, bad_post, action, distance=3)
    finally:
        fastwm.set_validate_args(False)
    with pytest.raises(ValueError, match="mode"):
        call(m, post, action, distance=3, mode="mean")
    with pytest.raises(TypeError, match="stop_posterior_grad"):
        call(m, post, action, distance=3, stop_posterior_grad=1)
