"""torch.compile(fullgraph=True) traces through the fastwm custom ops (Triton kernels under the interpreter on CPU), and
a CUDA graph captures them (on cuda)."""

from __future__ import annotations

import pytest
import torch

import fastwm

pytestmark = pytest.mark.interpreter


def _loss(q_raw, p_raw, noise):
    out = fastwm.gaussian_head_sample_kl(q_raw, p_raw, noise, mode="softplus")
    std = fastwm.std_from_raw(q_raw, mode="sigmoid2")
    kl = fastwm.kl_loss(out.post_mean, out.post_std, out.prior_mean, out.prior_std, **fastwm.KL_PRESETS["dreamerv3"])
    z = fastwm.gaussian_rsample(out.prior_mean, out.prior_std)  # seeded: a seed tensor drawn inside the graph
    return (out.sample.square().sum() + out.kl.sum() + kl + std.sum(), z)


def test_fullgraph_compile_matches_eager(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q_raw = torch.randn(3, 5, 64, generator=g).to(device).requires_grad_()
    p_raw = torch.randn(3, 5, 64, generator=g).to(device).requires_grad_()
    noise = torch.randn(3, 5, 32, generator=g).to(device)
    with fastwm.backend("triton"):
        compiled = torch.compile(_loss, fullgraph=True)
        loss_c, z_c = compiled(q_raw, p_raw, noise)
        grads_c = torch.autograd.grad(loss_c, (q_raw, p_raw))
        loss_e, z_e = _loss(q_raw, p_raw, noise)
        grads_e = torch.autograd.grad(loss_e, (q_raw, p_raw))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert z_c.shape == (3, 5, 32) and torch.isfinite(z_c).all()


def test_custom_ops_registered():
    for name in ("gaussian_fused", "gaussian_fused_backward", "std_from_raw", "std_from_raw_backward"):
        assert hasattr(torch.ops.fastwm, name)


def test_opcheck_fused(device):
    # torch.library.opcheck: schema, fake tensor and autograd registration are consistent with the kernel.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 20, generator=g, dtype=torch.float64).to(device).requires_grad_()
    p = torch.randn(4, 20, generator=g, dtype=torch.float64).to(device).requires_grad_()
    n = torch.randn(4, 10, generator=g, dtype=torch.float64).to(device)
    torch.library.opcheck(torch.ops.fastwm.gaussian_fused.default, (q, None, p, None, n, None, 0, 0.1, True, True))
    torch.library.opcheck(torch.ops.fastwm.std_from_raw.default, (q, 0.1, 2))


@pytest.mark.parametrize("cell", ["gru", "layernorm_gru", "none"])
def test_cuda_graph_replays_observe_backward_and_imagine(device, cell):
    """A training step captured in a CUDA graph (how Dreamer users cut launch overhead): the fused observe forward
    and backward, the KL, then imagination from the last posterior; replayed on new inputs (resets mid-sequence,
    new noise) it gives what the same step gives uncaptured. Nothing in the fused path may sync with the host, or
    the capture fails."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a cuda device")
    torch.manual_seed(0)
    b, t, h, e, a, s = 5, 7, 6, 8, 3, 4
    m = fastwm.RSSM(a, e, stoch=s, deter=16, hidden=16, cell=cell).to(device)
    params = list(m.parameters())
    static = {
        "embed": torch.randn(b, t, e, device=device), "action": torch.randn(b, t, a, device=device),
        "is_first": torch.zeros(b, t, dtype=torch.bool, device=device), "noise": torch.randn(b, t, s, device=device),
        "img_actions": torch.randn(b, h, a, device=device), "img_noise": torch.randn(b, h, s, device=device),
    }

    def step() -> list[torch.Tensor]:
        post, prior = m.observe(static["embed"], static["action"], static["is_first"], noise=static["noise"])
        kl = fastwm.gaussian_kl(post.mean, post.std, prior.mean, prior.std)
        loss = kl.mean() + post.stoch.square().mean() + prior.mean.square().mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            last = fastwm.State(*(part[:, -1] for part in post))
            dream = m.imagine(static["img_actions"], last, static["img_noise"])
        return [loss.detach(), post.stoch.detach(), *(g for g in grads if g is not None), dream.stoch, dream.deter]

    with fastwm.backend("triton"):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(2):
            for name, x in static.items():
                if name == "is_first":
                    x.copy_(torch.rand(b, t, device=device) < 0.2)
                    x[:, 0] = True
                else:
                    x.copy_(torch.randn_like(x))
            graph.replay()
            replayed = [x.clone() for x in captured]
            eager = step()
            assert len(replayed) == len(eager)
            for got, want in zip(replayed, eager):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "none"])
def test_fullgraph_compile_of_no_grad_imagination(device, cell):
    # No-gradient imagine and a plain-MLP rollout run their one-launch kernel; inside torch.compile that launch is the
    # registered op fastwm::rollout (a compiler cannot trace the launcher), and the compiled call gives what the
    # eager one gives: exactly, with the same seed drawn for the in-kernel noise (fallback_random).
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = fastwm.RSSM(3, 6, stoch=4, deter=8, hidden=8, cell=cell).to(device)
    policy = torch.nn.Sequential(torch.nn.Linear(m.feature_dim, 8), torch.nn.ELU(), torch.nn.Linear(8, 3),
                                 torch.nn.Tanh()).to(device)
    g = torch.Generator().manual_seed(1)
    start = fastwm.State(*(torch.randn(t.shape, generator=g).to(device) for t in m.initial(5)))
    actions = torch.randn(5, 4, 3, generator=g).to(device)
    noise = torch.randn(5, 4, 4, generator=g).to(device)

    def dream(start, actions, noise):
        with torch.no_grad():
            img = m.imagine(actions, start, noise)
            closed, acts = m.rollout(policy, start, 3)
        return (*img, *closed, acts)

    assert hasattr(torch.ops.fastwm, "rollout")
    with fastwm.backend("triton"), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(dream, fullgraph=True)
        torch.manual_seed(2)
        got = compiled(start, actions, noise)
        torch.manual_seed(2)
        want = dream(start, actions, noise)
    assert len(got) == len(want) == 9
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)


def test_opcheck_rollout(device):
    # fastwm::rollout's schema and fake registration agree with the kernel (closed loop with a reward sum, and open
    # loop writing the features).
    torch.manual_seed(0)
    m = fastwm.RSSM(3, 6, stoch=4, deter=8, hidden=8).double().to(device)
    start = [torch.randn(t.shape, dtype=torch.float64, device=device) for t in m.initial(3)]
    weights = [torch.empty(0, dtype=torch.float64, device=device) if t is None else t.detach() for t in m.weights()]
    pol = [torch.randn(3, m.feature_dim, dtype=torch.float64, device=device),
           torch.randn(3, dtype=torch.float64, device=device)]
    rew = [torch.randn(1, m.feature_dim, dtype=torch.float64, device=device),
           torch.randn(1, dtype=torch.float64, device=device)]
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    noise = torch.randn(3, 2, 4, dtype=torch.float64, device=device)
    actions = torch.randn(3, 2, 3, dtype=torch.float64, device=device)
    op = torch.ops.fastwm.rollout.default
    torch.library.opcheck(op, (start[1], start[0], None, None, seed, weights, pol, rew, 2, 0, 0, False, 0, 0.1, 1e-3,
                               4, 3, 4, 4, True, False, False))
    torch.library.opcheck(op, (start[1], start[0], actions, noise, None, weights, [], [], 2, 0, 0, False, 0, 0.1, 1e-3,
                               4, 4, 4, 4, False, True, True))


def test_value_checks_stay_out_of_a_cuda_graph_capture(device):
    # set_validate_args(True) checks values with a host sync; inside a capture (where a sync is an error) every value
    # check is skipped, is_first's 0 / 1 check included.
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a cuda device")
    torch.manual_seed(0)
    m = fastwm.RSSM(3, 8, stoch=4, deter=16, hidden=16).to(device)
    embed, action = torch.randn(2, 3, 8, device=device), torch.randn(2, 3, 3, device=device)
    first = torch.zeros(2, 3, device=device)  # numbers, not bool: the check that syncs
    first[:, 0] = 1
    noise = torch.randn(2, 3, 4, device=device)
    fastwm.set_validate_args(True)
    try:
        with fastwm.backend("triton"), torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                m.observe(embed, action, first, noise=noise, prior_noise=noise)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                post, _ = m.observe(embed, action, first, noise=noise, prior_noise=noise)
            graph.replay()
            want, _ = m.observe(embed, action, first, noise=noise, prior_noise=noise)
    finally:
        fastwm.set_validate_args(False)
    torch.testing.assert_close(post.stoch, want.stoch, rtol=0, atol=0)
