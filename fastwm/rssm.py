"""The Recurrent State Space Model (RSSM) of PlaNet and Dreamer, as a drop-in ``torch.nn.Module``.

Per step, with z the stochastic latent [B, S], h the deterministic state [B, D], a the action [B, A] and e the
observation embedding [B, E]::

    x     = act(inp([z_{t-1}, a_{t-1}]))            input layer (Linear [-> LayerNorm] -> act)
    h_t   = cell(x, h_{t-1})                         GRUCell, the Dreamer LayerNorm GRU, or h_t = x for cell "none"
    prior = N(mean, std) from prior head(h_t)         Linear -> act -> Linear to [mean, raw std]
    post  = N(mean, std) from posterior head([h_t, e_t])

Every step runs as one fused Triton launch on the "triton" backend (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and as plain PyTorch on the "reference" backend; see :mod:`fastwm.step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import reference
from ._amp import autocast_again, autocast_dtype, cast, no_autocast, outer_dtype
from ._backend import use_triton
from ._validation import check_generator, check_positive_int, check_values, checking_values, get_validate_args
from .gaussian import _check_min_std, _draw_seed
from .observe import fused_observe
from .rollout import cast_mlp, imagine_fused, needs_grad, pack_mlp
from .step import posterior_step, prior_step

__all__ = ["RSSM", "State", "LayerNormGRUCell"]


class State(NamedTuple):
    """An RSSM state: ``deter`` [..., D] (D = 0 for cell "none"), ``stoch`` [..., S] (a sample), and the ``mean`` and
    ``std`` [..., S] of the distribution it was drawn from. Fields are [B, ...] for one step, [B, T, ...] for a
    sequence."""

    deter: Tensor
    stoch: Tensor
    mean: Tensor
    std: Tensor


def stack_states(states: list[State], dim: int = 1, *, like: State | None = None) -> State:
    """Stack per-step States [B, ...] into one State [B, T, ...]; with no steps, an empty State [B, 0, ...] shaped,
    typed and placed like ``like`` (a State [B, ...])."""
    if not states:
        if like is None:
            raise ValueError("stack_states: no states to stack and no `like` State to shape the empty result")
        return State(*(part.new_empty((*part.shape[:dim], 0, *part.shape[dim:])) for part in like))
    return State(*(torch.stack(parts, dim=dim) for parts in zip(*states)))


def check_is_first(is_first: object, b: int, t_len: int, device: torch.device) -> Tensor | None:
    """``is_first`` as bool [B, T] (None stays None): bool, or numbers holding only 0 and 1 (checked when
    set_validate_args is on); a wrong shape, device or dtype raises, naming it."""
    if is_first is None:
        return None
    if not isinstance(is_first, Tensor) or tuple(is_first.shape) != (b, t_len):
        got = list(is_first.shape) if isinstance(is_first, Tensor) else type(is_first).__name__
        raise ValueError(f"is_first must have shape [{b}, {t_len}], got {got}")
    if is_first.device != device:
        raise ValueError(f"is_first must be on {device}, got {is_first.device}")
    if is_first.dtype == torch.bool:
        return is_first
    if is_first.is_complex():
        raise TypeError(f"is_first must be bool (or 0 / 1 as numbers), got {is_first.dtype}")
    if checking_values() and not bool(((is_first == 0) | (is_first == 1)).all()):
        raise ValueError("is_first must hold only 0 and 1 (or be bool), found other values")
    return is_first != 0


class LayerNormGRUCell(nn.Module):
    """The Dreamer LayerNorm GRU cell (see :func:`fastwm.layernorm_gru_cell`): ``weight`` [3D, X + D] without bias,
    ``norm`` a LayerNorm over the 3D outputs (eps 1e-3 as in dreamerv3-torch), update bias -1."""

    def __init__(self, input_size: int, hidden_size: int, *, eps: float = 1e-3, update_bias: float = -1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.update_bias = input_size, hidden_size, update_bias
        self.weight = nn.Parameter(torch.empty(3 * hidden_size, input_size + hidden_size, device=device, dtype=dtype))
        self.norm = nn.LayerNorm(3 * hidden_size, eps=eps, device=device, dtype=dtype)
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        from .cells import layernorm_gru_cell

        return layernorm_gru_cell(x, h, self.weight, self.norm.weight, self.norm.bias, eps=self.norm.eps,
                                  update_bias=self.update_bias)


def _norm(norm: bool, width: int, eps: float, **kw) -> nn.LayerNorm | None:
    return nn.LayerNorm(width, eps=eps, **kw) if norm else None


def _nw(layer: nn.LayerNorm | None) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if layer is None else (layer.weight, layer.bias)


INITIAL_MODES = ("zeros", "learned")


class RSSM(nn.Module):
    """The RSSM world model: prior p(z_t | h_t), posterior q(z_t | h_t, e_t) and a recurrent deterministic path.

    Args:
        action_dim: A, the width of an action.
        embed_dim: E, the width of an observation embedding.
        stoch: S, stochastic latent dims (30 in PlaNet and Dreamer V1).
        deter: D, deterministic state dims (200). Ignored (D = 0) for cell "none".
        hidden: Hd, the width of the input layer and of both heads' hidden layer (200).
        cell: "gru" (torch.nn.GRUCell semantics and parameter layout), "layernorm_gru" (the Dreamer LayerNorm GRU) or
            "none" (no deterministic path: the pure stochastic state-space model p(z_t | z_{t-1}, a_{t-1})).
        act: "elu" (PlaNet, Dreamer V1, TorchRL) or "silu" (DreamerV3).
        std_mode: "softplus", "softplus_clamp" (TorchRL) or "sigmoid2" (dreamerv3-torch); see :func:`fastwm.std_from_raw`.
        min_std: the std floor (0.1 everywhere).
        norm: put a LayerNorm between each MLP layer's Linear and its activation, as Dreamer V2/V3 do (the Linear
            then has no bias).
        eps: the LayerNorm eps of those layers and of the LayerNorm GRU (1e-3, dreamerv3-torch's).
        initial: the state :meth:`initial` gives, which ``is_first`` resets to: "zeros" (PlaNet, Dreamer V1,
            TorchRL) or "learned" (dreamerv3-torch's default): deter = tanh(``initial_deter``), a parameter [D]
            that starts at zero, and stoch = the prior mean read from that deter; gradients reach it through every
            step that starts from it.

    Shapes are batch-first. ``action[:, t]`` is the action that led to ``embed[:, t]``.

    Example::

        rssm = fastwm.RSSM(action_dim=6, embed_dim=1024).cuda()
        post, prior = rssm.observe(embed, action, is_first)       # States with [B, T, ...] fields
        kl = fastwm.kl_loss(post.mean, post.std, prior.mean, prior.std, mode="per_step")
        dream = rssm.imagine(actions, rssm.initial(16))          # open-loop prior rollout
    """

    def __init__(
        self,
        action_dim: int,
        embed_dim: int,
        *,
        stoch: int = 30,
        deter: int = 200,
        hidden: int = 200,
        cell: str = "gru",
        act: str = "elu",
        std_mode: str = "softplus",
        min_std: float = 0.1,
        norm: bool = False,
        eps: float = 1e-3,
        initial: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("action_dim", action_dim), ("embed_dim", embed_dim), ("stoch", stoch),
                            ("hidden", hidden)):
            check_positive_int(name, value)
        if cell not in reference.CELLS:
            raise ValueError(f"cell must be one of {reference.CELLS}, got {cell!r}")
        if cell != "none":
            check_positive_int("deter", deter)
        if act not in reference.ACTIVATIONS:
            raise ValueError(f"act must be one of {reference.ACTIVATIONS}, got {act!r}")
        if std_mode not in reference.STD_MODES:
            raise ValueError(f"std_mode must be one of {reference.STD_MODES}, got {std_mode!r}")
        _check_min_std(min_std, std_mode)
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < float("inf")):
            raise ValueError(f"eps must be a finite float > 0 (the LayerNorm eps), got {eps!r}")
        if initial not in INITIAL_MODES:
            raise ValueError(f"initial must be one of {INITIAL_MODES}, got {initial!r}")
        if initial == "learned" and cell == "none":
            raise ValueError('initial="learned" needs a deterministic state: cell "gru" or "layernorm_gru", not "none"')
        kw = {"device": device, "dtype": dtype}
        self.action_dim, self.embed_dim, self.stoch, self.hidden = action_dim, embed_dim, stoch, hidden
        self.deter = deter if cell != "none" else 0
        self.config = reference.StepConfig(cell=cell, act=act, norm=bool(norm), std_mode=std_mode,
                                           min_std=float(min_std), eps=float(eps))
        head_in = self.deter if cell != "none" else hidden  # what the heads read: h, or x for cell "none"
        self.inp = nn.Linear(stoch + action_dim, hidden, bias=not norm, **kw)
        self.inp_norm = _norm(norm, hidden, eps, **kw)
        self.cell: nn.Module | None
        if cell == "gru":
            self.cell = nn.GRUCell(hidden, deter, **kw)
        elif cell == "layernorm_gru":
            self.cell = LayerNormGRUCell(hidden, deter, eps=eps, **kw)
        else:
            self.cell = None
        self.prior1 = nn.Linear(head_in, hidden, bias=not norm, **kw)
        self.prior1_norm = _norm(norm, hidden, eps, **kw)
        self.prior2 = nn.Linear(hidden, 2 * stoch, **kw)
        self.post1 = nn.Linear(head_in + embed_dim, hidden, bias=not norm, **kw)
        self.post1_norm = _norm(norm, hidden, eps, **kw)
        self.post2 = nn.Linear(hidden, 2 * stoch, **kw)
        self.initial_mode = initial
        self.initial_deter: nn.Parameter | None = (
            nn.Parameter(torch.zeros(self.deter, **kw)) if initial == "learned" else None)

    # ------------------------------------------------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        """S + D, the width of :meth:`features`."""
        return self.stoch + self.deter

    def extra_repr(self) -> str:
        c = self.config
        return (f"action_dim={self.action_dim}, embed_dim={self.embed_dim}, stoch={self.stoch}, deter={self.deter}, "
                f"hidden={self.hidden}, cell={c.cell!r}, act={c.act!r}, std_mode={c.std_mode!r}, "
                f"min_std={c.min_std}, norm={c.norm}, initial={self.initial_mode!r}")

    def weights(self, dtype: torch.dtype | None = None) -> reference.StepWeights:
        """The step's weights as a :class:`fastwm.reference.StepWeights` (the layout the kernels read); with
        ``dtype``, cast to it (differentiably: what autocast runs, see :mod:`fastwm._amp`)."""
        if dtype is not None and dtype != self._like().dtype:
            return reference.StepWeights(*(cast(t, dtype) for t in self.weights()))
        cell = self.cell
        if isinstance(cell, nn.GRUCell):
            cw, cw2, cb, cb2, cnw, cnb = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, None, None
        elif isinstance(cell, LayerNormGRUCell):
            cw, cw2, cb, cb2, cnw, cnb = cell.weight, None, None, None, cell.norm.weight, cell.norm.bias
        else:
            cw = cw2 = cb = cb2 = cnw = cnb = None
        w = reference.StepWeights(
            self.inp.weight, self.inp.bias, *_nw(self.inp_norm),
            cw, cw2, cb, cb2, cnw, cnb,
            self.prior1.weight, self.prior1.bias, *_nw(self.prior1_norm), self.prior2.weight, self.prior2.bias,
            self.post1.weight, self.post1.bias, *_nw(self.post1_norm), self.post2.weight, self.post2.bias,
        )
        like = self._like()
        every = (*w, self.initial_deter)
        if any(t is not None and (t.dtype != like.dtype or t.device != like.device) for t in every):
            self._mixed_parameters()
        return w

    def _mixed_parameters(self) -> None:
        """Raise the error for parameters of more than one dtype or device (say after ``rssm.cell.double()``)."""
        kinds: dict[tuple[torch.dtype, torch.device], str] = {}
        for name, p in self.named_parameters():
            kinds.setdefault((p.dtype, p.device), name)
        found = "; ".join(f"{name} (and maybe others) is {dt} on {dev}" for (dt, dev), name in kinds.items())
        raise TypeError(f"the RSSM's parameters must all have one dtype and one device, found {found}: convert the "
                        "whole module (rssm.to(dtype) / rssm.to(device)), not one of its submodules")

    def _like(self) -> Tensor:
        return self.prior2.weight

    def _amp(self) -> torch.dtype | None:
        """The dtype autocast makes this model compute in, or None (no autocast region, or parameters that are not
        float32): see :mod:`fastwm._amp`."""
        return autocast_dtype(self._like())

    def initial(self, batch_size: int) -> State:
        """The initial state: for initial="zeros" zeros for deter, stoch and mean, ones for std (TorchRL's and
        Dreamer V1's zero state); for "learned" deter = tanh(``initial_deter``) and stoch the prior's mean read from
        it (mean 0, std 1). ``batch_size`` 0 gives empty [0, ...] fields. In the parameters' dtype, autocast or not
        (the steps take it under autocast too). Under autocast, :meth:`observe`'s start when no state is given and
        its resets use the learned state computed in the autocast dtype from the weights cast to it: this method's
        result for the model converted to that dtype, which differs from this one by that dtype's rounding."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        return self._initial(batch_size, None)

    def _initial(self, batch_size: int, dtype: torch.dtype | None, w: reference.StepWeights | None = None,
                 learned: tuple[Tensor, Tensor] | None = None) -> State:
        # ``learned``: :meth:`_learned_initial` for this dtype, when the caller already has it
        like = self._like()
        zeros = torch.zeros(batch_size, self.stoch, device=like.device, dtype=dtype or like.dtype)
        if learned is None:
            learned = self._learned_initial(dtype, w)
        if learned is None:
            return State(zeros.new_zeros(batch_size, self.deter), zeros, zeros.clone(), torch.ones_like(zeros))
        stoch, deter = (t.expand(batch_size, -1).contiguous() for t in learned)
        return State(deter, stoch, zeros, torch.ones_like(zeros))

    def _learned_initial(self, dtype: torch.dtype | None,
                         w: reference.StepWeights | None = None) -> tuple[Tensor, Tensor] | None:
        """The learned initial state's (stoch [S], deter [D]), differentiable; None for initial="zeros".
        dreamerv3-torch's: deter = tanh(W), stoch = the prior's mean from it (mean 0 and std 1 as for zeros: no
        step reads them). Computed in ``dtype`` (the parameters' when None) from the parameters cast to it, as
        everything under autocast is: the same as the model converted to that dtype computes. ``w``: the call's
        weights already cast to ``dtype`` (one cast per call, as the converted model has one parameter)."""
        if self.initial_deter is None:
            return None
        with no_autocast(self.initial_deter.device):
            sw = self.weights(dtype) if w is None else w
            deter = torch.tanh(cast(self.initial_deter, dtype))[None]
            mean, _ = reference._head(self.config, sw.p1_w, sw.p1_b, sw.p1_nw, sw.p1_nb, sw.p2_w, sw.p2_b, deter)
        return mean[0], deter[0]

    def features(self, state: State) -> Tensor:
        """cat([stoch, deter]) along the last dim: [..., S + D]."""
        if not isinstance(state, State):
            if not (isinstance(state, tuple) and len(state) == 4):
                raise TypeError(f"state must be a fastwm.State (deter, stoch, mean, std), got {type(state).__name__}")
            state = State(*state)
        return torch.cat([state.stoch, state.deter], dim=-1)

    # ------------------------------------------------------------------------------------------------------------------

    def _check_state(self, state: object, name: str = "state", amp: torch.dtype | None = None) -> State:
        """``state`` checked (a State or a 4-tuple of [B, S] / [B, D] tensors like the parameters); under autocast
        (``amp``: see :meth:`_amp`) also one in ``amp``, and returned cast to it."""
        if not isinstance(state, State):
            if isinstance(state, tuple) and len(state) == 4:
                state = State(*state)
            else:
                raise TypeError(f"{name} must be a fastwm.State (deter, stoch, mean, std), got {type(state).__name__}")
        w = self._like()
        for field, width in (("deter", self.deter), ("stoch", self.stoch)):
            t = getattr(state, field)
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[-1] != width:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}.{field} must have shape [B, {width}], got {got}")
            if t.dtype not in (w.dtype, amp) or t.device != w.device:
                self.weights()  # parameters of mixed dtypes or devices are the fault: say so first
                also = f" (or autocast's {amp})" if amp is not None else ""
                raise TypeError(f"{name}.{field} must be {w.dtype}{also} on {w.device} like the RSSM's parameters, "
                                f"got {t.dtype} on {t.device}")
        if state.deter.shape[0] != state.stoch.shape[0]:
            raise ValueError(f"{name}.deter and {name}.stoch must have the same batch size, got "
                             f"{state.deter.shape[0]} and {state.stoch.shape[0]}")
        for field in ("mean", "std"):  # not read by the steps, but carried: they must describe stoch
            t = getattr(state, field)
            if not isinstance(t, Tensor) or t.shape != state.stoch.shape:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}.{field} must have {name}.stoch's shape {list(state.stoch.shape)}, got {got}")
        return State(*(cast(t, amp) for t in state)) if amp is not None else state

    def _check_values(self, finite: dict[str, Tensor | None]) -> None:
        """Value checks of ``finite`` and of every parameter, in one host sync (when set_validate_args is on): a NaN
        input or weight is named, not propagated. Under autocast also each parameter as the step reads it, cast to
        the autocast dtype: a float32 weight past float16's range (65504) turns infinite there. The parameters come
        first: a bad weight is named, not the learned initial state computed from it."""
        if get_validate_args():
            amp = self._amp()
            params = {f"RSSM parameter {n}": p.detach() for n, p in self.named_parameters()}
            if amp is not None:
                params.update({f"RSSM parameter {n} (cast to {amp} by autocast)": cast(p.detach(), amp)
                               for n, p in self.named_parameters()})
            check_values({**params, **finite})

    def _check_input(self, name: str, t: object, width: int, lead: tuple[int, ...],
                     amp: torch.dtype | None = None) -> Tensor:
        """``t`` checked: shape [*lead, width], the parameters' dtype and device; under autocast (``amp``) also the
        autocast dtype, and returned cast to it."""
        w = self._like()
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        want = (*lead, width)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)} (width {width}), got {list(t.shape)}")
        if t.dtype not in (w.dtype, amp) or t.device != w.device:
            self.weights()  # parameters of mixed dtypes or devices are the fault: say so first
        if t.dtype not in (w.dtype, amp):
            also = f" (or autocast's {amp})" if amp is not None else ""
            raise TypeError(f"{name} must have the RSSM parameters' dtype {w.dtype}{also}, got {t.dtype}")
        if t.device != w.device:
            raise ValueError(f"{name} must be on the RSSM parameters' device {w.device}, got {t.device}")
        return cast(t, amp)

    def img_step(self, state: State, action: Tensor, noise: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> State:
        """The prior step (imagination): state at t-1 and action [B, A] -> the prior State at t. ``noise`` [B, S]."""
        amp = self._amp()
        state = self._check_state(state, amp=amp)
        b = state.stoch.shape[0]
        action = self._check_input("action", action, self.action_dim, (b,), amp)
        if noise is not None:
            noise = self._check_input("noise", noise, self.stoch, (b,), amp)
        self._check_values({"state.stoch": state.stoch, "action": action, "state.deter": state.deter, "noise": noise})
        with no_autocast(state.stoch.device):
            return self._img_step(state, action, noise, generator, self.weights(amp))

    def _img_step(self, state: State, action: Tensor, noise: Tensor | None,
                  generator: torch.Generator | None, w: reference.StepWeights | None = None,
                  seed: Tensor | None = None) -> State:
        # img_step on inputs already checked (the time loops check a whole sequence once, not every step); ``w`` the
        # weights in the computing dtype (the parameters when None); ``seed`` see _step_seeds
        w = w if w is not None else self.weights(state.stoch.dtype)
        deter, z, mean, std = prior_step(self.config, w, state.stoch, action, state.deter, noise,
                                         generator=None if seed is not None else generator, validate=False, seed=seed)
        return State(deter, z, mean, std)

    @staticmethod
    def _step_seeds(like: Tensor, horizon: int, generator: torch.Generator | None) -> Tensor | None:
        """The seeds [H, 2] of a differentiable imagination's steps on the Triton backend: step t draws with seed + t
        from ONE seed drawn from ``generator``, which is what the whole-horizon kernel draws (see
        :func:`fastwm.rollout.imagine_fused`), so a generator gives the same imagination, and leaves the same state,
        whether a gradient is needed or not. None on the reference backend, which draws each step with torch.randn."""
        if not use_triton(like):
            return None
        seed = _draw_seed(generator, like.device)
        return (seed + torch.arange(horizon, dtype=torch.int64, device=like.device))[:, None].expand(-1, 2).contiguous()

    def obs_step(self, state: State, action: Tensor, embed: Tensor, noise: Tensor | None = None, *,
                 prior_noise: Tensor | None = None, generator: torch.Generator | None = None,
                 return_kl: bool = False) -> tuple[State, State] | tuple[State, State, Tensor]:
        """The posterior step: state at t-1, action [B, A] and embedding [B, E] at t -> (post, prior) States at t.

        ``noise`` [B, S] is the posterior's; the prior's sample uses ``prior_noise`` (drawn when None). With
        ``return_kl`` it also returns KL(post || prior) [B], computed by the same fused step."""
        amp = self._amp()
        state = self._check_state(state, amp=amp)
        b = state.stoch.shape[0]
        action = self._check_input("action", action, self.action_dim, (b,), amp)
        embed = self._check_input("embed", embed, self.embed_dim, (b,), amp)
        if noise is not None:
            noise = self._check_input("noise", noise, self.stoch, (b,), amp)
        if prior_noise is not None:
            prior_noise = self._check_input("prior_noise", prior_noise, self.stoch, (b,), amp)
        self._check_values({"state.stoch": state.stoch, "action": action, "state.deter": state.deter, "embed": embed,
                            "noise": noise, "prior_noise": prior_noise})
        with no_autocast(embed.device):
            post, prior, kl = self._obs_step(state, action, embed, noise, prior_noise, generator, self.weights(amp))
        return (post, prior, kl) if return_kl else (post, prior)

    def _obs_step(self, state: State, action: Tensor, embed: Tensor, noise: Tensor | None,
                  prior_noise: Tensor | None, generator: torch.Generator | None,
                  w: reference.StepWeights | None = None) -> tuple[State, State, Tensor]:
        # obs_step on inputs already checked, with the KL (``w``: as in _img_step)
        w = w if w is not None else self.weights(state.stoch.dtype)
        deter, qz, qm, qs, pz, pm, ps, kl = posterior_step(self.config, w, state.stoch, action,
                                                           state.deter, embed, noise, prior_noise,
                                                           generator=generator, validate=False)
        return State(deter, qz, qm, qs), State(deter, pz, pm, ps), kl

    def _reset(self, state: State, action: Tensor, first: Tensor, init: State | None = None) -> tuple[State, Tensor]:
        init = self._initial(state.stoch.shape[0], state.stoch.dtype) if init is None else init
        keep = ~first[:, None]
        state = State(*(torch.where(keep, s, i) for s, i in zip(state, init)))
        return state, torch.where(keep, action, torch.zeros_like(action))

    def observe(self, embed: Tensor, action: Tensor, is_first: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, *, prior_noise: Tensor | None = None,
                generator: torch.Generator | None = None, return_kl: bool = False,
                recompute: bool = False) -> tuple[State, State] | tuple[State, State, Tensor]:
        """Filter a sequence: embed [B, T, E], action [B, T, A] -> (post, prior), States with [B, T, ...] fields.

        ``is_first`` [B, T] (bool) resets a row to :meth:`initial` before step t and zeroes its action there, as
        dreamerv3-torch does; ``state`` is the state before step 0 (:meth:`initial` when None; under autocast, for
        both, the learned state computed in the autocast dtype: see :meth:`initial`); ``noise``
        [B, T, S] is the posterior's noise and ``prior_noise`` the prior samples' (drawn when None). With
        ``return_kl``, also KL(post || prior) [B, T].

        On the Triton backend the whole sequence is one forward time loop and one reverse-time backward loop
        (:mod:`fastwm.observe`); on the reference backend it loops :meth:`obs_step`. ``recompute`` (Triton backend)
        keeps only each step's input state for the backward and rebuilds the rest there in one launch over all
        B x T rows: less memory held between forward and backward (:func:`fastwm.observe.saved_bytes`), for one more
        parallel launch in the backward."""
        check_generator(generator)
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
        if not isinstance(embed, Tensor) or embed.dim() != 3:
            raise ValueError(f"embed must have shape [B, T, {self.embed_dim}], got "
                             f"{list(embed.shape) if isinstance(embed, Tensor) else type(embed).__name__}")
        b, t_len = embed.shape[:2]
        amp = self._amp()
        embed = self._check_input("embed", embed, self.embed_dim, (b, t_len), amp)
        action = self._check_input("action", action, self.action_dim, (b, t_len), amp)
        if noise is not None:
            noise = self._check_input("noise", noise, self.stoch, (b, t_len), amp)
        if prior_noise is not None:
            prior_noise = self._check_input("prior_noise", prior_noise, self.stoch, (b, t_len), amp)
        if noise is not None and prior_noise is not None and generator is not None:
            raise ValueError("give either noise and prior_noise or generator, not all three (the generator only "
                             "draws noise)")
        is_first = check_is_first(is_first, b, t_len, embed.device)
        w = self.weights(amp)
        # the learned initial state, computed once for the start and the resets (None for zeros, or when unused)
        learned = self._learned_initial(amp, w) if state is None or is_first is not None else None
        state = self._initial(b, amp, w, learned) if state is None else self._check_state(state, amp=amp)
        if state.stoch.shape[0] != b:
            raise ValueError(f"state must have batch size {b} (from embed), got {state.stoch.shape[0]}")
        self._check_values({"embed": embed, "action": action, "state.stoch": state.stoch, "state.deter": state.deter,
                            "noise": noise, "prior_noise": prior_noise})
        with no_autocast(embed.device):
            if use_triton(embed) and t_len > 0:
                init = None if is_first is None else learned
                deter, qz, qm, qs, pz, pm, ps, kl = fused_observe(self.config, w, state.stoch, state.deter, embed,
                                                                  action, is_first, noise, prior_noise, generator,
                                                                  recompute, init)
                post_s, prior_s = State(deter, qz, qm, qs), State(deter, pz, pm, ps)
            else:
                post_s, prior_s, kl = self._observe_steps(embed, action, is_first, state, noise, prior_noise,
                                                          generator, w, learned)
        return (post_s, prior_s, kl) if return_kl else (post_s, prior_s)

    def forward(self, embed: Tensor, action: Tensor, is_first: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, **kwargs) -> tuple[State, State] | tuple[State, State, Tensor]:
        """:meth:`observe` (the same arguments and results), so that ``rssm(embed, action, is_first)`` works, and
        with it module hooks, ``torch.compile(rssm)`` and ``DistributedDataParallel``, which only prepares the
        gradient all-reduce for what runs through the wrapper's forward."""
        return self.observe(embed, action, is_first, state, noise, **kwargs)

    def _observe_steps(self, embed: Tensor, action: Tensor, is_first: Tensor | None, state: State,
                       noise: Tensor | None, prior_noise: Tensor | None, generator: torch.Generator | None,
                       w: reference.StepWeights | None = None,
                       learned: tuple[Tensor, Tensor] | None = None) -> tuple[State, State, Tensor]:
        """observe as a Python loop of :meth:`obs_step` over T (inputs already checked): the reference backend's
        path, and on the Triton backend the per-step fused kernels (the benchmarks' "fused-steps" baseline).
        ``learned``: the learned initial state when the caller has it (see :meth:`_initial`)."""
        w = w if w is not None else self.weights(state.stoch.dtype)
        posts, priors, kls = [], [], []
        init = self._initial(state.stoch.shape[0], state.stoch.dtype, w, learned) if is_first is not None else None
        for t in range(embed.shape[1]):
            a = action[:, t]
            if is_first is not None:
                state, a = self._reset(state, a, is_first[:, t], init)
            post, prior, kl = self._obs_step(state, a, embed[:, t], None if noise is None else noise[:, t],
                                             None if prior_noise is None else prior_noise[:, t], generator, w)
            posts.append(post)
            priors.append(prior)
            kls.append(kl)
            state = post
        if not kls:  # T = 0: empty States [B, 0, ...] and KL [B, 0]
            kl_dtype = torch.float64 if state.stoch.dtype == torch.float64 else torch.float32
            return (stack_states(posts, like=state), stack_states(priors, like=state),
                    state.stoch.new_empty((state.stoch.shape[0], 0), dtype=kl_dtype))
        return stack_states(posts), stack_states(priors), torch.stack(kls, dim=1)

    def imagine(self, actions: Tensor, state: State, noise: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> State:
        """Open-loop prior rollout: actions [B, H, A] from ``state`` -> State with [B, H, ...] fields. ``noise``
        [B, H, S].

        Differentiable (one fused step per t) when a gradient is needed; otherwise (``torch.no_grad()``, or nothing
        requires grad) the whole horizon runs in one kernel launch on the Triton backend."""
        check_generator(generator)
        amp = self._amp()
        state = self._check_state(state, amp=amp)
        b = state.stoch.shape[0]
        if not isinstance(actions, Tensor) or actions.dim() != 3:
            raise ValueError(f"actions must have shape [B, H, {self.action_dim}], got "
                             f"{list(actions.shape) if isinstance(actions, Tensor) else type(actions).__name__}")
        h_len = actions.shape[1]
        actions = self._check_input("actions", actions, self.action_dim, (b, h_len), amp)
        if noise is not None:
            noise = self._check_input("noise", noise, self.stoch, (b, h_len), amp)
            if generator is not None:
                raise ValueError("give either noise or generator, not both (the generator only draws noise)")
        self._check_values({"actions": actions, "state.stoch": state.stoch, "state.deter": state.deter,
                            "noise": noise})
        with no_autocast(actions.device):
            return self._imagine(state, actions, noise, generator, self.weights(amp))

    def _imagine(self, state: State, actions: Tensor, noise: Tensor | None, generator: torch.Generator | None,
                 w: reference.StepWeights) -> State:
        # imagine on checked inputs, with the weights in the computing dtype (the planners call it once per
        # decision's weights)
        if use_triton(state.stoch) and not needs_grad(state.stoch, state.deter, actions, module=self):
            # No gradient needed: the whole horizon in one kernel launch.
            out = imagine_fused(self.config, w, state.stoch, state.deter, actions.shape[1], actions=actions,
                                noise=noise, generator=generator)
            return State(out.deter, out.stoch, out.mean, out.std)
        states = []
        seeds = self._step_seeds(state.stoch, actions.shape[1], generator) if noise is None else None
        for t in range(actions.shape[1]):
            state = self._img_step(state, actions[:, t], None if noise is None else noise[:, t], generator, w,
                                   None if seeds is None else seeds[t])
            states.append(state)
        return stack_states(states, like=state)

    def rollout(self, policy: Callable[[Tensor], Tensor], state: State, horizon: int, *,
                generator: torch.Generator | None = None) -> tuple[State, Tensor]:
        """Closed-loop imagination: a_t = policy(features(state_t)), state_{t+1} = img_step(state_t, a_t), for
        ``horizon`` steps -> (State [B, H, ...], actions [B, H, A]).

        When no gradient is needed and ``policy`` is a plain MLP (see :func:`fastwm.rollout.pack_mlp`), the whole
        loop, the policy included, runs in one kernel launch on the Triton backend.

        Under autocast (see :mod:`fastwm._amp`) the policy runs inside the caller's autocast region, and its actions
        are taken in the autocast dtype; the in-kernel policy reads its weights cast to that dtype."""
        check_generator(generator)
        amp = self._amp()
        state = self._check_state(state, amp=amp)
        check_positive_int("horizon", horizon)
        if not callable(policy):
            raise TypeError(f"policy must be callable (features [B, S + D] -> actions [B, A]), got "
                            f"{type(policy).__name__}")
        self._check_values({"state.stoch": state.stoch, "state.deter": state.deter})
        b = state.stoch.shape[0]
        device = state.stoch.device
        outer = outer_dtype(device)
        with no_autocast(device):
            w = self.weights(amp)
            if use_triton(state.stoch) and not needs_grad(state.stoch, state.deter, module=self) and not (
                    isinstance(policy, nn.Module) and needs_grad(module=policy)):
                packed = cast_mlp(pack_mlp(policy, self.feature_dim, self.action_dim), outer)
                if packed is not None and packed.fits(state.stoch):
                    # A plain MLP policy and no gradient needed: the closed loop runs inside one kernel launch.
                    # Its value checks: the policy's parameters before, its actions after (one sync each).
                    if get_validate_args():
                        check_values({f"policy parameter {n}": p.detach() for n, p in policy.named_parameters()})
                    out = imagine_fused(self.config, w, state.stoch, state.deter, horizon, policy=packed,
                                        generator=generator)
                    if get_validate_args():
                        check_values({"policy output": out.actions})
                    return State(out.deter, out.stoch, out.mean, out.std), out.actions
            states, actions = [], []
            seeds = self._step_seeds(state.stoch, horizon, generator)
            for t in range(horizon):
                with autocast_again(device, outer):
                    a = policy(self.features(state))
                a = self._check_input("policy output", a, self.action_dim, (b,), amp)
                if get_validate_args():
                    check_values({"policy output": a})
                state = self._img_step(state, a, None, generator, w, None if seeds is None else seeds[t])
                states.append(state)
                actions.append(a)
            return stack_states(states), torch.stack(actions, dim=1)
