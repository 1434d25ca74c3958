"""fastwm.interop.from_torchrl: the converted RSSM returns what TorchRL's RSSMPrior / RSSMPosterior return.

TorchRL runs on the same device as the kernels (--device), in float32 (its GRU cell always runs in float32). torchrl is
imported inside a fixture, not at collection, so its import-time settings (it sets the multiprocessing start method)
reach no other test module's collection.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastwm
from fastwm import State
from fastwm.interop import from_torchrl

from .conftest import assert_close

B = 7
F32 = torch.float32

# name -> (hidden_dim, rnn_hidden_dim, state_dim, action_dim, obs_embed_dim, scale_lb)
CASES = {
    "small": (13, 13, 5, 3, 9, 0.2),
    # TorchRL's RSSMPrior builds rnn_to_prior_projector[0] as Linear(hidden_dim, hidden_dim), so it runs only with
    # hidden_dim == rnn_hidden_dim; "unequal" swaps in the Linear(rnn_hidden_dim, hidden_dim) that makes it run.
    "unequal": (13, 11, 5, 3, 9, 0.1),
    # TorchRL's defaults (200 / 200 / 30, scale_lb 0.1), built lazily (no action_dim / widths) and run once.
    "default": (200, 200, 30, 6, 32, None),
}


@pytest.fixture(scope="module")
def mb():
    return pytest.importorskip("torchrl.modules.models.model_based",
                               reason="torchrl is not installed (the test extra has it: pip install -e '.[test]')")


def _spec(a: int):
    from torchrl.data import Unbounded

    return Unbounded(shape=(a,))


def _low_raw_std(linear: nn.Linear, s: int) -> None:
    """Push two raw-std outputs far negative so that softplus(raw) < scale_lb: the clamp is exercised."""
    with torch.no_grad():
        linear.bias[s:s + 2] = -6.0


def build(mb, case: str, device: torch.device, seed: int = 0):
    hd, d, s, a, e, lb = CASES[case]
    torch.manual_seed(seed)
    if case == "default":
        prior = mb.RSSMPrior(_spec(a), device=device)
        posterior = mb.RSSMPosterior(device=device)
        with torch.no_grad():  # materialize the LazyLinear layers
            _, _, _, belief = prior(torch.zeros(1, s, device=device), torch.zeros(1, d, device=device),
                                    torch.zeros(1, a, device=device))
            posterior(belief, torch.zeros(1, e, device=device))
    else:
        prior = mb.RSSMPrior(_spec(a), hidden_dim=hd, rnn_hidden_dim=d, state_dim=s, scale_lb=lb, action_dim=a,
                             device=device)
        posterior = mb.RSSMPosterior(hidden_dim=hd, state_dim=s, scale_lb=lb, rnn_hidden_dim=d, obs_embed_dim=e,
                                     device=device)
        if hd != d:
            prior.rnn_to_prior_projector[0] = nn.Linear(d, hd, device=device)
    _low_raw_std(prior.rnn_to_prior_projector[2], s)
    _low_raw_std(posterior.obs_rnn_to_post_projector[2], s)
    return prior, posterior


def inputs(case: str, device: torch.device, steps: int | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    _, d, s, a, e, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if steps is None else (B, steps)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return {"state": r(B, s), "belief": r(B, d), "action": r(*lead, a), "embed": r(*lead, e),
            "noise": r(*lead, s), "prior_noise": r(*lead, s)}


def use_backend(name: str):
    if name == "triton":
        pytest.importorskip("fastwm.step_ops", reason="the fused RSSM step kernels (fastwm.step_ops) are not there yet")
    return fastwm.backend(name)


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]


def close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert_close(actual, expected, F32, name)


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_step_parity(mb, case, backend_name, device):
    prior, posterior = build(mb, case, device)
    rssm = from_torchrl(prior, posterior)
    x = inputs(case, device)
    st = State(x["belief"], x["state"], x["state"], x["state"])  # mean and std of an input state are not read
    with torch.no_grad():
        p_mean, p_std, p_state, p_belief = prior(x["state"], x["belief"], x["action"], x["prior_noise"])
        q_mean, q_std, q_state = posterior(p_belief, x["embed"], x["noise"])
        with use_backend(backend_name):
            img = rssm.img_step(st, x["action"], x["prior_noise"])
            post, pri = rssm.obs_step(st, x["action"], x["embed"], x["noise"], prior_noise=x["prior_noise"])
    lb = CASES[case][5] or 0.1
    assert (p_std == lb).any() and (q_std == lb).any(), "the test should exercise the clamp at scale_lb"
    for got in (img, pri):
        close(got.deter, p_belief, "belief")
        close(got.stoch, p_state, "prior state")
        close(got.mean, p_mean, "prior mean")
        close(got.std, p_std, "prior std")
    close(post.deter, p_belief, "posterior belief")
    close(post.stoch, q_state, "posterior state")
    close(post.mean, q_mean, "posterior mean")
    close(post.std, q_std, "posterior std")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", ["small", "unequal"])
def test_rollout_parity(mb, case, backend_name, device):
    """imagine: TorchRL's prior fed its own state and belief, 4 steps; observe: TorchRL's RSSMRollout loop (the
    posterior state and the prior belief carried over), 4 steps."""
    steps = 4
    prior, posterior = build(mb, case, device)
    rssm = from_torchrl(prior, posterior)
    x = inputs(case, device, steps=steps)
    st = State(x["belief"], x["state"], x["state"], x["state"])
    with torch.no_grad():
        img, obs = [], []
        s_img, b_img = x["state"], x["belief"]
        s_obs, b_obs = x["state"], x["belief"]
        for t in range(steps):
            _, _, s_img, b_img = out = prior(s_img, b_img, x["action"][:, t], x["prior_noise"][:, t])
            img.append(out)
            _, _, _, b_obs = prior(s_obs, b_obs, x["action"][:, t])
            q_mean, q_std, s_obs = posterior(b_obs, x["embed"][:, t], x["noise"][:, t])
            obs.append((b_obs, s_obs, q_mean, q_std))
        with use_backend(backend_name):
            dream = rssm.imagine(x["action"], st, x["prior_noise"])
            post, _ = rssm.observe(x["embed"], x["action"], state=st, noise=x["noise"])
    for t in range(steps):
        p_mean, p_std, p_state, p_belief = img[t]
        close(dream.deter[:, t], p_belief, f"imagined belief {t}")
        close(dream.stoch[:, t], p_state, f"imagined state {t}")
        close(dream.mean[:, t], p_mean, f"imagined mean {t}")
        close(dream.std[:, t], p_std, f"imagined std {t}")
        for got, want, name in zip(post, obs[t], ("belief", "state", "mean", "std")):
            close(got[:, t], want, f"posterior {name} {t}")


def test_initial_state_is_torchrls_zero_state(mb, device):
    prior, posterior = build(mb, "small", device)
    rssm = from_torchrl(prior, posterior)
    x = inputs("small", device)
    init = rssm.initial(B)
    assert not init.deter.any() and not init.stoch.any()
    with torch.no_grad(), fastwm.backend("reference"):
        want = prior(torch.zeros_like(x["state"]), None, x["action"], x["noise"])  # belief None: GRUCell's zeros
        got = rssm.img_step(init, x["action"], x["noise"])
    for g, w, name in zip((got.mean, got.std, got.stoch, got.deter), want, ("mean", "std", "state", "belief")):
        close(g, w, name)


def test_config_weights_and_copies(mb, device):
    prior, posterior = build(mb, "unequal", device)
    rssm = from_torchrl(prior, posterior)
    hd, d, s, a, e, lb = CASES["unequal"]
    assert (rssm.action_dim, rssm.embed_dim, rssm.stoch, rssm.deter, rssm.hidden) == (a, e, s, d, hd)
    assert (rssm.config.cell, rssm.config.act, rssm.config.std_mode) == ("gru", "elu", "softplus_clamp")
    assert rssm.config.min_std == lb and not rssm.config.norm
    pairs = [
        (rssm.inp, prior.action_state_projector[0]), (rssm.prior1, prior.rnn_to_prior_projector[0]),
        (rssm.prior2, prior.rnn_to_prior_projector[2]), (rssm.post1, posterior.obs_rnn_to_post_projector[0]),
        (rssm.post2, posterior.obs_rnn_to_post_projector[2]), (rssm.cell, prior.rnn),
    ]
    for ours, theirs in pairs:
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
            assert p.device == q.device and p.dtype == q.dtype and p.requires_grad
    with torch.no_grad():
        prior.rnn.weight_ih.add_(1.0)
    assert not torch.equal(rssm.cell.weight_ih, prior.rnn.weight_ih)


def test_tensordict_module_wrappers(mb, device):
    from tensordict.nn import TensorDictModule

    prior, posterior = build(mb, "small", device)
    wp = TensorDictModule(prior, in_keys=["state", "belief", "action"],
                          out_keys=[("next", "prior_mean"), ("next", "prior_std"), "_", ("next", "belief")])
    wq = TensorDictModule(posterior, in_keys=[("next", "belief"), ("next", "encoded_latents")],
                          out_keys=[("next", "posterior_mean"), ("next", "posterior_std"), ("next", "state")])
    rssm = from_torchrl(wp, wq)
    assert torch.equal(rssm.post2.weight, posterior.obs_rnn_to_post_projector[2].weight)


def test_biased_softplus_extractor(mb, device):
    """tensordict's own default mapping, "biased_softplus_1.0" (softplus(raw + b) + 0.01, clamp at 1e-4), converts
    to std_mode "softplus"; one whose clamp binds (scale_lb > 0.01) has no fastwm std mode."""
    from tensordict.nn import NormalParamExtractor

    prior, posterior = build(mb, "small", device)
    prior.rnn_to_prior_projector[3] = NormalParamExtractor()
    posterior.obs_rnn_to_post_projector[3] = NormalParamExtractor()
    rssm = from_torchrl(prior, posterior)
    assert rssm.config.std_mode == "softplus" and rssm.config.min_std == pytest.approx(0.01)
    x = inputs("small", device)
    st = State(x["belief"], x["state"], x["state"], x["state"])
    with torch.no_grad(), fastwm.backend("reference"):
        p_mean, p_std, p_state, p_belief = prior(x["state"], x["belief"], x["action"], x["prior_noise"])
        q_mean, q_std, q_state = posterior(p_belief, x["embed"], x["noise"])
        post, pri = rssm.obs_step(st, x["action"], x["embed"], x["noise"], prior_noise=x["prior_noise"])
    for got, want, name in ((pri.std, p_std, "prior std"), (pri.stoch, p_state, "prior state"),
                            (post.std, q_std, "posterior std"), (post.stoch, q_state, "posterior state")):
        close(got, want, name)
    posterior.obs_rnn_to_post_projector[3] = NormalParamExtractor(scale_lb=0.5)
    with pytest.raises(ValueError, match=r"posterior\.obs_rnn_to_post_projector\[3\].*scale_lb=0.5"):
        from_torchrl(prior, posterior)
    posterior.obs_rnn_to_post_projector[3] = NormalParamExtractor(scale_mapping="exp")
    with pytest.raises(ValueError, match=r"posterior\.obs_rnn_to_post_projector\[3\]\.scale_mapping"):
        from_torchrl(prior, posterior)


def test_bad_arguments(mb, device):
    hd, d, s, a, e, lb = CASES["small"]
    prior, posterior = build(mb, "small", device)

    def post(**kw):
        args = {"hidden_dim": hd, "state_dim": s, "scale_lb": lb, "rnn_hidden_dim": d, "obs_embed_dim": e,
                "device": device}
        return mb.RSSMPosterior(**{**args, **kw})

    with pytest.raises(TypeError, match=r"^prior must be a .*RSSMPrior.*got Linear"):
        from_torchrl(nn.Linear(2, 2), posterior)
    with pytest.raises(TypeError, match=r"^posterior must be a .*RSSMPosterior.*got RSSMPrior"):
        from_torchrl(prior, prior)
    with pytest.raises(TypeError, match=r"^prior must be .*got RSSMPosterior \(are prior and posterior swapped"):
        from_torchrl(posterior, prior)
    with pytest.raises(TypeError, match=r"^posterior must be .*got NoneType"):
        from_torchrl(prior, None)
    with pytest.raises(ValueError, match=r"state_dim .*: prior state_dim gives 5 but posterior state_dim gives 4"):
        from_torchrl(prior, post(state_dim=4))
    with pytest.raises(ValueError, match=r"hidden width Hd .*gives 13 .*gives 12"):
        from_torchrl(prior, post(hidden_dim=12))
    with pytest.raises(ValueError, match=r"std convention"):
        from_torchrl(prior, post(scale_lb=0.1))
    # A posterior built for a wider belief: its embedding width comes out larger, which only the caller can know;
    # one built for a belief wider than its whole input leaves no embedding.
    with pytest.raises(ValueError, match=r"posterior\.obs_rnn_to_post_projector\[0\] takes 9 inputs.*no obs_embedding"):
        from_torchrl(prior, post(rnn_hidden_dim=0))
    with pytest.raises(ValueError, match=r"posterior\.obs_rnn_to_post_projector\[0\] is an uninitialized nn\.LazyLinear"
                                         r".*obs_embed_dim"):
        from_torchrl(prior, mb.RSSMPosterior(hidden_dim=hd, state_dim=s, scale_lb=lb, device=device))
    with pytest.raises(ValueError, match=r"prior\.action_state_projector\[0\] is an uninitialized nn\.LazyLinear"
                                         r".*action_dim"):
        from_torchrl(mb.RSSMPrior(_spec(a), hidden_dim=hd, rnn_hidden_dim=d, state_dim=s, scale_lb=lb,
                                  device=device), posterior)
    # TorchRL's own RSSMPrior with hidden_dim != rnn_hidden_dim cannot run; converting it says why.
    stock = mb.RSSMPrior(_spec(a), hidden_dim=13, rnn_hidden_dim=11, state_dim=s, scale_lb=lb, action_dim=a,
                         device=device)
    with pytest.raises(ValueError, match=r"prior\.rnn_to_prior_projector\[0\] takes 13 inputs but the belief .* 11"):
        from_torchrl(stock, post(rnn_hidden_dim=11))
    with pytest.raises(TypeError, match=r"posterior\.obs_rnn_to_post_projector\[0\] has dtype torch\.float64"):
        from_torchrl(prior, post().double())
    act = prior.action_state_projector[1]
    prior.action_state_projector[1] = nn.Tanh()
    with pytest.raises(ValueError, match=r"prior\.action_state_projector\[1\] must be nn\.ELU"):
        from_torchrl(prior, posterior)
    prior.action_state_projector[1] = act
    posterior.obs_rnn_to_post_projector[1] = nn.SiLU()
    with pytest.raises(ValueError, match=r"the activation: .* gives elu but posterior\.obs_rnn_to_post_projector\[1\] "
                                         r"gives silu"):
        from_torchrl(prior, posterior)
    prior.rnn = nn.GRU(hd, d)
    with pytest.raises(ValueError, match=r"prior\.rnn must be an nn\.GRUCell, got GRU"):
        from_torchrl(prior, posterior)
