"""fastwm.sequence_elbo, SequenceELBO and gaussian_log_prob against the ELBO written out by hand in float64 with
torch.distributions: values and gradients, under several KL conventions and presets, on both backends."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

import fastwm
from fastwm.elbo import ELBOTerms, SequenceELBO, gaussian_log_prob, sequence_elbo

from .conftest import assert_close

B, T, S = 3, 5, 6


def _inputs(device: torch.device, dtype: torch.dtype = torch.float64, seed: int = 0):
    """recon [B, T], policy [B, T] and post / prior States [B, T, S] (deter and stoch unused by the ELBO)."""
    g = torch.Generator().manual_seed(seed)
    recon = torch.randn(B, T, generator=g, dtype=torch.float64) * 10 - 50
    policy = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    qm, pm = (torch.randn(B, T, S, generator=g, dtype=torch.float64) * 0.8 for _ in range(2))
    qs, ps = ((torch.randn(B, T, S, generator=g, dtype=torch.float64) * 0.4).exp() for _ in range(2))
    leaves = [t.to(device, dtype).requires_grad_() for t in (recon, policy, qm, qs, pm, ps)]
    recon, policy, qm, qs, pm, ps = leaves
    empty = torch.zeros(B, T, 0, device=device, dtype=dtype)
    post = fastwm.State(empty, qm.detach(), qm, qs)
    prior = fastwm.State(empty, pm.detach(), pm, ps)
    return leaves, post, prior


def _kl(qm, qs, pm, ps):
    return kl_divergence(Independent(Normal(qm, qs), 1), Independent(Normal(pm, ps), 1))  # [B, T]


def hand_elbo(recon, policy, qm, qs, pm, ps, *, mode, free, scale=1.0, alpha=0.8, dyn=0.5, rep=0.1, free_avg=None):
    """The per-step sequence ELBO as the projects write it: log-likelihood means over (B, T) minus the KL term."""
    if mode == "per_step":
        kl = _kl(qm, qs, pm, ps).clamp_min(free).mean()
    elif mode == "mean":
        kl = _kl(qm, qs, pm, ps).mean().clamp_min(free)
    elif mode == "shifted":
        kl = (_kl(qm, qs, pm, ps) - free).clamp_min(0.0).mean()
    else:
        kl_dyn = _kl(qm.detach(), qs.detach(), pm, ps)
        kl_rep = _kl(qm, qs, pm.detach(), ps.detach())
        w_dyn, w_rep = (alpha, 1.0 - alpha) if mode == "balance" else (dyn, rep)
        after_mean = (mode == "balance") if free_avg is None else free_avg
        if after_mean:
            kl = w_dyn * kl_dyn.mean().clamp_min(free) + w_rep * kl_rep.mean().clamp_min(free)
        else:
            kl = w_dyn * kl_dyn.clamp_min(free).mean() + w_rep * kl_rep.clamp_min(free).mean()
    kl = scale * kl
    pol = torch.zeros((), dtype=recon.dtype) if policy is None else policy.mean()
    return recon.mean() + pol - kl, recon.mean(), pol, kl


# (arguments to sequence_elbo, the settings they stand for, written out independently of KL_PRESETS)
CASES = [
    (dict(kl_mode="per_step", free_nats=0.0), dict(mode="per_step", free=0.0)),
    (dict(), dict(mode="per_step", free=3.0)),
    (dict(kl_mode="mean", free_nats=1.0, kl_scale=0.5), dict(mode="mean", free=1.0, scale=0.5)),
    (dict(kl_mode="shifted", free_nats=1.5), dict(mode="shifted", free=1.5)),
    (dict(preset="planet"), dict(mode="shifted", free=3.0)),
    (dict(preset="dreamer_v1", kl_scale=2.0), dict(mode="mean", free=3.0, scale=2.0)),
    (dict(preset="dreamerv2", kl_scale=0.1), dict(mode="balance", free=0.0, alpha=0.8, free_avg=True, scale=0.1)),
    (dict(kl_mode="balance", alpha=0.6, free_nats=2.0, free_avg=False),
     dict(mode="balance", free=2.0, alpha=0.6, free_avg=False)),
    (dict(preset="dreamerv3"), dict(mode="dyn_rep", free=1.0, dyn=1.0, rep=0.1)),
    (dict(preset="dreamerv3_torch", free_nats=2.0, rep_scale=0.3),
     dict(mode="dyn_rep", free=2.0, dyn=0.5, rep=0.3)),
]
IDS = [str(a.get("preset", a.get("kl_mode", "default"))) + f"-{i}" for i, (a, _) in enumerate(CASES)]
NAMES = ("recon_log_prob", "policy_log_prob", "post.mean", "post.std", "prior.mean", "prior.std")


def _check_against_hand(terms: ELBOTerms, leaves, settings, dtype, *, with_policy=True, what=""):
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    h_elbo, h_recon, h_pol, h_kl = hand_elbo(ref[0], ref[1] if with_policy else None, *ref[2:], **settings)
    assert isinstance(terms, ELBOTerms)
    for name, got, want in (("elbo", terms.elbo, h_elbo), ("loss", terms.loss, -h_elbo),
                            ("recon", terms.recon, h_recon), ("policy", terms.policy, h_pol), ("kl", terms.kl, h_kl)):
        assert got.shape == () and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert_close(got, want, dtype, f"{what} {name}")
    assert_close(terms.kl_raw, _kl(*ref[2:]).mean(), dtype, f"{what} kl_raw")
    assert not terms.kl_raw.requires_grad
    inputs = leaves if with_policy else [leaves[0], *leaves[2:]]
    names = NAMES if with_policy else (NAMES[0], *NAMES[2:])
    ref_in = ref if with_policy else [ref[0], *ref[2:]]
    grads = torch.autograd.grad(terms.loss, inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(-h_elbo, ref_in, allow_unused=True)
    for name, g, r, x in zip(names, grads, ref_grads, inputs):
        g = torch.zeros_like(x) if g is None else g
        r = torch.zeros_like(x, device="cpu", dtype=torch.float64) if r is None else r
        assert_close(g, r, dtype, f"{what} d loss / d {name}")


@pytest.mark.parametrize("args,settings", CASES, ids=IDS)
def test_terms_match_hand_computation_reference(args, settings):
    leaves, post, prior = _inputs(torch.device("cpu"))
    with fastwm.backend("reference"):
        terms = sequence_elbo(leaves[0], post, prior, policy_log_prob=leaves[1], **args)
    _check_against_hand(terms, leaves, settings, torch.float64, what=str(args))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype_", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("args,settings", [CASES[2], CASES[6], CASES[8]], ids=[IDS[2], IDS[6], IDS[8]])
def test_terms_match_hand_computation_default_backend(args, settings, dtype_, device):
    # The default "auto" backend: the Triton kernels (natively on cuda, in the interpreter on the CPU).
    leaves, post, prior = _inputs(device, dtype_)
    terms = sequence_elbo(leaves[0], post, prior, policy_log_prob=leaves[1], **args)
    _check_against_hand(terms, leaves, settings, dtype_, what=str(args))


def test_policy_term_is_optional():
    leaves, post, prior = _inputs(torch.device("cpu"))
    with fastwm.backend("reference"):
        terms = sequence_elbo(leaves[0], post, prior, preset="dreamerv3")
    assert terms.policy.item() == 0.0 and terms.policy.dtype == torch.float64
    assert torch.equal(terms.elbo, terms.recon - terms.kl)
    _check_against_hand(terms, leaves, CASES[8][1], torch.float64, with_policy=False, what="no policy")


def test_sum_over_time_is_T_times_elbo():
    # With free nats 0 the per-step ELBO times T is the sequence ELBO sum_t [...] averaged over the batch.
    leaves, post, prior = _inputs(torch.device("cpu"))
    recon, policy, qm, qs, pm, ps = (t.detach() for t in leaves)
    with fastwm.backend("reference"):
        terms = sequence_elbo(recon, post, prior, policy_log_prob=policy, free_nats=0.0)
    per_sequence = (recon + policy - _kl(qm, qs, pm, ps)).sum(dim=1)  # [B]
    torch.testing.assert_close(T * terms.elbo, per_sequence.mean())
    torch.testing.assert_close(terms.kl, terms.kl_raw)
    # The floor changes kl, never kl_raw; recon + policy - kl_raw stays the plain ELBO.
    with fastwm.backend("reference"):
        floored = sequence_elbo(recon, post, prior, policy_log_prob=policy, free_nats=100.0)
    assert floored.kl.item() == pytest.approx(100.0)
    torch.testing.assert_close(floored.kl_raw, terms.kl_raw)


def test_mask_selects_steps():
    leaves, post, prior = _inputs(torch.device("cpu"))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    with fastwm.backend("reference"):
        terms = sequence_elbo(leaves[0], post, prior, policy_log_prob=leaves[1], preset="dreamer_v1", free_nats=0.5,
                              mask=mask)
    selected = [t[mask] for t in leaves]  # [N] and [N, S], still differentiable w.r.t. the leaves
    h_elbo, h_recon, h_pol, h_kl = hand_elbo(*selected, mode="mean", free=0.5)
    for got, want in ((terms.elbo, h_elbo), (terms.recon, h_recon), (terms.policy, h_pol), (terms.kl, h_kl)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(terms.kl_raw, _kl(*selected[2:]).mean())
    grads = torch.autograd.grad(terms.loss, leaves)
    ref_grads = torch.autograd.grad(-h_elbo, leaves)
    for name, g, r in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(g, r, msg=name)
        assert torch.all(g[~mask] == 0), f"{name}: gradient into a masked-out step"
    with pytest.raises(ValueError, match="mask must select at least one step"):
        with fastwm.backend("reference"):
            sequence_elbo(leaves[0], post, prior, mask=torch.zeros(B, T, dtype=torch.bool))


def test_module_matches_function():
    leaves, post, prior = _inputs(torch.device("cpu"))
    module = SequenceELBO(preset="dreamerv3_torch", free_nats=2.0, rep_scale=0.3)
    assert module.kl_settings == {"mode": "dyn_rep", "free_nats": 2.0, "dyn_scale": 0.5, "rep_scale": 0.3}
    assert "dyn_rep" in repr(module) and "dreamerv3_torch" in repr(module)
    assert list(module.parameters()) == []
    with fastwm.backend("reference"):
        terms = module(leaves[0], post, prior, leaves[1])
        direct = sequence_elbo(leaves[0], post, prior, policy_log_prob=leaves[1], preset="dreamerv3_torch",
                               free_nats=2.0, rep_scale=0.3)
    for a, b in zip(terms, direct):
        torch.testing.assert_close(a, b)
    _check_against_hand(terms, leaves, CASES[9][1], torch.float64, what="module")


def test_rssm_observe_end_to_end():
    # A tiny RSSM filters a sequence; a linear decoder and a Gaussian policy head give the log-likelihoods.
    torch.manual_seed(0)
    dt = torch.float64
    act_dim, obs_dim = 2, 7
    with fastwm.backend("reference"):
        rssm = fastwm.RSSM(act_dim, obs_dim, stoch=4, deter=6, hidden=8, dtype=dt)
        decoder = nn.Linear(rssm.feature_dim, obs_dim, dtype=dt)
        actor = nn.Linear(rssm.feature_dim, act_dim, dtype=dt)
        obs = torch.randn(B, T, obs_dim, dtype=dt)
        action = torch.randn(B, T, act_dim, dtype=dt).tanh()
        is_first = torch.zeros(B, T, dtype=torch.bool)
        is_first[:, 0] = True
        is_first[1, 3] = True
        noise = torch.randn(B, T, 4, dtype=dt)
        post, prior = rssm.observe(obs, action, is_first, noise=noise)
        feat = rssm.features(post)
        recon = gaussian_log_prob(obs, decoder(feat))
        policy = gaussian_log_prob(action, actor(feat), 0.3)
        terms = sequence_elbo(recon, post, prior, policy_log_prob=policy, preset="dreamerv3",
                              free_nats=0.1)  # a fresh model's KL is below DreamerV3's 1.0: no prior gradient
    assert post.mean.shape == (B, T, 4)
    want_recon = Independent(Normal(decoder(feat), 1.0), 1).log_prob(obs).mean()
    want_pol = Independent(Normal(actor(feat), 0.3), 1).log_prob(action).mean()
    q, p = (post.mean, post.std), (prior.mean, prior.std)
    dyn = _kl(q[0].detach(), q[1].detach(), *p).clamp_min(0.1).mean()
    rep = _kl(*q, p[0].detach(), p[1].detach()).clamp_min(0.1).mean()
    want_kl = 1.0 * dyn + 0.1 * rep
    torch.testing.assert_close(terms.recon, want_recon)
    torch.testing.assert_close(terms.policy, want_pol)
    torch.testing.assert_close(terms.kl, want_kl)
    torch.testing.assert_close(terms.elbo, want_recon + want_pol - want_kl)
    params = [*rssm.parameters(), *decoder.parameters(), *actor.parameters()]
    grads = torch.autograd.grad(terms.loss, params, retain_graph=True)  # the RSSM graph is shared with want
    want = torch.autograd.grad(-(want_recon + want_pol - want_kl), params)
    for (name, _), g, w in zip([*rssm.named_parameters(), *decoder.named_parameters(), *actor.named_parameters()],
                               grads, want):
        torch.testing.assert_close(g, w, msg=name)
    assert all(g.abs().sum() > 0 for g in grads[: len(list(rssm.parameters()))]), "an RSSM parameter gets no gradient"


# ----------------------------------------------------------------------------------------------------------------------
# Argument errors name the argument
# ----------------------------------------------------------------------------------------------------------------------


def _bad(leaves, post, prior):
    recon, policy, qm, qs, pm, ps = leaves
    d = recon.detach()
    empty = post.deter
    return [
        (dict(recon_log_prob=d[:, :-1]), ValueError, r"recon_log_prob must have shape \[3, 5\]"),
        (dict(recon_log_prob=torch.zeros(B, T, 4, dtype=d.dtype)), ValueError, "recon_log_prob.*event_dims"),
        (dict(recon_log_prob=d.long()), TypeError, "recon_log_prob must be a floating tensor"),
        (dict(recon_log_prob=d.tolist()), TypeError, "recon_log_prob must be a torch.Tensor"),
        (dict(recon_log_prob=d.to("meta")), ValueError, "recon_log_prob must be on the device of post.mean"),
        (dict(policy_log_prob=d[None]), ValueError, "policy_log_prob must have shape"),
        (dict(prior=fastwm.State(empty, pm, pm, ps[..., :-1])), ValueError, "prior.std must have the shape"),
        (dict(prior=fastwm.State(empty, pm, pm.float(), ps)), TypeError, "prior.mean must have the dtype"),
        (dict(post=(qm, qs)), TypeError, "post must have .mean and .std"),
        (dict(post=fastwm.State(empty, qm, qm[0, 0], qs)), ValueError, "post.mean must have at least 2"),
        (dict(mask=torch.ones(B, T)), TypeError, "mask must be a bool tensor"),
        (dict(mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(kl_mode="nope"), ValueError, "kl_mode must be one of"),
        (dict(preset="dreamerv9"), ValueError, "preset must be one of"),
        (dict(preset="dreamerv3", kl_mode="dyn_rep"), ValueError, "kl_mode or preset, not both"),
        (dict(kl_mode="per_step", alpha=0.5), ValueError, "alpha applies to kl_mode 'balance'"),
        (dict(preset="dreamerv2", rep_scale=0.5), ValueError, "rep_scale applies to kl_mode 'dyn_rep'"),
        (dict(kl_mode="mean", free_avg=True), ValueError, "free_avg applies"),
        (dict(kl_scale=-1.0), ValueError, "kl_scale"),
        (dict(free_nats="3"), TypeError, "free_nats"),
        (dict(kl_mode="balance", alpha=1.5), ValueError, "alpha"),
    ]


@pytest.mark.parametrize("index", range(21))
def test_bad_arguments_name_the_argument(index):
    leaves, post, prior = _inputs(torch.device("cpu"))
    cases = _bad(leaves, post, prior)
    assert len(cases) == 21
    override, exc, match = cases[index]
    kwargs = dict(recon_log_prob=leaves[0], post=post, prior=prior, policy_log_prob=leaves[1]) | override
    with fastwm.backend("reference"), pytest.raises(exc, match=match):
        sequence_elbo(kwargs.pop("recon_log_prob"), kwargs.pop("post"), kwargs.pop("prior"), **kwargs)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="preset must be one of"):
        SequenceELBO(preset="nope")
    with pytest.raises(ValueError, match="dyn_scale applies"):
        SequenceELBO(kl_mode="mean", dyn_scale=1.0)
    with pytest.raises(TypeError, match="kl_scale"):
        SequenceELBO(kl_scale=None)


def test_value_checks_name_the_argument():
    leaves, post, prior = _inputs(torch.device("cpu"))
    recon = leaves[0].detach().clone()
    recon[1, 2] = float("nan")
    fastwm.set_validate_args(True)
    try:
        with fastwm.backend("reference"), pytest.raises(ValueError, match="recon_log_prob must be finite"):
            sequence_elbo(recon, post, prior)
    finally:
        fastwm.set_validate_args(False)


# ----------------------------------------------------------------------------------------------------------------------
# gaussian_log_prob
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("std", [1.0, 0.3, "tensor", "broadcast"])
@pytest.mark.parametrize("event_dims", [0, 1, 3])
def test_gaussian_log_prob_matches_torch_distributions(std, event_dims):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, 6, generator=g, dtype=torch.float64)
    mean = torch.randn(x.shape, generator=g, dtype=torch.float64, requires_grad=True)
    if std == "tensor":
        std = (torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.3).exp().requires_grad_()
    elif std == "broadcast":
        std = (torch.randn(5, 1, generator=g, dtype=torch.float64) * 0.3).exp().requires_grad_()
    got = gaussian_log_prob(x, mean, std, event_dims=event_dims)
    want = Independent(Normal(mean, std), event_dims).log_prob(x)
    assert got.shape == x.shape[: x.dim() - event_dims]
    torch.testing.assert_close(got, want)
    inputs = [mean] + ([std] if isinstance(std, torch.Tensor) else [])
    for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_gaussian_log_prob_unit_variance_constant():
    # Dreamer V1's tfd.Normal(mean, 1): -0.5 * log(2 pi) per dim at x == mean, the constant included.
    x = torch.zeros(4, 10)
    torch.testing.assert_close(gaussian_log_prob(x, x), torch.full((4,), -5 * math.log(2 * math.pi)))


def test_gaussian_log_prob_half_inputs_sum_in_float32():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 16, generator=g)
    mean = torch.rand(2, 3, 16, 16, generator=g)
    got = gaussian_log_prob(x.bfloat16(), mean.bfloat16(), event_dims=3)
    assert got.dtype == torch.float32
    want = Normal(mean.bfloat16().double(), 1.0).log_prob(x.bfloat16().double()).sum((-3, -2, -1))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(mean=torch.zeros(4, 3)), ValueError, "mean must have the shape of x"),
        (dict(mean=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "mean must have the dtype of x"),
        (dict(std=0.0), ValueError, "std must be > 0"),
        (dict(std=torch.ones(3)), ValueError, "std must broadcast"),
        (dict(std=torch.ones(2, 4, 5)), ValueError, "std must broadcast"),
        (dict(std=torch.ones(5, dtype=torch.float64)), TypeError, "std must have the dtype of x"),
        (dict(event_dims=3), ValueError, "event_dims"),
        (dict(event_dims=-1), ValueError, "event_dims"),
        (dict(x=torch.zeros(4, 5, dtype=torch.long)), TypeError, "x must be"),
    ],
)
def test_gaussian_log_prob_bad_arguments(kwargs, exc, match):
    args = dict(x=torch.zeros(4, 5), mean=torch.zeros(4, 5)) | kwargs
    with pytest.raises(exc, match=match):
        gaussian_log_prob(args.pop("x"), args.pop("mean"), **args)


def test_traces_as_one_graph():
    # torch.compile(fullgraph=True) traces sequence_elbo without a graph break (dynamo only: backend "eager").
    leaves, post, prior = _inputs(torch.device("cpu"), torch.float32)
    module = SequenceELBO(preset="dreamerv3")
    torch._dynamo.reset()
    with fastwm.backend("reference"):
        compiled = torch.compile(module, fullgraph=True, backend="eager")
        got = compiled(leaves[0], post, prior, leaves[1])
        want = module(leaves[0], post, prior, leaves[1])
    assert isinstance(got, ELBOTerms)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
