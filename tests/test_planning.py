"""CEM and MPPI on a planning problem whose best actions are known in closed form, on both backends."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastwm

A = 3
W = torch.tensor([1.0, -1.5, 0.75], dtype=torch.float64)  # reward = W . z_{t+1} = W . a_t: best a_t = sign(W) at the bound


def _linear_model(device) -> fastwm.RSSM:
    """cell "none", S = A: z_{t+1} = a_t exactly (the std is softplus(-60) ~ 1e-26)."""
    m = fastwm.RSSM(A, 4, stoch=A, hidden=A, cell="none", min_std=0.0).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.inp.weight[:, A:] = torch.eye(A, dtype=torch.float64)
        m.inp.bias.fill_(10.0)  # x = elu(a + 10) = a + 10 for |a| <= 1
        m.prior1.weight.copy_(torch.eye(A, dtype=torch.float64))  # y = elu(x) = x
        m.prior2.weight[:A].copy_(torch.eye(A, dtype=torch.float64))
        m.prior2.bias[:A].fill_(-10.0)  # mean = a
        m.prior2.bias[A:].fill_(-60.0)  # std ~ 0
    return m.to(device)


def _reward(device) -> nn.Linear:
    r = nn.Linear(A, 1).double()
    with torch.no_grad():
        r.weight.copy_(W[None])
        r.bias.zero_()
    return r.to(device)


def _planner(kind: str, m, reward, **kw):
    seed = kw.pop("seed", 0)  # a CPU generator from it, unless a generator (or None) is given
    g = kw.pop("generator") if "generator" in kw else torch.Generator().manual_seed(seed)
    if kind == "cem":
        kw.setdefault("top_k", max(2, kw.get("candidates", 1000) // 10))
        return fastwm.CEMPlanner(m, reward, generator=g, **kw)
    samples = kw.pop("candidates", 1000)
    return fastwm.MPPIPlanner(m, reward, samples=samples, generator=g, **kw)


@pytest.mark.parametrize("kind", ["cem", "mppi"])
@pytest.mark.parametrize("reward_kind", ["mlp", "callable"])
def test_planners_find_the_closed_form_optimum_reference(device, kind, reward_kind):
    m = _linear_model(device)
    reward = _reward(device) if reward_kind == "mlp" else (lambda f: f @ W.to(f.device))
    planner = _planner(kind, m, reward, horizon=4, candidates=400, iterations=10)
    with fastwm.backend("reference"):
        actions = planner(m.initial(2))
    assert actions.shape == (2, A)
    expected = torch.sign(W).to(device).expand(2, A)
    assert torch.equal(torch.sign(actions), expected), actions
    assert (actions.abs() > 0.5).all(), actions


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["cem", "mppi"])
def test_planners_find_the_closed_form_optimum_fused(device, kind):
    # The same problem through the imagination kernel with the reward MLP inside it (small, for the interpreter).
    m = _linear_model(device)
    planner = _planner(kind, m, _reward(device), horizon=2, candidates=64, iterations=5, seed=1)
    with fastwm.backend("triton"):
        actions = planner(m.initial(1))
    assert torch.equal(torch.sign(actions), torch.sign(W).to(device)[None]), actions


@pytest.mark.interpreter
def test_fused_returns_equal_reference_returns(device):
    # The planners' scoring of the same candidates: in-kernel reward MLP, kernel features + a callable reward, and
    # the reference step loop agree (the model is deterministic, so the noise does not matter).
    m = _linear_model(device)
    torch.manual_seed(3)
    mlp_reward = nn.Sequential(nn.Linear(A, 5), nn.Tanh(), nn.Linear(5, 1)).double().to(device)
    cand = (torch.rand(2, 16, 3, A, dtype=torch.float64) * 2 - 1).to(device)
    state = m.initial(2)
    scores = {}
    for name, backend, reward in (("kernel-mlp", "triton", mlp_reward), ("kernel-feat", "triton",
                                  lambda f: mlp_reward(f).squeeze(-1)), ("reference", "reference", mlp_reward)):
        planner = fastwm.CEMPlanner(m, reward, horizon=3, candidates=16, top_k=4)
        with fastwm.backend(backend), torch.no_grad():
            scores[name] = planner._returns(state.stoch, state.deter, cand)
    expected = mlp_reward(cand).squeeze(-1).sum(-1)  # z_{t+1} = a_t
    for name, got in scores.items():
        torch.testing.assert_close(got.double(), expected, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_deterministic_scoring_follows_the_prior_mean(device, backend):
    # The linear model with a wide prior (std = softplus(0) ~ 0.69): stochastic=False scores each candidate along
    # the mean path z_{t+1} = a_t exactly; the default samples and does not.
    m = _linear_model(device)
    with torch.no_grad():
        m.prior2.bias[A:].fill_(0.0)
    torch.manual_seed(5)
    cand = (torch.rand(2, 16, 3, A, dtype=torch.float64) * 2 - 1).to(device)
    expected = (cand @ W.to(device)).sum(-1)
    state = m.initial(2)
    got = {}
    for stochastic in (False, True):
        planner = fastwm.CEMPlanner(m, _reward(device), horizon=3, candidates=16, top_k=4, stochastic=stochastic,
                                    generator=torch.Generator().manual_seed(0))
        with fastwm.backend(backend), torch.no_grad():
            got[stochastic] = planner._returns(state.stoch, state.deter, cand)
    torch.testing.assert_close(got[False], expected, rtol=1e-9, atol=1e-9)
    assert (got[True] - expected).abs().max() > 0.1


@pytest.mark.interpreter
def test_a_reward_that_is_not_plain_runs_as_it_is(device):
    # A reward MLP with a forward hook (here a cost turned into a reward) must not run in the kernel as its bare
    # weights: the fused planner scores with the hook, as the reference planner does.
    m = _linear_model(device)
    cost = nn.Sequential(nn.Linear(A, 5), nn.Tanh(), nn.Linear(5, 1)).double().to(device)
    cost[2].register_forward_hook(lambda mod, inp, out: -out)
    torch.manual_seed(4)
    cand = (torch.rand(2, 16, 3, A, dtype=torch.float64) * 2 - 1).to(device)
    state = m.initial(2)
    for backend in ("triton", "reference"):
        planner = fastwm.CEMPlanner(m, cost, horizon=3, candidates=16, top_k=4)
        with fastwm.backend(backend), torch.no_grad():
            got = planner._returns(state.stoch, state.deter, cand)
        torch.testing.assert_close(got, cost(cand).squeeze(-1).sum(-1), rtol=1e-9, atol=1e-9, msg=backend)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to-float16"])
def test_bounds_keep_their_value_when_the_planner_is_cast(device, cast):
    # Module.half() / .to(dtype) cast floating buffers; the bounds stay float64 and only follow the device (0.3 in
    # bfloat16 is 0.30078125: the plan, float32 for a half model, would leave the bounds).
    m = _linear_model(device)
    high = [0.3, 0.7, 0.1]
    planner = fastwm.CEMPlanner(m, _reward(device), horizon=2, candidates=40, iterations=2, top_k=5,
                                action_low=-0.3, action_high=high, init_std=0.2)
    planner = planner.to(torch.float16) if cast == "to-float16" else getattr(planner, cast)()
    for name, want in (("action_low", [-0.3] * A), ("action_high", high), ("init_std", [0.2] * A)):
        got = getattr(planner, name)
        assert got.dtype == torch.float64 and got.device.type == device.type, name
        assert got.tolist() == want, name
    with fastwm.backend("reference"):
        actions = planner(m.initial(2))
    low_t = torch.full((A,), -0.3, dtype=torch.float64).to(device, actions.dtype)
    high_t = torch.tensor(high, dtype=torch.float64).to(device, actions.dtype)
    assert ((actions >= low_t) & (actions <= high_t)).all()


def test_same_generator_seed_same_plan(device):
    m = _linear_model(device)
    with fastwm.backend("reference"):
        a = _planner("cem", m, _reward(device), horizon=3, candidates=50, iterations=3, seed=7).plan(m.initial(1))
        b = _planner("cem", m, _reward(device), horizon=3, candidates=50, iterations=3, seed=7).plan(m.initial(1))
        c = _planner("cem", m, _reward(device), horizon=3, candidates=50, iterations=3, seed=8).plan(m.initial(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_warm_start_shifts_the_previous_plan(device):
    m = _linear_model(device)
    planner = _planner("mppi", m, _reward(device), horizon=4, candidates=20, iterations=1)
    with fastwm.backend("reference"):
        plan = planner.plan(m.initial(2))
    kept = plan.clone()
    plan.fill_(0.75)  # the caller's copy: editing it must not change the warm start
    start = planner._initial_mean(2, plan)
    assert torch.equal(start[:, :-1], kept[:, 1:])
    assert torch.equal(start[:, -1], torch.zeros(2, A, dtype=plan.dtype, device=device))
    planner.reset()
    assert torch.equal(planner._initial_mean(2, plan), torch.zeros(2, 4, A, dtype=plan.dtype, device=device))


def test_action_bounds_are_respected(device):
    m = _linear_model(device)
    planner = fastwm.CEMPlanner(m, _reward(device), horizon=2, candidates=40, iterations=3, top_k=5,
                                action_low=[-0.5, -0.2, 0.0], action_high=[0.25, 1.0, 0.5])
    with fastwm.backend("reference"):
        actions = planner(m.initial(3))
    low = torch.tensor([-0.5, -0.2, 0.0], dtype=torch.float64, device=device)
    high = torch.tensor([0.25, 1.0, 0.5], dtype=torch.float64, device=device)
    assert ((actions >= low) & (actions <= high)).all()


@pytest.mark.parametrize("kind", ["cem", "mppi"])
def test_bounds_edited_in_place_take_effect(device, kind):
    # The bounds are public float64 buffers: an in-place edit after a first decision (which copies them to the
    # float32 belief's dtype and caches the copies) must reach the next decision.
    m = _linear_model(device).float()
    planner = _planner(kind, m, _reward(device).float(), horizon=2, candidates=64, iterations=3)
    with fastwm.backend("reference"):
        first = planner(m.initial(2))
        assert first.max() > 0.5  # the optimum sign(W) lies at the bounds +-1
        planner.action_high.fill_(0.5)
        planner.reset()
        actions = planner(m.initial(2))
    assert actions.max() <= 0.5
    assert (actions[:, [0, 2]] > 0).all() and (actions[:, 1] < 0).all()  # still toward the optimum sign(W)


@pytest.mark.parametrize("kind", ["cem", "mppi"])
def test_no_beliefs_no_actions(device, kind):
    m = _linear_model(device)
    planner = _planner(kind, m, _reward(device), horizon=2, candidates=16, iterations=2)
    with fastwm.backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's std used to warn on the empty batch
        actions = planner(m.initial(0))
    assert actions.shape == (0, A) and actions.dtype == torch.float64


@pytest.mark.parametrize("kwargs,match", [
    ({"horizon": 0}, "horizon must be a positive int"),
    ({"candidates": 2.5}, "candidates must be a positive int"),
    ({"iterations": -1}, "iterations must be a positive int"),
    ({"top_k": 0}, "top_k must be a positive int"),
    ({"top_k": 2000}, "top_k must be at most candidates"),
    ({"action_low": 1.0, "action_high": -1.0}, "action_low must be below action_high"),
    ({"action_low": [0.0, 1.0]}, "action_low must be a float or a sequence of 3 floats"),
    ({"action_high": float("nan")}, "action_high must be finite"),
    ({"init_std": -1.0}, "init_std must be a positive float"),
    ({"min_std": float("nan")}, "min_std must be a float >= 0"),
])
def test_cem_bad_arguments(device, kwargs, match):
    m = _linear_model(device)
    with pytest.raises(ValueError, match=match):
        fastwm.CEMPlanner(m, _reward(device), **kwargs)


def test_bad_planner_arguments(device):
    m = _linear_model(device)
    with pytest.raises(ValueError, match="temperature must be a positive float"):
        fastwm.MPPIPlanner(m, _reward(device), temperature=0.0)
    with pytest.raises(TypeError, match="rssm must be a fastwm.RSSM"):
        fastwm.CEMPlanner(nn.Linear(3, 3), _reward(device))
    with pytest.raises(TypeError, match="reward must be callable"):
        fastwm.CEMPlanner(m, 3.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastwm.CEMPlanner(m, _reward(device), generator=0)
    with pytest.raises(TypeError, match="stochastic must be a bool"):
        fastwm.MPPIPlanner(m, _reward(device), stochastic="no")
    for kwargs, match in [({"action_low": "a"}, "action_low must be a float or a sequence of 3 floats"),
                          ({"init_std": "a"}, "init_std must be a float"), ({"min_std": None}, "min_std must be a float"),
                          ({"temperature": "hot"}, "temperature must be a float")]:
        with pytest.raises(TypeError, match=match):
            fastwm.MPPIPlanner(m, _reward(device), **kwargs)
    planner = fastwm.CEMPlanner(m, lambda f: f, horizon=2, candidates=10, top_k=2, iterations=1)
    with fastwm.backend("reference"), pytest.raises(ValueError, match="reward must map features"):
        planner(m.initial(1))
    planner = fastwm.CEMPlanner(m, lambda f: f.sum(-1).tolist(), horizon=2, candidates=10, top_k=2, iterations=1)
    with fastwm.backend("reference"), pytest.raises(TypeError, match="reward must return a torch.Tensor"):
        planner(m.initial(1))
    with pytest.raises(ValueError, match=r"state.deter must have shape \[B, 0\]"):
        fastwm.CEMPlanner(m, _reward(device))(fastwm.State(*(torch.zeros(1, 4, dtype=torch.float64,
                                                                          device=device),) * 4))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_planner_value_checks(device, backend):
    """With set_validate_args(True), a non-finite belief or predicted return raises naming it (in the reward MLP
    inside the imagination kernel too), on both planners; off, nothing is checked."""
    m = _linear_model(device)
    nan_reward = nn.Linear(A, 1).double().to(device)
    with torch.no_grad():
        nan_reward.bias.fill_(float("nan"))
    nan_state = m.initial(2)._replace(stoch=torch.full((2, A), float("nan"), dtype=torch.float64, device=device))
    fastwm.set_validate_args(True)
    try:
        with fastwm.backend(backend):
            for kind in ("cem", "mppi"):
                with pytest.raises(ValueError, match="the predicted returns .* must be finite"):
                    _planner(kind, m, nan_reward, horizon=2, candidates=8, iterations=1)(m.initial(2))
                with pytest.raises(ValueError, match="state.stoch must be finite"):
                    _planner(kind, m, _reward(device), horizon=2, candidates=8, iterations=1)(nan_state)
    finally:
        fastwm.set_validate_args(False)
    with fastwm.backend(backend):
        actions = _planner("mppi", m, nan_reward, horizon=2, candidates=8, iterations=1)(m.initial(2))
    assert actions.shape == (2, A)


def test_bounds_are_made_on_the_models_device(device):
    m = _linear_model(device)
    planner = fastwm.CEMPlanner(m, _reward(device), action_low=[-0.5, -0.2, 0.0], action_high=1.0)
    for t in (planner.action_low, planner.action_high, planner.init_std):
        assert t.device == m.prior2.weight.device and t.dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_decision_captured_by_the_caller(device, backend):
    # A user who captures a whole decision in a CUDA graph, with no eager call of this planner before the capture:
    # nothing in it may copy from the host (the bounds were made on the model's device), and the replay plans
    # inside the bounds. (Another planner warms the kernels and cuBLAS up first, on a side stream.)
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a cuda device")
    m = _tracking_model(device)
    kw = dict(horizon=3, candidates=32, top_k=4, iterations=2, action_low=-0.5, action_high=0.5, cuda_graph=True)
    belief = m.initial(2)._replace(stoch=torch.full((2, A), 0.3, dtype=torch.float64, device=device))
    with fastwm.backend(backend):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fastwm.CEMPlanner(m, _tracking_reward, **kw)(belief)
        torch.cuda.current_stream(device).wait_stream(side)
        planner = fastwm.CEMPlanner(m, _tracking_reward, **kw)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = planner(belief)
        graph.replay()
        torch.cuda.synchronize(device)
    assert out.shape == (2, A) and torch.isfinite(out).all()
    assert ((out >= -0.5) & (out <= 0.5)).all()


def _tracking_model(device) -> fastwm.RSSM:
    """cell "none", S = A: z_{t+1} = z_t + a_t exactly. With the reward -|z_{t+1}|^2 the best first action is -z_0
    (within the bounds), so the plan depends on the belief."""
    m = _linear_model(device)
    with torch.no_grad():
        m.inp.weight[:, :A] = torch.eye(A, dtype=torch.float64, device=device)  # x = elu(z + a + 10) = z + a + 10
    return m


def _tracking_reward(f: torch.Tensor) -> torch.Tensor:
    return -(f * f).sum(-1)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["cem", "mppi"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cuda_graph_planner_follows_the_belief(device, kind, backend):
    """cuda_graph=True: one capture per belief count, replayed with each call's belief and warm start (the best first
    action follows -z_0 from call to call), and the same seed gives the same plans. Off the GPU the flag changes
    nothing: the plans equal those of cuda_graph=False, and nothing is captured."""
    m = _tracking_model(device)
    z0 = torch.tensor([[0.6, -0.6, 0.4]], dtype=torch.float64, device=device)
    beliefs = [m.initial(1)._replace(stoch=sign * z0) for sign in (1.0, -1.0, 1.0)]
    # no wrong sign in 400 plans of 200 seeds at (3, 1000, 8); the interpreter's small case is checked at its seed
    small = backend == "triton" and device.type == "cpu"
    horizon, candidates, iterations = (2, 48, 4) if small else (3, 1000, 8)

    def run(cuda_graph: bool, seed: int) -> tuple[list[torch.Tensor], object]:
        top_k = {"top_k": candidates // 8} if kind == "cem" else {}
        planner = _planner(kind, m, _tracking_reward, horizon=horizon, candidates=candidates, iterations=iterations,
                           cuda_graph=cuda_graph, generator=torch.Generator(device=device).manual_seed(seed), **top_k)
        with fastwm.backend(backend):
            return [planner.plan(b) for b in beliefs], planner

    plans, planner = run(True, 3)
    for belief, plan in zip(beliefs, plans):
        assert torch.equal(torch.sign(plan[:, 0]), -torch.sign(belief.stoch)), (plan[:, 0], belief.stoch)
    again, _ = run(True, 3)
    for a, b in zip(plans, again):
        assert torch.equal(a, b)
    if device.type == "cuda":
        assert len(planner._graphs) == 1
        planner.clear_graphs()
        assert not planner._graphs
    else:
        assert not planner._graphs
        eager, _ = run(False, 3)
        for a, b in zip(plans, eager):
            assert torch.equal(a, b)


def test_cuda_graph_arguments(device):
    m = _linear_model(device)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        fastwm.CEMPlanner(m, _reward(device), cuda_graph=1)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        fastwm.MPPIPlanner(m, _reward(device), cuda_graph="yes")
    planner = fastwm.CEMPlanner(m, _reward(device), horizon=2, candidates=10, top_k=2, iterations=1,
                                cuda_graph=True, generator=torch.Generator().manual_seed(0))
    with fastwm.backend("reference"):
        if device.type == "cuda":  # the candidates are drawn inside the graph: a CPU generator cannot be captured
            with pytest.raises(ValueError, match="generator must be a torch.Generator on the belief's device"):
                planner(m.initial(1))
        else:
            assert planner(m.initial(1)).shape == (1, A)


def test_cem_bench_providers():
    """The benchmark's planner providers: graphed and fastwm-graphed time the planner's cuda_graph=True, on cuda
    only; fastwm-graphed is a provider of cem_decision alone."""
    from fastwm.benchmarks import bench_rollout as br

    assert set(br.CEM_PROVIDERS) == {"eager", "graphed", "fastwm", "fastwm-graphed"}
    assert "cem_decision only" in br.provider_unavailable("fastwm-graphed", "cpu", torch.float32, "imagine")
    assert "cuda" in br.provider_unavailable("fastwm-graphed", "cpu", torch.float32, "cem_decision")
    assert "cuda" in br.provider_unavailable("graphed", "cpu", torch.float32, "cem_decision")
    size = br.size_for("planet", True)
    with pytest.raises(ValueError, match="cem_decision only"):
        br.build_case("imagine", "fastwm-graphed", size, 4, 2, torch.float32, "cpu")
    for provider in ("graphed", "fastwm-graphed"):
        with pytest.raises(ValueError, match="needs a cuda device"):
            br.build_cem_case(provider, size, br.cem_settings(1, True), torch.float32, "cpu")
    settings = br.cem_settings(1, True)
    assert br.footprint_bytes("cem_decision", "fastwm-graphed", size, 0, 0, torch.float32, cem=settings) == (
        2 * br.footprint_bytes("cem_decision", "fastwm", size, 0, 0, torch.float32, cem=settings))


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["cem", "mppi"])
@pytest.mark.parametrize("backend,reward_kind", [("reference", "mlp"), ("triton", "mlp"), ("triton", "callable")])
@pytest.mark.parametrize("own_generator", [True, False])
def test_cuda_graph_replay_equals_eager_planning(device, kind, backend, reward_kind, own_generator):
    """A replayed decision is the eager decision: from the same generator state, the graphed and the eager planner
    give the same plan (random GRU model, sampled latents, no warm start), and the next call of each draws fresh
    candidates the same way. After an in-place weight update the replay sees the new weights; a new belief count
    captures a second graph. Reward: a plain MLP (inside the imagination kernel on the Triton backend) or a callable
    on the kernel's features; generator: the planner's own or the default CUDA one."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a cuda device")
    torch.manual_seed(0)
    m = fastwm.RSSM(A, 4, stoch=5, deter=8, hidden=8).to(device)
    mlp = nn.Sequential(nn.Linear(13, 16), nn.ELU(), nn.Linear(16, 1)).to(device)
    reward = mlp if reward_kind == "mlp" else (lambda f: mlp(f).squeeze(-1))
    belief = fastwm.State(torch.randn(2, 8, device=device), torch.randn(2, 5, device=device),
                          torch.zeros(2, 5, device=device), torch.ones(2, 5, device=device))

    def make(cuda_graph: bool):
        gen = torch.Generator(device=device).manual_seed(0) if own_generator else None
        top_k = {"top_k": 8} if kind == "cem" else {}
        return _planner(kind, m, reward, horizon=4, candidates=64, iterations=3, warm_start=False,
                        cuda_graph=cuda_graph, generator=gen, **top_k), gen

    def reseed(gen, seed: int) -> None:
        if gen is None:
            torch.cuda.manual_seed(seed)
        else:
            gen.manual_seed(seed)

    graphed, g_gen = make(True)
    eager, e_gen = make(False)
    with fastwm.backend(backend), torch.no_grad():
        graphed.plan(belief)  # the warm-ups and the capture
        assert len(graphed._graphs) == 1
        for seed in (5, 6):
            reseed(g_gen, seed)
            got = [graphed.plan(belief), graphed.plan(belief)]
            reseed(e_gen, seed)
            want = [eager.plan(belief), eager.plan(belief)]
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            assert not torch.equal(got[0], got[1])  # every replay draws fresh candidates
            with torch.no_grad():
                m.prior2.bias.add_(0.5)  # seen by the next replay, no new capture
                mlp[0].weight.mul_(1.5)
        assert len(graphed._graphs) == 1
        graphed.plan(fastwm.State(*(x[:1] for x in belief)))
        assert len(graphed._graphs) == 2


def test_planner_built_and_called_under_inference_mode(device):
    # inference tensors have no version counter: the planner's cached bounds must not need one
    with torch.inference_mode(), fastwm.backend("reference"):
        m = _linear_model(device)
        planner = fastwm.CEMPlanner(m, _reward(device), horizon=2, candidates=10, top_k=2, iterations=1)
        assert planner(m.initial(1)).shape == (1, A)
        assert planner(m.initial(1)).shape == (1, A)


def test_generator_device_match():
    from fastwm.planning import _same_device

    cuda, cuda0, cuda1, cpu = (torch.device(x) for x in ("cuda", "cuda:0", "cuda:1", "cpu"))
    assert _same_device(cuda, cuda0) and _same_device(cuda0, cuda) and _same_device(cuda1, cuda1)
    assert not _same_device(cuda0, cuda1) and not _same_device(cpu, cuda0) and not _same_device(cuda, cpu)
