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

from . import reference
from ._amp import cast_eligible
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


def _act_id(m: nn.Module) -> int | None:
    if isinstance(m, nn.ELU) and m.alpha != 1.0:
        return None
    for cls, i in _ACTS.items():
        if type(m) is cls:
            return i
    return None


def pack_mlp(module: object, in_features: int, out_features: int) -> PackedMLP | None:
    """The kernel form of ``module`` when it is a plain MLP from ``in_features`` to ``out_features``, else None.

    Plain: an ``nn.Linear``, or an ``nn.Sequential`` of Linear layers (1 to 3) with the same activation module (ELU
    with alpha 1, SiLU, ReLU, Tanh) between consecutive ones and optionally one after the last. A Linear without bias
    gets a zero bias."""
    if isinstance(module, nn.Linear):
        mods: list[nn.Module] = [module]
    elif isinstance(module, nn.Sequential):
        mods = [m for m in module if not isinstance(m, nn.Identity)]
    else:
        return None
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    if not 1 <= len(linears) <= _MAX_LAYERS or not isinstance(mods[0], nn.Linear):
        return None
    # expected pattern: L (A L)* [A]
    hidden_act: int | None = None
    out_act = _IDENTITY
    i = 1
    for k in range(1, len(linears)):
        if i + 1 >= len(mods) or not isinstance(mods[i + 1], nn.Linear):
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
    ``generator`` (step t uses seed + t)."""
    from .kernels.rollout import rollout_fwd

    if (actions is None) == (policy is None):
        raise ValueError("give exactly one of actions (open loop) and policy (closed loop)")
    seed = None
    if noise is None:
        device = stoch.device if generator is None else generator.device
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator).to(stoch.device)
    weights = [None if t is None else t.detach().contiguous() for t in w]
    out = rollout_fwd(
        stoch.contiguous(), deter.contiguous(), None if actions is None else actions.contiguous(), horizon,
        None if noise is None else noise.contiguous(), seed, weights,
        cell=_CELL_IDS[cfg.cell], act=_ACT_IDS[cfg.act], norm=bool(cfg.norm), std_mode=_STD_IDS[cfg.std_mode],
        min_std=float(cfg.min_std), eps=float(cfg.eps),
        policy=None if policy is None else tuple(policy), reward=None if reward is None else tuple(reward),
        reward_sum=reward_sum, write_state=write_state, write_feat=write_feat,
    )
    return RolloutOutput(out.get("deter"), out.get("stoch"), out.get("mean"), out.get("std"), out.get("features"),
                         out.get("actions"), out.get("reward"), out.get("return"), out["final_deter"],
                         out["final_stoch"])


def needs_grad(*tensors: Tensor | None, module: nn.Module | None = None) -> bool:
    """Whether autograd would record anything: grad mode on and some input or parameter requires grad."""
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return module is not None and any(p.requires_grad for p in module.parameters())


RewardFn = Callable[[Tensor], Tensor]
