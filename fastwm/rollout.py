"""Whole-horizon imagination in one kernel launch (no gradient), and the MLPs that run inside it.

:func:`imagine_fused` runs H prior steps of an :class:`fastwm.RSSM` in ONE Triton launch
(``fastwm.kernels.rollout``): open loop from given actions, or closed loop with a policy MLP evaluated inside the
loop, optionally with a reward MLP whose per-step rewards, or only their sum, are all that is written (memory
O(N) whatever the horizon). :meth:`fastwm.RSSM.imagine` and :meth:`fastwm.RSSM.rollout` call it whenever no gradient
is needed; the planners call it for every candidate batch.

:func:`pack_mlp` reads a plain MLP, an ``nn.Sequential`` of up to three ``nn.Linear`` layers with one activation
(ELU, SiLU, ReLU or Tanh) between them and an optional final one, into the form the kernel takes; anything else
returns None and the caller falls back to running it in PyTorch on the imagined features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import reference
from ._amp import cast_eligible
from ._validation import check_like
from .gaussian import _draw_seed
from .step_ops import _ACT_IDS, _CELL_IDS, _STD_IDS

__all__ = ["PackedMLP", "pack_mlp", "imagine_fused", "RolloutOutput"]

_ACTS: dict[type, int] = {nn.ELU: 0, nn.SiLU: 1, nn.ReLU: 2, nn.Tanh: 3, nn.Identity: 4}
_IDENTITY = 4
_MAX_LAYERS = 3


class PackedMLP(NamedTuple):
    """An MLP in the kernel's form: ``layers`` [(weight [out, in], bias [out]), ...] (1 to 3), the activation id
    between layers and the id of the final activation (4: none)."""

    layers: list[tuple[Tensor, Tensor]]
    act: int
    out_act: int

    def fits(self, like: Tensor) -> bool:
        """Whether the kernel can run it beside ``like`` (the imagined state): the same dtype and device."""
        w = self.layers[0][0]
        return w.dtype == like.dtype and w.device == like.device


def _act_id(m: nn.Module) -> int | None:
    if isinstance(m, nn.ELU) and m.alpha != 1.0:
        return None
    for cls, i in _ACTS.items():
        if type(m) is cls:
            return i
    return None


def _runs_as_written(m: nn.Module) -> bool:
    # The module's forward is its class's own, untouched: no hooks (weight_norm / spectral_norm of old install
    # forward pre-hooks) and no parametrizations (their weight is computed, not the stored tensor).
    # A forward assigned on the instance (as wrappers such as accelerate's hooks do) replaces the class's.
    return not (m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m) or "forward" in vars(m))


def _global_hooks() -> bool:
    # nn.modules.module.register_module_forward_(pre_)hook: they run around every module's forward
    mod = nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None))


def pack_mlp(module: object, in_features: int, out_features: int) -> PackedMLP | None:
    """The kernel form of ``module`` when it is a plain MLP from ``in_features`` to ``out_features``, else None.

    Plain: an ``nn.Linear``, or an ``nn.Sequential`` of Linear layers (1 to 3) with the same activation module (ELU
    with alpha 1, SiLU, ReLU, Tanh) between consecutive ones and optionally one after the last, all of one dtype and
    on one device. A Linear without bias gets a zero bias. Each of these modules must be of exactly that class (a
    subclass may override ``forward``) and run as written: a forward hook, pre-hook or parametrization (spectral or
    weight norm, say) anywhere, or a global module hook, makes it not plain, and the caller then runs it in PyTorch."""
    if type(module) is nn.Linear:
        mods: list[nn.Module] = [module]
    elif type(module) is nn.Sequential:
        mods = [m for m in module if type(m) is not nn.Identity]
    else:
        return None
    if _global_hooks() or not all(_runs_as_written(m) for m in module.modules()):
        return None
    linears = [m for m in mods if type(m) is nn.Linear]
    if not 1 <= len(linears) <= _MAX_LAYERS or type(mods[0]) is not nn.Linear:
        return None
    # expected pattern: L (A L)* [A]
    hidden_act: int | None = None
    out_act = _IDENTITY
    i = 1
    for k in range(1, len(linears)):
        if i + 1 >= len(mods) or type(mods[i + 1]) is not nn.Linear:
            return None
        a = _act_id(mods[i])
        if a is None or (hidden_act is not None and a != hidden_act):
            return None
        hidden_act = a
        i += 2
    if i < len(mods):
        if i != len(mods) - 1:
            return None
        a = _act_id(mods[i])
        if a is None:
            return None
        out_act = a
    if linears[0].in_features != in_features or linears[-1].out_features != out_features:
        return None
    # Widths that do not chain make the module's own forward raise: it runs in PyTorch, which says so.
    if any(a.out_features != b.in_features for a, b in zip(linears, linears[1:])):
        return None
    tensors = [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return None
    layers = []
    for lin in linears:
        b = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
        layers.append((lin.weight.detach().contiguous(), b.detach().contiguous()))
    return PackedMLP(layers, _IDENTITY if hidden_act is None else hidden_act, out_act)


def cast_mlp(packed: PackedMLP | None, dtype: torch.dtype | None) -> PackedMLP | None:
    """``packed`` as autocast to ``dtype`` would run its Linear layers: float32, float16 and bfloat16 weights cast to
    it, float64 ones left as they are; ``packed`` itself when either is None."""
    if packed is None or dtype is None:
        return packed
    return PackedMLP([(cast_eligible(w, dtype), cast_eligible(b, dtype)) for w, b in packed.layers], packed.act,
                     packed.out_act)


class RolloutOutput(NamedTuple):
    """What :func:`imagine_fused` returns; fields not asked for are None. deter / stoch / mean / std [N, H, ...],
    features [N, H, S + D], actions [N, H, A] (closed loop), reward [N, H] or ret [N] (fp32, fp64 for fp64),
    final_deter [N, D] and final_stoch [N, S]."""

    deter: Tensor | None
    stoch: Tensor | None
    mean: Tensor | None
    std: Tensor | None
    features: Tensor | None
    actions: Tensor | None
    reward: Tensor | None
    ret: Tensor | None
    final_deter: Tensor
    final_stoch: Tensor


# What the rollout writes, in the order of the registered op's outputs (the kernels' dict keys).
_KEYS = ("deter", "stoch", "mean", "std", "features", "actions", "reward", "return", "final_deter", "final_stoch")
_ROLLOUT_SCHEMA = (
    "(Tensor stoch, Tensor deter, Tensor? actions, Tensor? noise, Tensor? seed, Tensor[] weights, Tensor[] policy, "
    "Tensor[] reward, int horizon, int cell, int act, bool norm, int std_mode, float min_std, float eps, "
    "int policy_act, int policy_out_act, int reward_act, int reward_out_act, bool reward_sum, bool write_state, "
    "bool write_feat) -> (" + ", ".join(["Tensor"] * len(_KEYS)) + ")"
)


def _asked(closed_loop: bool, reward: bool, reward_sum: bool, write_state: bool, write_feat: bool) -> tuple[str, ...]:
    keys = ["final_deter", "final_stoch"]
    keys += ["deter", "stoch", "mean", "std"] if write_state else []
    keys += ["features"] if write_feat else []
    keys += ["actions"] if closed_loop else []
    keys += (["return"] if reward_sum else ["reward"]) if reward else []
    return tuple(keys)


def _unflatten(flat: list[Tensor], act: int, out_act: int) -> tuple | None:
    # [w1, b1, w2, b2, ...] -> the packed form rollout_fwd takes, None for no MLP
    return ([(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)], act, out_act) if flat else None


@torch.library.custom_op("fastwm::rollout", mutates_args=(), schema=_ROLLOUT_SCHEMA)
def _rollout_op(stoch, deter, actions, noise, seed, weights, policy, reward, horizon, cell, act, norm, std_mode,
                min_std, eps, policy_act, policy_out_act, reward_act, reward_out_act, reward_sum, write_state,
                write_feat):
    from .kernels.rollout import rollout_fwd

    out = rollout_fwd(stoch, deter, actions, horizon, noise, seed, [t if t.numel() else None for t in weights],
                      cell=cell, act=act, norm=norm, std_mode=std_mode, min_std=min_std, eps=eps,
                      policy=_unflatten(policy, policy_act, policy_out_act),
                      reward=_unflatten(reward, reward_act, reward_out_act), reward_sum=reward_sum,
                      write_state=write_state, write_feat=write_feat)
    return tuple(out[k] if k in out else stoch.new_empty(0) for k in _KEYS)


@_rollout_op.register_fake
def _(stoch, deter, actions, noise, seed, weights, policy, reward, horizon, cell, act, norm, std_mode, min_std, eps,
      policy_act, policy_out_act, reward_act, reward_out_act, reward_sum, write_state, write_feat):
    n, s = stoch.shape
    d, a = deter.shape[1], weights[0].shape[1] - s
    r_dt = torch.float64 if stoch.dtype == torch.float64 else torch.float32
    shapes = {"deter": (n, horizon, d), "stoch": (n, horizon, s), "mean": (n, horizon, s), "std": (n, horizon, s),
              "features": (n, horizon, s + d), "actions": (n, horizon, a), "reward": (n, horizon), "return": (n,),
              "final_deter": (n, d), "final_stoch": (n, s)}
    asked = _asked(bool(policy), bool(reward), reward_sum, write_state, write_feat)
    return tuple(stoch.new_empty(shapes[k] if k in asked else (0,), dtype=r_dt if k in ("reward", "return")
                                 else stoch.dtype) for k in _KEYS)


def _check_fused(w: reference.StepWeights, stoch: Tensor, deter: Tensor, horizon: int, actions: Tensor | None,
                 noise: Tensor | None) -> None:
    """imagine_fused's tensors against the weights: shapes, dtype and device (the kernel reads raw memory, so a
    mismatch would read past a buffer or reinterpret its bytes). RSSM.imagine / rollout and the planners check their
    own arguments first, with their own names; this guards direct calls."""
    ref = w.inp_w
    s = w.p2_w.shape[0] // 2  # the prior head's [mean, raw std]
    d = w.p1_w.shape[1] if w.cell_w is not None else 0
    a = ref.shape[1] - s
    n = stoch.shape[0] if isinstance(stoch, Tensor) and stoch.dim() > 0 else 0
    if horizon < 0:
        raise ValueError(f"horizon must be >= 0, got {horizon}")
    for name, t, shape in (("stoch", stoch, (n, s)), ("deter", deter, (n, d)), ("actions", actions, (n, horizon, a)),
                           ("noise", noise, (n, horizon, s))):
        if t is not None:
            check_like(name, t, "the weights", ref, shape=shape)


@torch.no_grad()
def imagine_fused(
    cfg: reference.StepConfig,
    w: reference.StepWeights,
    stoch: Tensor,
    deter: Tensor,
    horizon: int,
    *,
    actions: Tensor | None = None,
    policy: PackedMLP | None = None,
    reward: PackedMLP | None = None,
    reward_sum: bool = False,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    write_state: bool = True,
    write_feat: bool = False,
) -> RolloutOutput:
    """H prior steps in one launch from (stoch [N, S], deter [N, D]); ``actions`` [N, H, A] (open loop) or
    ``policy`` (closed loop). Noise: ``noise`` [N, H, S], else in-kernel Philox from a seed drawn from
    ``generator`` (step t uses seed + t).

    Eager calls launch the kernel directly; inside ``torch.compile`` it runs as the registered op
    ``fastwm::rollout`` (opaque to the compiler, which cannot trace a launcher), with the same results."""
    from .kernels.rollout import rollout_fwd

    if (actions is None) == (policy is None):
        raise ValueError("give exactly one of actions (open loop) and policy (closed loop)")
    _check_fused(w, stoch, deter, int(horizon), actions, noise)
    seed = None
    if noise is None:
        seed = _draw_seed(generator, stoch.device)
    weights = [None if t is None else t.detach().contiguous() for t in w]
    stoch, deter = stoch.contiguous(), deter.contiguous()
    actions = None if actions is None else actions.contiguous()
    noise = None if noise is None else noise.contiguous()
    kw = dict(cell=_CELL_IDS[cfg.cell], act=_ACT_IDS[cfg.act], norm=bool(cfg.norm), std_mode=_STD_IDS[cfg.std_mode],
              min_std=float(cfg.min_std), eps=float(cfg.eps))
    if torch.compiler.is_compiling():
        def flat(packed: PackedMLP | None) -> list[Tensor]:
            return [] if packed is None else [t for layer in packed.layers for t in layer]

        present = [stoch.new_empty(0) if t is None else t for t in weights]  # a Tensor[] argument takes no None
        outs = _rollout_op(stoch, deter, actions, noise, seed, present, flat(policy), flat(reward), int(horizon),
                           *kw.values(),
                           policy.act if policy else 4, policy.out_act if policy else 4,
                           reward.act if reward else 4, reward.out_act if reward else 4,
                           bool(reward_sum), bool(write_state), bool(write_feat))
        asked = _asked(policy is not None, reward is not None, reward_sum, write_state, write_feat)
        out = {k: v for k, v in zip(_KEYS, outs) if k in asked}
    else:
        out = rollout_fwd(stoch, deter, actions, horizon, noise, seed, weights, **kw,
                          policy=None if policy is None else tuple(policy),
                          reward=None if reward is None else tuple(reward),
                          reward_sum=reward_sum, write_state=write_state, write_feat=write_feat)
    return RolloutOutput(*(out.get(k) for k in _KEYS))


def needs_grad(*tensors: Tensor | None, module: nn.Module | None = None) -> bool:
    """Whether autograd would record anything: grad mode on and some input or parameter requires grad."""
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return module is not None and any(p.requires_grad for p in module.parameters())


RewardFn = Callable[[Tensor], Tensor]
