"""Planning in latent space: the cross-entropy method (PlaNet's CEM) and MPPI, batched over B beliefs x N candidates.

Both planners sample action sequences [B, N, H, A] around a per-belief plan, imagine each one open loop from the
belief with the RSSM's prior (on the Triton backend, all B x N x H steps in ONE kernel launch per iteration, the reward
head inside it when it is a plain MLP), score it by the sum of predicted rewards over the horizon, and refit the plan:

- CEM: the mean and std of the ``top_k`` best sequences (PlaNet: horizon 12, 1,000 candidates, top 100, 10 iterations).
- MPPI: the mean and std weighted by softmax(return / temperature) over all samples.

Calling a planner on a State of B beliefs returns the first action of each plan, [B, A]. The plan is kept and, with
``warm_start``, the next call starts from it shifted by one step (the last step refilled with the initial mean), as
in TD-MPC; :meth:`reset` forgets it (call it at the start of an episode).

A decision is a chain of small launches (per iteration: the draw, the clip, the imagination, top-k and the refit)
that never waits for the device: the bounds live on the belief's device and dtype, and nothing reads a value back.
With ``cuda_graph=True`` the iterations of a decision on a CUDA belief are captured once in a CUDA graph (per belief
count, dtype, backend and weight storage) and replayed, so a decision costs one graph launch on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._amp import autocast_again, no_autocast, outer_dtype
from ._backend import get_backend, use_triton
from ._validation import _capturing, check_float, check_positive_int, check_values
from .reference import StepWeights
from .rollout import PackedMLP, cast_mlp, imagine_fused, pack_mlp
from .rssm import RSSM, State

__all__ = ["CEMPlanner", "MPPIPlanner"]

_GRAPH_WARMUP = 2  # decisions run before a capture


class _Captured(NamedTuple):
    """One captured decision: the graph, the static inputs it reads, the plan it writes and the bounds it reads."""

    graph: torch.cuda.CUDAGraph
    stoch: Tensor
    deter: Tensor
    mean: Tensor
    out: Tensor
    bounds: tuple[Tensor, ...]


class _Decision(NamedTuple):
    """What the iterations of one decision share (:meth:`_Planner._decision`)."""

    w: StepWeights
    packed: PackedMLP | None
    outer: torch.dtype | None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type, and the same index where both name one (a CUDA generator made with device="cuda" has none)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _bound(name: str, value: object, action_dim: int) -> Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a float or a sequence of {action_dim} floats, got {value!r}") from None
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != action_dim):
        raise ValueError(f"{name} must be a float or a sequence of {action_dim} floats (one per action dim), "
                         f"got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return t.expand(action_dim).clone()


def _version(t: Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write); 0 for an inference tensor, which has none."""
    try:
        return t._version
    except RuntimeError:
        return 0


class _Planner(nn.Module):
    """What CEM and MPPI share: argument checks, the warm-started plan, sampling and scoring."""

    def __init__(self, rssm: RSSM, reward: Callable[[Tensor], Tensor], *, horizon: int, samples: int,
                 iterations: int, action_low: float | Tensor, action_high: float | Tensor, init_std: float | None,
                 min_std: float, warm_start: bool, generator: torch.Generator | None, stochastic: bool = True,
                 cuda_graph: bool = False, samples_name: str = "samples") -> None:
        super().__init__()
        if not isinstance(rssm, RSSM):
            raise TypeError(f"rssm must be a fastwm.RSSM, got {type(rssm).__name__}")
        if not callable(reward):
            raise TypeError(f"reward must be callable (features [..., S + D] -> rewards [...]), got "
                            f"{type(reward).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.rssm = rssm
        self.reward = reward
        self.horizon = check_positive_int("horizon", horizon)
        self.samples = check_positive_int(samples_name, samples)
        self.iterations = check_positive_int("iterations", iterations)
        low = _bound("action_low", action_low, rssm.action_dim)
        high = _bound("action_high", action_high, rssm.action_dim)
        if not bool((low < high).all()):
            raise ValueError(f"action_low must be below action_high in every dim, got {low.tolist()} and "
                             f"{high.tolist()}")
        # on the model's device from the start: copying them there later would be a host-to-device copy, which a
        # CUDA graph capture of the first decision cannot take
        home = rssm.prior2.weight.device
        low, high = low.to(home), high.to(home)
        self.register_buffer("action_low", low, persistent=False)
        self.register_buffer("action_high", high, persistent=False)
        if init_std is not None and not (math.isfinite(check_float("init_std", init_std)) and init_std > 0):
            raise ValueError(f"init_std must be a positive float, got {init_std!r}")
        std0 = (high - low) / 2 if init_std is None else torch.full_like(low, float(init_std))
        self.register_buffer("init_std", std0, persistent=False)
        if not (math.isfinite(check_float("min_std", min_std)) and min_std >= 0):
            raise ValueError(f"min_std must be a float >= 0, got {min_std!r}")
        self.min_std = float(min_std)
        self.warm_start = bool(warm_start)
        if not isinstance(stochastic, bool):
            raise TypeError(f"stochastic must be a bool, got {type(stochastic).__name__}")
        self.stochastic = stochastic
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        self.cuda_graph = cuda_graph
        self.generator = generator
        self._plan: Tensor | None = None
        # (low, high, init_std, mid) on each (device, dtype) a plan has run in: a per-call .to() of the CPU buffers
        # would be a blocking host-to-device copy every iteration
        self._consts: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._graphs: dict[tuple, _Captured] = {}

    _EXACT = ("action_low", "action_high", "init_std")  # float64 buffers whose dtype .to() / .half() leave alone

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype), .half() and .bfloat16() cast every floating buffer. The bounds stay float64, only moved:
        # rounded to a half dtype, 0.3 would become 0.30078125 and the plan (float32) could leave the bounds.
        kept = {n: self._buffers[n] for n in self._EXACT}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        return self

    def reset(self) -> None:
        """Forget the previous plan (start of an episode). Captured CUDA graphs are kept (see :meth:`clear_graphs`)."""
        self._plan = None

    def clear_graphs(self) -> None:
        """Drop the captured CUDA graphs (and the memory their pools hold); the next call captures again."""
        self._graphs.clear()

    def _bounds_key(self) -> tuple:
        # the buffers' storage (moved by .to()) and their version counters (an in-place edit such as
        # planner.action_low.fill_(0.5) bumps it): what the copies in _consts and the captured graphs were made from
        return tuple((t.data_ptr(), _version(t)) for t in (self.action_low, self.action_high, self.init_std))

    def _bounds(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(action_low, action_high, init_std, their midpoint) as [A] tensors on ``like``'s device and dtype, copied
        there once (again after the buffers move)."""
        key = (like.device, like.dtype, *self._bounds_key())
        got = self._consts.get(key)
        if got is None:
            if self.action_low.device != like.device and _capturing():
                raise RuntimeError(f"the planner's bounds are on {self.action_low.device} and the belief on "
                                   f"{like.device}: move the planner there (planner.to(device)) before capturing "
                                   "a decision in a CUDA graph (a capture cannot copy from the host)")
            low, high = self.action_low.to(like), self.action_high.to(like)
            got = (low, high, self.init_std.to(like), ((self.action_low + self.action_high) / 2).to(like))
            if not _capturing():  # made in a capture, they would hold their values only once the graph replays
                self._consts = {k: v for k, v in self._consts.items() if k[:2] != key[:2]}  # (a graph keeps its own)
                self._consts[key] = got
        return got

    # ------------------------------------------------------------------------------------------------------------------

    def _initial_mean(self, b: int, like: Tensor) -> Tensor:
        mean = self._bounds(like)[3].expand(b, self.horizon, -1).clone()
        if self.warm_start and self._plan is not None and self._plan.shape == mean.shape:
            mean[:, :-1] = self._plan[:, 1:]
        return mean

    def _decision(self, stoch: Tensor, outer: torch.dtype | None) -> _Decision:
        """What every iteration of a decision reads, made once: the model's weights in the belief's dtype, the reward
        in the kernel's form when it is a plain MLP (its weights cast as autocast would), the caller's autocast."""
        rssm = self.rssm
        packed = None
        if use_triton(stoch):
            packed = cast_mlp(pack_mlp(self.reward, rssm.feature_dim, 1), outer)
            if packed is not None and not packed.fits(stoch):
                packed = None  # the reward then runs on the imagined features, as it is
        return _Decision(rssm.weights(stoch.dtype), packed, outer)

    def _returns(self, stoch: Tensor, deter: Tensor, actions: Tensor, dec: _Decision | None = None) -> Tensor:
        """Sum over the horizon of the predicted rewards: beliefs stoch [B, S] and deter [B, D], actions
        [B, N, H, A] (imagined in the belief's dtype) -> [B, N]. ``dec``: :meth:`_decision` (made here when None)."""
        b, n, h, a = actions.shape
        rssm = self.rssm
        dec = dec if dec is not None else self._decision(stoch, None)
        stoch = stoch.repeat_interleave(n, dim=0)
        deter = deter.repeat_interleave(n, dim=0)
        flat = actions.reshape(b * n, h, a).to(stoch.dtype)
        # stochastic=False: every candidate is imagined along the prior's mean (zero noise).
        noise = None if self.stochastic else stoch.new_zeros(b * n, h, rssm.stoch)
        gen = self.generator if self.stochastic else None
        if use_triton(stoch):
            if dec.packed is not None:
                out = imagine_fused(rssm.config, dec.w, stoch, deter, h, actions=flat, reward=dec.packed,
                                    reward_sum=True, write_state=False, noise=noise, generator=gen)
                return out.ret.reshape(b, n)
            out = imagine_fused(rssm.config, dec.w, stoch, deter, h, actions=flat, write_state=False,
                                write_feat=True, noise=noise, generator=gen)
            feats = out.features
        else:
            feats = rssm.features(rssm._imagine(State(deter, stoch, stoch, stoch), flat, noise, gen, dec.w))
        # a user callable: in the caller's autocast region, without autocast's cache (a CUDA graph of the decision
        # must cast the weights itself, not read casts cached outside it)
        with autocast_again(stoch.device, dec.outer, cache=False):
            r = self.reward(feats)
        if not isinstance(r, Tensor):
            raise TypeError(f"reward must return a torch.Tensor of rewards, got {type(r).__name__}")
        if r.dim() == feats.dim() and r.shape[-1] == 1:
            r = r.squeeze(-1)
        if tuple(r.shape) != (b * n, h):
            raise ValueError(f"reward must map features [..., {rssm.feature_dim}] to rewards [...] (or [..., 1]), "
                             f"got shape {tuple(r.shape)} for features {tuple(feats.shape)}")
        return r.to(torch.promote_types(r.dtype, torch.float32)).sum(-1).reshape(b, n)  # summed in fp32 at least

    def _sample(self, mean: Tensor, std: Tensor) -> Tensor:
        b, h, a = mean.shape
        device = mean.device if self.generator is None else self.generator.device
        eps = torch.randn((b, self.samples, h, a), generator=self.generator, device=device,
                          dtype=mean.dtype).to(mean.device)
        cand = mean[:, None] + std[:, None] * eps
        low, high = self._bounds(cand)[:2]
        return torch.max(torch.min(cand, high), low)

    def _check_state(self, state: object) -> State:
        """The beliefs checked; under autocast also in its dtype, and cast to it (see :mod:`fastwm._amp`)."""
        rssm = self.rssm
        return rssm._check_state(state, amp=rssm._amp())

    def _refit(self, actions: Tensor, returns: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def plan(self, state: State) -> Tensor:
        """The refined plan [B, H, A] for a State of B beliefs (fields [B, ...]), in float32 (float64 for float64
        beliefs): a half-precision plan would round the bounds outward, and the environment wants float32."""
        state = self._check_state(state)
        check_values({"state.stoch": state.stoch, "state.deter": state.deter})
        b = state.stoch.shape[0]
        device = state.stoch.device
        # The plan (sampling, clipping, refit) in float32 at least; the candidates are imagined in the belief's
        # dtype. Under autocast all of it runs with autocast off (the refit's reductions would otherwise be
        # promoted op by op); the reward, a user callable, runs in the caller's autocast region.
        outer = outer_dtype(device)
        with no_autocast(device):
            mean = self._initial_mean(b, state.stoch.new_empty(0, dtype=torch.promote_types(state.stoch.dtype,
                                                                                             torch.float32)))
            if self.cuda_graph and state.stoch.is_cuda and b > 0:
                mean = self._replay(state.stoch, state.deter, mean, outer)
            else:
                mean = self._iterate(state.stoch, state.deter, mean, outer)
        self._plan = mean
        return mean.clone()  # the caller's copy: editing it in place must not change the next warm start

    def _iterate(self, stoch: Tensor, deter: Tensor, mean: Tensor, outer: torch.dtype | None = None) -> Tensor:
        """The planner's iterations from the initial plan ``mean`` [B, H, A]: the refined plan. ``outer``: the
        caller's autocast dtype (None: none)."""
        std = self._bounds(mean)[2].expand_as(mean).clone()
        dec = self._decision(stoch, outer)
        for _ in range(self.iterations):
            actions = self._sample(mean, std)
            returns = self._returns(stoch, deter, actions, dec)
            check_values({"the predicted returns (the reward summed over the horizon)": returns})
            mean, std = self._refit(actions, returns)
            std = std.clamp_min(self.min_std)
        return mean

    # CUDA graphs ------------------------------------------------------------------------------------------------------

    def _graph_key(self, stoch: Tensor, outer: torch.dtype | None) -> tuple:
        """What a captured decision depends on besides the values it reads: the belief count, dtype and device, the
        caller's autocast dtype, the backend and matmul precision, the planner's settings, generator and reward, the
        bounds, and the storage of every weight and buffer of the model and the reward (a moved or re-created one
        needs a new capture)."""
        tensors = [*self.rssm.parameters(), *self.rssm.buffers()]
        if isinstance(self.reward, nn.Module):
            tensors += [*self.reward.parameters(), *self.reward.buffers()]
        settings = (self.horizon, self.samples, self.iterations, self.min_std, self.stochastic,
                    getattr(self, "top_k", None), getattr(self, "temperature", None))
        return (stoch.shape[0], stoch.dtype, stoch.device, outer, get_backend(),
                torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, settings,
                id(self.generator), id(self.reward), self._bounds_key(),
                tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors))

    def _replay(self, stoch: Tensor, deter: Tensor, mean: Tensor, outer: torch.dtype | None) -> Tensor:
        gen = self.generator
        if gen is not None and not _same_device(torch.device(gen.device), stoch.device):
            raise ValueError("cuda_graph=True draws the candidates on the GPU inside the graph: generator must be a "
                             f"torch.Generator on the belief's device ({stoch.device}), or None, got one on "
                             f"{gen.device}")
        with torch.cuda.device(stoch.device):  # the capture and the replay run on the belief's device
            if torch.cuda.is_current_stream_capturing():  # the caller captures the whole decision itself
                return self._iterate(stoch, deter, mean, outer)
            key = self._graph_key(stoch, outer)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(stoch, deter, mean, outer)
            entry.stoch.copy_(stoch)
            entry.deter.copy_(deter)
            entry.mean.copy_(mean)
            entry.graph.replay()
            return entry.out.clone()

    def _capture(self, stoch: Tensor, deter: Tensor, mean: Tensor, outer: torch.dtype | None) -> _Captured:
        """Capture :meth:`_iterate` on static copies of its inputs: warm-up calls on a side stream first (kernel
        compilation and lazy initialisation happen outside the capture), then the capture, with the planner's own
        generator registered so that every replay draws fresh candidates from it."""
        device = stoch.device
        static = (stoch.clone(), deter.clone(), mean.clone())
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(_GRAPH_WARMUP):
                self._iterate(*static, outer)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError("cuda_graph=True with a generator needs a torch whose CUDAGraph has "
                                   "register_generator_state (2.5 or newer); pass generator=None to draw from the "
                                   "default CUDA generator")
            graph.register_generator_state(self.generator)
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                out = self._iterate(*static, outer)
        except RuntimeError as exc:
            raise RuntimeError("cuda_graph=True: capturing the planner's decision in a CUDA graph failed. The reward "
                               "must run without host syncs (no .item(), .cpu(), .tolist() or Python branches on "
                               f"tensor values); or pass cuda_graph=False. The capture said: {exc}") from exc
        return _Captured(graph, *static, out, self._bounds(mean))

    def forward(self, state: State) -> Tensor:
        """Actions [B, A]: the first step of the plan for each of the B beliefs, in float32 (float64 for float64
        beliefs) whatever the model's dtype."""
        return self.plan(state)[:, 0]


class CEMPlanner(_Planner):
    """The cross-entropy method over action sequences in the RSSM's latent space (PlaNet's planner).

    Args:
        rssm: the world model; its prior imagines each candidate from the belief.
        reward: features [..., S + D] -> rewards [...] (or [..., 1]); a plain MLP (see
            :func:`fastwm.rollout.pack_mlp`) runs inside the imagination kernel, anything else on its output.
        horizon, candidates, iterations, top_k: PlaNet's 12, 1,000, 10 and 100.
        action_low, action_high: bounds (floats or one per action dim); candidates are clipped to them.
        init_std: the initial std of the sampling distribution ((high - low) / 2 when None: 1 for [-1, 1]).
        min_std: a floor on the refitted std.
        warm_start: start from the previous plan shifted by one step.
        generator: a torch.Generator for reproducible plans.
        stochastic: imagine each candidate with sampled latents (PlaNet); False imagines along the prior's mean
            (zero noise), which scores candidates more steadily where the dynamics are unstable (a pendulum held
            upright) and the samples' spread would swamp the differences between action sequences.
        cuda_graph: on a CUDA belief, capture a decision's iterations in a CUDA graph the first time a belief count,
            dtype and backend is seen (two warm-up decisions, then the capture) and replay it after that: one launch
            on the host per decision instead of several per iteration. The reward must be capturable (no host
            syncs), and the tensors a reward that is not an ``nn.Module`` reads must stay alive and in place
            (changed values are seen); the value checks of :func:`fastwm.set_validate_args` check the belief, not
            the returns, inside the graph. On other devices it does nothing.

    Example::

        planner = fastwm.CEMPlanner(rssm, reward_head)
        action = planner(belief)          # belief: a fastwm.State with [B, ...] fields -> [B, A]
    """

    def __init__(self, rssm: RSSM, reward: Callable[[Tensor], Tensor], *, horizon: int = 12, candidates: int = 1000,
                 iterations: int = 10, top_k: int = 100, action_low: float | Tensor = -1.0,
                 action_high: float | Tensor = 1.0, init_std: float | None = None, min_std: float = 0.0,
                 warm_start: bool = True, generator: torch.Generator | None = None,
                 stochastic: bool = True, cuda_graph: bool = False) -> None:
        super().__init__(rssm, reward, horizon=horizon, samples=candidates, iterations=iterations,
                         action_low=action_low, action_high=action_high, init_std=init_std, min_std=min_std,
                         warm_start=warm_start, generator=generator, stochastic=stochastic,
                         cuda_graph=cuda_graph, samples_name="candidates")
        self.top_k = check_positive_int("top_k", top_k)
        if top_k > candidates:
            raise ValueError(f"top_k must be at most candidates ({candidates}), got {top_k}")

    @property
    def candidates(self) -> int:
        return self.samples

    def _refit(self, actions: Tensor, returns: Tensor) -> tuple[Tensor, Tensor]:
        idx = returns.topk(self.top_k, dim=1).indices  # [B, K]
        b, _, h, a = actions.shape
        elite = actions.gather(1, idx[:, :, None, None].expand(b, self.top_k, h, a))
        mean = elite.mean(1)
        # the population std (unbiased=False), written out: torch's std warns on an empty batch of beliefs
        return mean, (elite - mean[:, None]).square().mean(1).sqrt()


class MPPIPlanner(_Planner):
    """Model predictive path integral control in the RSSM's latent space.

    Each iteration weights every sampled sequence by softmax(return / temperature) and refits the plan's mean and std
    to the weighted mean and std. Arguments as :class:`CEMPlanner`, with ``samples`` for candidates,
    ``temperature`` (> 0; lower is greedier), and ``min_std`` 0.05 by default (CEM's is 0)."""

    def __init__(self, rssm: RSSM, reward: Callable[[Tensor], Tensor], *, horizon: int = 12, samples: int = 1000,
                 iterations: int = 10, temperature: float = 0.5, action_low: float | Tensor = -1.0,
                 action_high: float | Tensor = 1.0, init_std: float | None = None, min_std: float = 0.05,
                 warm_start: bool = True, generator: torch.Generator | None = None,
                 stochastic: bool = True, cuda_graph: bool = False) -> None:
        super().__init__(rssm, reward, horizon=horizon, samples=samples, iterations=iterations,
                         action_low=action_low, action_high=action_high, init_std=init_std, min_std=min_std,
                         warm_start=warm_start, generator=generator, stochastic=stochastic,
                         cuda_graph=cuda_graph)
        if not (math.isfinite(check_float("temperature", temperature)) and temperature > 0):
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        self.temperature = float(temperature)

    def _refit(self, actions: Tensor, returns: Tensor) -> tuple[Tensor, Tensor]:
        w = torch.softmax(returns.double() / self.temperature, dim=1).to(actions.dtype)[:, :, None, None]
        mean = (w * actions).sum(1)
        var = (w * (actions - mean[:, None]) ** 2).sum(1)
        return mean, var.sqrt()
