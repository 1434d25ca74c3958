"""torch.autocast: a float32 model inside an autocast region computes what the model cast to the autocast dtype computes.

The rule (fastwm/_amp.py): the parameters and the float32 inputs are cast to the autocast dtype once per call, and the
layer's body runs with autocast off, on both backends. So every result under autocast must EQUAL the result of a copy
of the model in that dtype on inputs cast to it (the same kernels on the same values), and the gradients reaching the
float32 parameters and inputs must be that copy's, cast up. The Triton path is also held to the float64 reference
(flash-attn's bound, against the reference backend in the same dtype).

On the CPU the interpreter has no bfloat16 (NumPy): its Triton cases run float16 autocast only; the reference backend
runs both. On cuda every case runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import fastwm
from fastwm import State
from fastwm.overshooting import latent_overshooting_kl

from .conftest import RTOL, assert_close

pytestmark = pytest.mark.interpreter

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [("reference", "bf16"), ("reference", "fp16"), ("triton", "fp16"), ("triton", "bf16")]
CELLS = ["gru", "layernorm_gru", "none"]
B, T, E, A, S, D, HD = 3, 4, 6, 2, 3, 5, 7  # odd widths


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for b, d in CASES])
def case(request, device) -> tuple[str, torch.dtype]:
    backend, half = request.param
    if device.type == "cpu" and backend == "triton" and half == "bf16":
        pytest.skip("the Triton interpreter has no bfloat16 (NumPy); run on cuda")
    return backend, HALF[half]


def _model(cell: str, device: torch.device, seed: int = 0, **kw) -> fastwm.RSSM:
    torch.manual_seed(seed)
    m = fastwm.RSSM(A, E, stoch=S, deter=D, hidden=HD, cell=cell, **kw).to(device)
    with torch.no_grad():  # weights away from the default init's narrow range
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _half(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(m).to(dtype)


def _randn(*shape: int, device: torch.device, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device)


def _gen(device: torch.device, seed: int = 7) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _assert_equal(got: Tensor, want: Tensor, name: str) -> None:
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, the cast model's is {want.dtype}"
    assert torch.equal(got, want), f"{name}: differs from the cast model's (max {(got.double() - want.double()).abs().max():.3e})"


def _assert_grads(got: Tensor | None, want: Tensor | None, name: str, calls: int = 1) -> None:
    """The gradient of a float32 leaf under autocast: the cast copy's own gradient, cast up (the same kernels on the
    same values, summed in the same order). With ``calls`` > 1 layer calls in the graph, each cast the weights
    afresh, and their gradients meet in float32 at the leaf where the copy sums them in its half dtype: equal to a
    rounding of that dtype."""
    assert got is not None and want is not None, f"{name}: no gradient"
    assert got.dtype == torch.float32, f"{name}: gradient dtype {got.dtype}, not the float32 leaf's"
    if calls == 1:
        assert torch.equal(got, want.float()), (f"{name}: differs from the cast model's gradient (max "
                                                f"{(got - want.float()).abs().max():.3e})")
    else:
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want.float(), rtol=0, atol=RTOL[want.dtype] * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.fixture
def autocast_off_inside(monkeypatch) -> list[str]:
    """Spies on the reference path's step functions and the planners' refit: each records a failure when it runs
    with autocast on (on the CPU autocast lists none of softplus, layer_norm, exp or topk, so the values alone
    cannot tell)."""
    from fastwm import planning, reference

    failures: list[str] = []

    def spy(owner, name):
        real = getattr(owner, name)

        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu") or (torch.cuda.is_available() and torch.is_autocast_enabled("cuda")):
                failures.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, run)

    spy(reference, "rssm_prior_step")
    spy(reference, "rssm_posterior_step")
    spy(planning.CEMPlanner, "_refit")
    spy(planning.MPPIPlanner, "_refit")
    spy(planning._Planner, "_sample")
    return failures


# ----------------------------------------------------------------------------------------------------------------------
# observe, the steps, imagination
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-inside"])
@pytest.mark.parametrize("cell,initial", [(c, "zeros") for c in CELLS] + [("layernorm_gru", "learned")],
                         ids=CELLS + ["layernorm_gru-learned"])
def test_observe_under_autocast_is_the_cast_model(cell, initial, backward_inside, case, device, autocast_off_inside):
    backend, dtype = case
    m = _model(cell, device, initial=initial)
    mh = _half(m, dtype)
    embed = _randn(B, T, E, device=device, seed=1).requires_grad_()
    action = _randn(B, T, A, device=device, seed=2).to(dtype)  # inputs may come in either dtype
    first = torch.zeros(B, T, dtype=torch.bool, device=device)
    first[1, 2] = True  # a reset mid-sequence
    init = State(*(_randn(B, w, device=device, seed=3 + i) for i, w in enumerate((m.deter, S, S, S))))
    init = State(init.deter.requires_grad_(), init.stoch.requires_grad_(), init.mean, init.std.abs() + 0.5)
    noise = _randn(B, T, S, device=device, seed=8)
    prior_noise = _randn(B, T, S, device=device, seed=10)
    up = _randn(B, T, S, device=device, seed=9)  # an upstream gradient that is not all ones
    with fastwm.backend(backend):
        with torch.autocast(device.type, dtype=dtype):
            post, prior, kl = m.observe(embed, action, first, init, noise, prior_noise=prior_noise, return_kl=True)
            loss = (post.stoch.float() * up).sum() + kl.sum() + prior.std.float().sum()
            if backward_inside:  # the custom ops' backward must turn autocast off itself
                loss.backward()
        if not backward_inside:
            loss.backward()
        embed_h = embed.detach().to(dtype).requires_grad_()
        init_h = State(*(t.detach().to(dtype) for t in init))
        init_h = State(init_h.deter.requires_grad_(), init_h.stoch.requires_grad_(), init_h.mean, init_h.std)
        half_args = (action, first, init_h, noise.to(dtype))
        post_h, prior_h, kl_h = mh.observe(embed_h, *half_args, prior_noise=prior_noise.to(dtype), return_kl=True)
        ((post_h.stoch.float() * up).sum() + kl_h.sum() + prior_h.std.float().sum()).backward()
    for name, got, want in zip(("deter", "stoch", "mean", "std"), post, post_h):
        _assert_equal(got, want, f"post.{name}")
    for name, got, want in zip(("deter", "stoch", "mean", "std"), prior, prior_h):
        _assert_equal(got, want, f"prior.{name}")
    _assert_equal(kl, kl_h, "kl")
    assert kl.dtype == torch.float32
    for (name, p), ph in zip(m.named_parameters(), mh.parameters()):
        _assert_grads(p.grad, ph.grad, name)
    _assert_grads(embed.grad, embed_h.grad, "embed")
    if cell != "none":
        _assert_grads(init.deter.grad, init_h.deter.grad, "state.deter")
    _assert_grads(init.stoch.grad, init_h.stoch.grad, "state.stoch")
    if backend == "triton":
        # the kernels in the half dtype against the float64 reference of the cast model, within flash-attn's bound
        # around the reference backend in the same dtype
        with fastwm.backend("reference"):
            eager, _, eager_kl = mh.observe(embed_h.detach(), *half_args, prior_noise=prior_noise.to(dtype),
                                            return_kl=True)
            m64 = copy.deepcopy(mh).double()
            ref, _, ref_kl = m64.observe(embed_h.detach().double(), action.double(), first,
                                         State(*(t.detach().double() for t in init_h)), noise.to(dtype).double(),
                                         prior_noise=prior_noise.to(dtype).double(), return_kl=True)
        for field, got, want, e in zip(State._fields, post, ref, eager):
            assert_close(got, want, dtype, f"post.{field}", eager=e)
        assert_close(kl, ref_kl, dtype, "kl", eager=eager_kl)
    assert not autocast_off_inside, f"ran with autocast on: {autocast_off_inside}"


@pytest.mark.parametrize("cell", CELLS)
def test_steps_under_autocast_are_the_cast_model(cell, case, device, autocast_off_inside):
    backend, dtype = case
    m = _model(cell, device, seed=1)
    mh = _half(m, dtype)
    state = m.initial(B)  # the parameters' dtype: taken under autocast too
    action = _randn(B, A, device=device, seed=4)
    embed = _randn(B, E, device=device, seed=5)
    noise = _randn(B, S, device=device, seed=6)
    with fastwm.backend(backend):
        with torch.autocast(device.type, dtype=dtype):
            prior = m.img_step(state, action, noise)
            post2, prior2, kl = m.obs_step(prior, action, embed, noise, prior_noise=noise, return_kl=True)
            post3, prior3 = m.obs_step(post2, action, embed, generator=_gen(device))  # noise drawn
        state_h = State(*(t.to(dtype) for t in state))
        prior_h = mh.img_step(state_h, action.to(dtype), noise.to(dtype))
        post2_h, prior2_h, kl_h = mh.obs_step(prior_h, action.to(dtype), embed.to(dtype), noise.to(dtype),
                                              prior_noise=noise.to(dtype), return_kl=True)
        post3_h, prior3_h = mh.obs_step(post2_h, action.to(dtype), embed.to(dtype), generator=_gen(device))
    for name, got, want in zip(("img_step", "obs_step post", "obs_step prior", "drawn post", "drawn prior"),
                               (prior, post2, prior2, post3, prior3), (prior_h, post2_h, prior2_h, post3_h, prior3_h)):
        for field, g, w in zip(State._fields, got, want):
            _assert_equal(g, w, f"{name}.{field}")
    _assert_equal(kl, kl_h, "obs_step kl")
    assert not autocast_off_inside, f"ran with autocast on: {autocast_off_inside}"


@pytest.mark.parametrize("grad", [False, True], ids=["one-launch", "differentiable"])
@pytest.mark.parametrize("cell", CELLS)
def test_imagine_under_autocast_is_the_cast_model(cell, grad, case, device):
    backend, dtype = case
    m = _model(cell, device, seed=2)
    mh = _half(m, dtype)
    start = State(*(_randn(B, w, device=device, seed=10 + i) for i, w in enumerate((m.deter, S, S, S))))
    actions = _randn(B, T, A, device=device, seed=14)
    with fastwm.backend(backend), torch.set_grad_enabled(grad):
        with torch.autocast(device.type, dtype=dtype):
            dream = m.imagine(actions, start, generator=_gen(device))
        dream_h = mh.imagine(actions.to(dtype), State(*(t.to(dtype) for t in start)), generator=_gen(device))
    for field, g, w in zip(State._fields, dream, dream_h):
        _assert_equal(g, w, f"imagine.{field}")
    assert dream.stoch.requires_grad == grad


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("policy_kind", ["mlp", "callable"])
def test_rollout_under_autocast_is_the_cast_model(policy_kind, grad, case, device):
    """A plain MLP policy runs in the kernel (weights cast to the autocast dtype) without a gradient; any other
    callable, or any policy when a gradient is needed, runs in the caller's autocast region (its Linear layers in
    the autocast dtype)."""
    backend, dtype = case
    m = _model("gru", device, seed=3)
    mh = _half(m, dtype)
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(m.feature_dim, 8), nn.ELU(), nn.Linear(8, A), nn.Tanh()).to(device)
    mlp_h = _half(mlp, dtype)

    def wrap(net: nn.Module):
        return net if policy_kind == "mlp" else (lambda f: net(f))

    start = State(*(_randn(B, w, device=device, seed=20 + i) for i, w in enumerate((m.deter, S, S, S))))
    with fastwm.backend(backend), torch.set_grad_enabled(grad):
        with torch.autocast(device.type, dtype=dtype):
            states, acts = m.rollout(wrap(mlp), start, 3, generator=_gen(device))
        states_h, acts_h = mh.rollout(wrap(mlp_h), State(*(t.to(dtype) for t in start)), 3,
                                      generator=_gen(device))
    _assert_equal(acts, acts_h, "actions")
    for field, g, w in zip(State._fields, states, states_h):
        _assert_equal(g, w, f"rollout.{field}")
    if grad:  # the actor's loss through the dynamics reaches both models' float32 leaves
        (states.stoch.float().sum() + acts.float().square().sum()).backward()
        (states_h.stoch.float().sum() + acts_h.float().square().sum()).backward()
        for (name, p), ph in zip([*m.named_parameters(), *mlp.named_parameters()],
                                 [*mh.parameters(), *mlp_h.parameters()]):
            if name.startswith("post"):  # the posterior head takes no part in imagination
                assert p.grad is None and ph.grad is None, name
            else:
                _assert_grads(p.grad, ph.grad, name)


def test_latent_overshooting_under_autocast_is_the_cast_model(case, device):
    backend, dtype = case
    m = _model("gru", device, seed=5)
    mh = _half(m, dtype)
    embed = _randn(B, T, E, device=device, seed=30)
    action = _randn(B, T, A, device=device, seed=31)
    noise = _randn(B, T, 3, S, device=device, seed=32)
    with fastwm.backend(backend):
        with torch.autocast(device.type, dtype=dtype):
            post, _ = m.observe(embed, action, generator=_gen(device))
            loss = latent_overshooting_kl(m, post, action, distance=3, free_nats=0.0, noise=noise)
        loss.backward()
        post_h, _ = mh.observe(embed.to(dtype), action.to(dtype), generator=_gen(device))
        loss_h = latent_overshooting_kl(mh, post_h, action.to(dtype), distance=3, free_nats=0.0, noise=noise.to(dtype))
        loss_h.backward()
    _assert_equal(loss, loss_h, "latent overshooting KL")
    for (name, p), ph in zip(m.named_parameters(), mh.parameters()):
        _assert_grads(p.grad, ph.grad, name, calls=2)  # observe and the overshooting imagination


# ----------------------------------------------------------------------------------------------------------------------
# planners, cells, what autocast leaves alone, errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reward_kind", ["mlp", "callable"])
@pytest.mark.parametrize("planner", ["cem", "mppi"])
def test_planners_under_autocast_are_the_cast_model(planner, reward_kind, case, device, autocast_off_inside):
    """Beliefs in the autocast dtype (from observe) or in float32 are planned for as the cast model plans; the plan
    stays float32 and inside the bounds (0.3 is not a bfloat16 number: a half-precision clip would round it
    outward); a warm start carries over between calls with and without autocast."""
    backend, dtype = case
    m = _model("gru", device, seed=6)
    mh = _half(m, dtype)
    torch.manual_seed(7)
    reward = nn.Sequential(nn.Linear(m.feature_dim, 8), nn.ELU(), nn.Linear(8, 1)).to(device)
    reward_h = _half(reward, dtype)

    def make(model, net):
        r = net if reward_kind == "mlp" else (lambda f: net(f))
        kw = dict(horizon=3, iterations=2, generator=_gen(device, 11), action_low=-0.3, action_high=0.3)
        if planner == "cem":
            return fastwm.CEMPlanner(model, r, candidates=24, top_k=5, **kw)
        return fastwm.MPPIPlanner(model, r, samples=24, **kw)

    embed = _randn(2, 3, E, device=device, seed=40)
    action = _randn(2, 3, A, device=device, seed=41)
    with fastwm.backend(backend):
        with torch.autocast(device.type, dtype=dtype):
            post, _ = m.observe(embed, action, generator=_gen(device))  # beliefs in the autocast dtype
            belief = State(*(f[:, -1] for f in post))
            belief32 = State(*(f.float() for f in belief))
            p, p32 = make(m, reward), make(m, reward)
            got, got32 = p(belief), p32(belief32)
        p_h = make(mh, reward_h)
        want = p_h(belief)
        # warm start: the next call starts from the plan shifted by a step, made under autocast or not
        with torch.autocast(device.type, dtype=dtype):
            again = p(belief)
        again_h = p_h(belief)
    assert not autocast_off_inside, f"ran with autocast on: {autocast_off_inside}"
    _assert_equal(got, want, f"{planner} actions")
    _assert_equal(got32, want, f"{planner} actions from a float32 belief")
    _assert_equal(again, again_h, f"{planner} warm-started actions")
    assert got.dtype == torch.float32
    assert got.abs().max() <= 0.3 and p._plan.abs().max() <= 0.3, "the plan left the bounds"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a cuda device")
@pytest.mark.parametrize("reward_kind", ["mlp", "callable"])
def test_planner_cuda_graph_under_autocast_equals_eager(reward_kind, device):
    """The captured decision under autocast casts the weights inside the graph (autocast's cache is off for the
    reward): from the same generator state, replays equal eager decisions, also after the weights change in place
    (as test_planning's replay test, under autocast)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a cuda device")
    m = _model("layernorm_gru", device, seed=12, norm=True)
    torch.manual_seed(13)
    reward = nn.Sequential(nn.Linear(m.feature_dim, 8), nn.SiLU(), nn.Linear(8, 1)).to(device)
    r = reward if reward_kind == "mlp" else (lambda f: reward(f))
    kw = dict(horizon=4, candidates=64, top_k=8, iterations=3, warm_start=False)
    g_gen, e_gen = _gen(device, 3), _gen(device, 3)
    graphed = fastwm.CEMPlanner(m, r, cuda_graph=True, generator=g_gen, **kw)
    eager = fastwm.CEMPlanner(m, r, generator=e_gen, **kw)
    belief = State(*(_randn(4, w, device=device, seed=80 + i) for i, w in enumerate((m.deter, S, S, S))))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed(belief)  # the warm-ups and the capture
        for seed in (5, 6):
            g_gen.manual_seed(seed)
            e_gen.manual_seed(seed)
            got, want = graphed(belief), eager(belief)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            with torch.no_grad():  # seen by the next replay: the graph casts the weights itself
                for prm in [*m.parameters(), *reward.parameters()]:
                    prm.mul_(1.25)
    assert len(graphed._graphs) == 1


def test_world_model_loss_under_autocast(device):
    """The package's own world model trains under autocast: a half-precision decoder mean against float32
    observations is fine for gaussian_log_prob, and the loss reaches every float32 parameter."""
    from fastwm.worldmodel import WorldModel

    torch.manual_seed(14)
    wm = WorldModel((5,), A, embed=8, deter=6, stoch=3, hidden=8).to(device)
    obs = _randn(2, 4, 5, device=device, seed=90)
    action = _randn(2, 4, A, device=device, seed=91)
    reward = _randn(2, 4, device=device, seed=92)
    first = torch.zeros(2, 4, dtype=torch.bool, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = wm.loss(obs, action, reward, first)
    out.terms.loss.backward()
    assert torch.isfinite(out.terms.loss) and out.terms.loss.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in wm.parameters() if p.requires_grad)


@pytest.mark.parametrize("cell", ["gru", "layernorm_gru"])
def test_cells_under_autocast_cast_their_arguments(cell, case, device):
    """As autocast casts torch.nn.GRUCell's: an x in the half dtype with an fp32 h and fp32 weights is fine."""
    backend, dtype = case
    x = _randn(B, 6, device=device, seed=50).to(dtype)
    h = _randn(B, 5, device=device, seed=51).requires_grad_()
    if cell == "gru":
        ws = [_randn(15, 6, device=device, seed=52), _randn(15, 5, device=device, seed=53),
              _randn(15, device=device, seed=54), _randn(15, device=device, seed=55)]
        fn = fastwm.gru_cell
    else:
        ws = [_randn(15, 11, device=device, seed=52), 1 + 0.1 * _randn(15, device=device, seed=53),
              _randn(15, device=device, seed=54)]
        fn = fastwm.layernorm_gru_cell
    ws = [w.requires_grad_() for w in ws]
    up = _randn(B, 5, device=device, seed=56)
    with fastwm.backend(backend):
        with torch.autocast(device.type, dtype=dtype):
            out = fn(x, h, *ws)
        (out.float() * up).sum().backward()
        h_h = h.detach().to(dtype).requires_grad_()
        ws_h = [w.detach().to(dtype).requires_grad_() for w in ws]
        out_h = fn(x, h_h, *ws_h)
        (out_h.float() * up).sum().backward()
    _assert_equal(out, out_h, f"{cell} cell")
    _assert_grads(h.grad, h_h.grad, "h")
    for i, (w, w_h) in enumerate(zip(ws, ws_h)):
        _assert_grads(w.grad, w_h.grad, f"weight {i}")


@pytest.mark.parametrize("model_dtype", [torch.float64, "half"], ids=["float64", "half"])
def test_autocast_leaves_other_parameter_dtypes_alone(model_dtype, case, device):
    """A float64 model, or one already in a half dtype, computes in its own dtype inside an autocast region (and
    its body still runs with autocast off: the reference path's softplus and LayerNorm stay in that dtype)."""
    backend, dtype = case
    mdt = dtype if model_dtype == "half" else model_dtype
    if backend == "triton" and device.type == "cpu" and mdt == torch.bfloat16:
        pytest.skip("no bfloat16 in the interpreter")
    m = _model("layernorm_gru", device, seed=8, norm=True).to(mdt)
    embed = _randn(B, T, E, device=device, seed=60).to(mdt)
    action = _randn(B, T, A, device=device, seed=61).to(mdt)
    with fastwm.backend(backend):
        with torch.autocast(device.type, dtype=dtype):
            post, prior = m.observe(embed, action, generator=_gen(device))
        post2, prior2 = m.observe(embed, action, generator=_gen(device))
    for field, g, w in zip(State._fields, post + prior, post2 + prior2):
        _assert_equal(g, w, field)
        assert g.dtype == mdt


def test_autocast_dtype_errors_name_the_argument(device):
    m = _model("gru", device)
    embed = torch.zeros(B, T, E, device=device)
    action = torch.zeros(B, T, A, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"embed must have the RSSM parameters' dtype torch.float32 \(or "
                                            r"autocast's torch.bfloat16\), got torch.float16"):
            m.observe(embed.half(), action)
        with pytest.raises(TypeError, match=r"state.deter must be torch.float32 \(or autocast's torch.bfloat16\)"):
            m.img_step(State(*(t.half() for t in m.initial(B))), action[:, 0])
        with pytest.raises(TypeError, match=r"got torch.float64"):
            m.imagine(action.double(), m.initial(B))
    # outside autocast a half input to a float32 model stays an error, with no mention of autocast
    with pytest.raises(TypeError, match=r"action must have the RSSM parameters' dtype torch.float32, got "
                                        r"torch.bfloat16$"):
        m.observe(embed, action.bfloat16())


@pytest.mark.parametrize("initial,weight", [("zeros", "post1.weight"), ("learned", "prior1.weight")])
def test_value_checks_catch_a_weight_past_float16s_range_under_autocast(device, initial, weight):
    """A float32 weight of 1e5 is finite, but autocast's float16 copy, which the step reads, is infinite: with
    set_validate_args on, the cast copy is checked and named; outside autocast the same model passes. With a learned
    initial state the prior head's weight is named, not the initial state computed from it."""
    m = _model("gru", device, initial=initial)
    with torch.no_grad():
        m.get_parameter(weight)[0, 0] = 1e5
        if initial == "learned":  # deter[0] > 0: the infinite weight makes the learned stoch infinite, not ELU's -1
            m.initial_deter[0] = 1.0
    embed, action = torch.zeros(B, T, E, device=device), torch.zeros(B, T, A, device=device)
    first = torch.zeros(B, T, dtype=torch.bool, device=device)
    first[0, 1] = True
    fastwm.set_validate_args(True)
    try:
        with torch.no_grad():
            m.observe(embed, action, first)  # float32: finite
            with torch.autocast(device.type, dtype=torch.float16):
                with pytest.raises(ValueError, match=rf"^RSSM parameter {weight} \(cast to torch.float16 by "
                                                     r"autocast\) must be finite"):
                    m.observe(embed, action, first)
                with pytest.raises(ValueError, match=rf"^RSSM parameter {weight} \(cast to torch.float16"):
                    m.imagine(action, m.initial(B))
            with torch.autocast(device.type, dtype=torch.bfloat16):  # within bfloat16's range
                m.observe(embed, action, first)
    finally:
        fastwm.set_validate_args(False)


def test_fullgraph_compile_under_autocast(device):
    """torch.compile traces the autocast checks and the autocast-off body without a graph break."""
    torch._dynamo.reset()
    m = _model("gru", device, seed=9)
    embed = _randn(B, T, E, device=device, seed=70)
    action = _randn(B, T, A, device=device, seed=71)
    noise = _randn(B, T, S, device=device, seed=72)
    dtype = torch.float16

    def loss_fn(e, a):
        with torch.autocast(device.type, dtype=dtype):
            post, prior, kl = m.observe(e, a, noise=noise, prior_noise=noise, return_kl=True)
        return post.stoch.float().sum() + kl.sum()

    with fastwm.backend("triton"):
        got = torch.compile(loss_fn, fullgraph=True)(embed, action)
        want = loss_fn(embed, action)
    torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=RTOL[dtype])
