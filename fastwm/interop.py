"""Interoperability: load another library's RSSM weights into a :class:`fastwm.RSSM`.

- :func:`from_torchrl`: TorchRL's ``RSSMPrior`` / ``RSSMPosterior`` (``torchrl.modules.models.model_based``, the
  Dreamer V1 world model of TorchRL).

Nothing here imports the other library: an argument can only be one of its modules if the caller has imported it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rssm import RSSM

__all__ = ["from_torchrl"]

_TORCHRL_MODEL_BASED = "torchrl.modules.models.model_based"


# ----------------------------------------------------------------------------------------------------------------------
# Reading the TorchRL modules (structure checks; every error names the argument and the layer)
# ----------------------------------------------------------------------------------------------------------------------


def _torchrl_module(obj: object, argname: str, clsname: str) -> nn.Module:
    """``obj`` itself when it is a torchrl ``clsname``, or the module a TensorDictModule wraps; else a TypeError."""
    # Looked up in sys.modules, never imported: if torchrl is not loaded, obj cannot be one of its modules.
    cls = getattr(sys.modules.get(_TORCHRL_MODEL_BASED), clsname, None)
    if cls is not None:
        if isinstance(obj, cls):
            return obj
        inner = getattr(obj, "module", None)  # tensordict.nn.TensorDictModule(RSSMPrior(...), in_keys=..., ...)
        if isinstance(obj, nn.Module) and isinstance(inner, cls):
            return inner
    hint = ""
    name = type(obj).__name__
    if name.endswith("V3"):
        hint = " (the DreamerV3 categorical-latent modules have no Gaussian fastwm counterpart)"
    elif name in ("RSSMPrior", "RSSMPosterior") and name != clsname:
        hint = " (are prior and posterior swapped?)"
    raise TypeError(f"{argname} must be a {_TORCHRL_MODEL_BASED}.{clsname} (or a TensorDictModule wrapping one), "
                    f"got {name}{hint}")


def _sequential(owner: nn.Module, attr: str, where: str, length: int) -> nn.Sequential:
    seq = getattr(owner, attr, None)
    if not isinstance(seq, nn.Sequential) or len(seq) != length:
        got = type(seq).__name__ if not isinstance(seq, nn.Sequential) else f"a Sequential of {len(seq)} layers"
        raise ValueError(f"{where} must be an nn.Sequential of {length} layers as TorchRL builds it, got {got}")
    return seq


def _linear(layer: nn.Module, where: str, hint: str) -> tuple[Tensor, Tensor | None]:
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{where} must be an nn.Linear, got {type(layer).__name__}")
    if nn.parameter.is_lazy(layer.weight):
        how = f"{hint}, or run" if hint else "run"
        raise ValueError(f"{where} is an uninitialized nn.LazyLinear, so its input width is unknown: {how} one "
                         f"forward pass of the module before converting it")
    return layer.weight, layer.bias


def _activation(layer: nn.Module, where: str) -> str:
    if isinstance(layer, nn.ELU) and layer.alpha == 1.0:
        return "elu"
    if isinstance(layer, nn.SiLU):
        return "silu"
    raise ValueError(f"{where} must be nn.ELU(alpha=1.0) (TorchRL's) or nn.SiLU, got {layer!r}")


def _std_convention(layer: nn.Module, where: str) -> tuple[str, float, float]:
    """(fastwm std_mode, min_std, shift added to the raw std) reproducing a tensordict NormalParamExtractor, whose
    forward is: loc, raw = chunk(x, 2); scale = scale_mapping(raw).clamp_min(scale_lb)."""
    cls = getattr(sys.modules.get("tensordict.nn"), "NormalParamExtractor", None)
    if cls is None or not isinstance(layer, cls):
        raise ValueError(f"{where} must be a tensordict.nn.NormalParamExtractor, got {type(layer).__name__}")
    mapping, lb = layer.scale_mapping, float(layer.scale_lb)
    if mapping is F.softplus:  # "softplus", what RSSMPrior / RSSMPosterior build: softplus(raw).clamp_min(scale_lb)
        return "softplus_clamp", lb, 0.0
    # "biased_softplus_{bias}[_{min_val}]" (the extractor's own default): softplus(raw + shift) + min_val, then the
    # clamp at scale_lb, which never binds when scale_lb <= min_val: fastwm's "softplus" on a shifted raw std.
    shift, min_val = getattr(mapping, "bias", None), getattr(mapping, "min_val", None)
    if type(mapping).__name__ == "biased_softplus" and isinstance(shift, float) and isinstance(min_val, float):
        if lb <= min_val:
            return "softplus", min_val, shift
        raise ValueError(f"{where}: biased softplus + {min_val} clamped at scale_lb={lb} > {min_val} has no fastwm "
                         f"std_mode (softplus(raw) + min_std, or softplus(raw).clamp_min(min_std))")
    raise ValueError(f"{where}.scale_mapping is {mapping!r}: fastwm reproduces the 'softplus' mapping (TorchRL's "
                     f"RSSM, std_mode 'softplus_clamp') and 'biased_softplus_*' (std_mode 'softplus') only")


def _same(name_a: str, a: object, name_b: str, b: object, what: str) -> None:
    if a != b:
        raise ValueError(f"{what}: {name_a} gives {a} but {name_b} gives {b}; fastwm.RSSM needs them equal")


# ----------------------------------------------------------------------------------------------------------------------


def from_torchrl(prior: nn.Module, posterior: nn.Module) -> RSSM:
    """A :class:`fastwm.RSSM` computing what TorchRL's ``RSSMPrior`` and ``RSSMPosterior`` compute.

    Their weights are copied (under ``torch.no_grad``; the RSSM owns its parameters, later changes to either side do
    not propagate) into an RSSM with cell "gru", act "elu", std_mode "softplus_clamp" and ``min_std`` = their
    ``scale_lb``, on the device and in the dtype of the TorchRL modules. Every width is read from the weight shapes:

    - ``prior.action_state_projector`` = Linear on ``cat([state, action])``, ELU -> ``rssm.inp`` (Linear S + A -> Hd,
      on ``cat([stoch, action])``), ELU;
    - ``prior.rnn`` (``nn.GRUCell`` Hd -> D) -> ``rssm.cell`` (``nn.GRUCell`` Hd -> D);
    - ``prior.rnn_to_prior_projector`` = Linear, ELU, Linear, NormalParamExtractor -> ``rssm.prior1`` (D -> Hd), ELU,
      ``rssm.prior2`` (Hd -> 2S, mean first, then the raw std);
    - ``posterior.obs_rnn_to_post_projector`` = Linear on ``cat([belief, obs_embedding])``, ELU, Linear,
      NormalParamExtractor -> ``rssm.post1`` (D + E -> Hd, on ``cat([deter, embed])``), ELU, ``rssm.post2`` (Hd -> 2S);
    - NormalParamExtractor(scale_mapping="softplus", scale_lb): std = ``softplus(raw).clamp_min(scale_lb)`` ->
      ``std_mode="softplus_clamp"``, ``min_std=scale_lb``;
    - the sample ``mean + noise * std`` -> ``mean + std * noise``; ``state`` (S) and ``belief`` (D) ->
      ``State.stoch`` and ``State.deter``; TorchRL's zero ``state`` / ``belief`` (its TensorDictPrimer) ->
      :meth:`RSSM.initial` (zeros).

    The calls that then return the same values (``State`` is :class:`fastwm.State`; the ``mean`` and ``std`` of an
    input State are not read)::

        rssm = fastwm.interop.from_torchrl(prior, posterior)

        # the prior step
        prior_mean, prior_std, state1, belief1 = prior(state, belief, action, noise)
        s = rssm.img_step(State(deter=belief, stoch=state, mean=state, std=state), action, noise)
        # s.mean == prior_mean, s.std == prior_std, s.stoch == state1, s.deter == belief1

        # the prior step then the posterior (TorchRL's RSSMRollout step): obs_step runs both
        prior_mean, prior_std, state1, belief1 = prior(state, belief, action, prior_noise)
        post_mean, post_std, post_state = posterior(belief1, obs_embedding, noise)
        post, pri = rssm.obs_step(State(belief, state, state, state), action, obs_embedding, noise,
                                  prior_noise=prior_noise)
        # post.mean == post_mean, post.std == post_std, post.stoch == post_state, post.deter == belief1,
        # pri == (belief1, state1, prior_mean, prior_std)

    ``posterior(belief, obs_embedding, noise)`` is thus the posterior head of :meth:`RSSM.obs_step` on the belief
    its prior step produced. Over a sequence, ``rssm.observe(embed, action, state=...)`` is TorchRL's
    ``RSSMRollout`` (the posterior state and the prior belief carried to the next step), with ``action[:, t]`` the
    action taken before ``("next", "encoded_latents")`` at step t; ``rssm.imagine`` is a loop of ``prior`` calls
    fed with their own ``state`` and ``belief``. fastwm takes batched 2-D inputs [B, ...]; for a ``belief`` of
    None use ``rssm.initial(B).deter`` (zeros, as ``nn.GRUCell`` assumes). TorchRL runs its GRU cell in float32
    whatever the modules' dtype; fastwm runs it in the RSSM's dtype (equal for the float32 modules TorchRL runs).

    Args:
        prior: a ``torchrl.modules.models.model_based.RSSMPrior``, or a ``TensorDictModule`` wrapping one.
        posterior: a ``torchrl.modules.models.model_based.RSSMPosterior``, or a ``TensorDictModule`` wrapping one.

    Both must be materialized: built with explicit widths (``RSSMPrior(..., action_dim=A)``,
    ``RSSMPosterior(..., rnn_hidden_dim=D, obs_embed_dim=E)``) or run once, since a ``LazyLinear`` has no weights yet.
    A NormalParamExtractor with a ``"biased_softplus_*"`` mapping (softplus(raw + b) + m, clamped at
    ``scale_lb <= m``) converts too, to std_mode "softplus" with ``min_std = m`` and ``b`` folded into the bias of
    the raw-std half of ``rssm.prior2`` / ``rssm.post2``.

    Raises:
        TypeError: an argument is not the TorchRL module it should be, or the modules' parameters have different
            dtypes.
        ValueError: a layer differs from TorchRL's layout, a LazyLinear is uninitialized, the modules' widths,
            activations or std conventions disagree (prior vs posterior, or with fastwm's single ``hidden`` width:
            the prior's layers and the posterior's hidden layer must all be Hd wide), or the parameters are on
            different devices. The message names the argument and the layer.
    """
    prior = _torchrl_module(prior, "prior", "RSSMPrior")
    posterior = _torchrl_module(posterior, "posterior", "RSSMPosterior")

    # --- the layers, in TorchRL's layout -----------------------------------------------------------------------------
    asp = _sequential(prior, "action_state_projector", "prior.action_state_projector", 2)
    inp_w, inp_b = _linear(asp[0], "prior.action_state_projector[0]", "build RSSMPrior with action_dim=A")
    acts = {"prior.action_state_projector[1]": _activation(asp[1], "prior.action_state_projector[1]")}
    rnn = getattr(prior, "rnn", None)
    if not isinstance(rnn, nn.GRUCell):
        raise ValueError(f"prior.rnn must be an nn.GRUCell, got {type(rnn).__name__}")
    head = _sequential(prior, "rnn_to_prior_projector", "prior.rnn_to_prior_projector", 4)
    p1_w, p1_b = _linear(head[0], "prior.rnn_to_prior_projector[0]", "")
    acts["prior.rnn_to_prior_projector[1]"] = _activation(head[1], "prior.rnn_to_prior_projector[1]")
    p2_w, p2_b = _linear(head[2], "prior.rnn_to_prior_projector[2]", "")
    p_std = _std_convention(head[3], "prior.rnn_to_prior_projector[3]")
    post = _sequential(posterior, "obs_rnn_to_post_projector", "posterior.obs_rnn_to_post_projector", 4)
    q1_w, q1_b = _linear(post[0], "posterior.obs_rnn_to_post_projector[0]",
                         "build RSSMPosterior with rnn_hidden_dim=D and obs_embed_dim=E")
    acts["posterior.obs_rnn_to_post_projector[1]"] = _activation(post[1], "posterior.obs_rnn_to_post_projector[1]")
    q2_w, q2_b = _linear(post[2], "posterior.obs_rnn_to_post_projector[2]", "")
    q_std = _std_convention(post[3], "posterior.obs_rnn_to_post_projector[3]")

    # --- widths, read from the weights -------------------------------------------------------------------------------
    hidden, deter = inp_w.shape[0], rnn.hidden_size
    _same("prior.action_state_projector[0].out_features", hidden, "prior.rnn.input_size", rnn.input_size,
          "the GRU input width")
    if p1_w.shape[1] != deter:
        raise ValueError(
            f"prior.rnn_to_prior_projector[0] takes {p1_w.shape[1]} inputs but the belief (prior.rnn.hidden_size) "
            f"has {deter}: TorchRL's RSSMPrior builds that layer as Linear(hidden_dim, hidden_dim), so it only runs "
            f"with hidden_dim == rnn_hidden_dim")
    _same("prior.action_state_projector[0].out_features", hidden, "prior.rnn_to_prior_projector[0].out_features",
          p1_w.shape[0], "the hidden width Hd")
    _same("prior.rnn_to_prior_projector[0].out_features", p1_w.shape[0],
          "prior.rnn_to_prior_projector[2].in_features", p2_w.shape[1], "the prior head's hidden width")
    if p2_w.shape[0] % 2:
        raise ValueError(f"prior.rnn_to_prior_projector[2] must output 2 * state_dim values (mean, raw std), got "
                         f"{p2_w.shape[0]}")
    stoch = p2_w.shape[0] // 2
    action_dim = inp_w.shape[1] - stoch
    if action_dim < 1:
        raise ValueError(f"prior.action_state_projector[0] takes {inp_w.shape[1]} inputs, which leaves no action "
                         f"after the state (state_dim {stoch} from prior.rnn_to_prior_projector[2])")
    if q2_w.shape[0] % 2:
        raise ValueError(f"posterior.obs_rnn_to_post_projector[2] must output 2 * state_dim values (mean, raw std), "
                         f"got {q2_w.shape[0]}")
    _same("prior state_dim", stoch, "posterior state_dim", q2_w.shape[0] // 2, "state_dim (half a head's outputs)")
    _same("prior hidden_dim", hidden, "posterior hidden_dim (obs_rnn_to_post_projector[0].out_features)",
          q1_w.shape[0], "the hidden width Hd (fastwm.RSSM has one)")
    _same("posterior.obs_rnn_to_post_projector[0].out_features", q1_w.shape[0],
          "posterior.obs_rnn_to_post_projector[2].in_features", q2_w.shape[1], "the posterior head's hidden width")
    embed_dim = q1_w.shape[1] - deter
    if embed_dim < 1:
        raise ValueError(f"posterior.obs_rnn_to_post_projector[0] takes {q1_w.shape[1]} inputs, which leaves no "
                         f"obs_embedding after the belief (rnn_hidden_dim {deter} from prior.rnn)")
    act = acts["prior.action_state_projector[1]"]
    for where, a in acts.items():
        _same("prior.action_state_projector[1]", act, where, a, "the activation")
    _same("prior.rnn_to_prior_projector[3]", p_std[:2], "posterior.obs_rnn_to_post_projector[3]", q_std[:2],
          "the std convention (std_mode, scale_lb / min_std)")
    std_mode, min_std = p_std[0], p_std[1]

    # --- one dtype, one device ---------------------------------------------------------------------------------------
    tensors = {
        "prior.action_state_projector[0]": inp_w, "prior.rnn": rnn.weight_ih,
        "prior.rnn_to_prior_projector[0]": p1_w, "prior.rnn_to_prior_projector[2]": p2_w,
        "posterior.obs_rnn_to_post_projector[0]": q1_w, "posterior.obs_rnn_to_post_projector[2]": q2_w,
    }
    dtype, device = inp_w.dtype, inp_w.device
    for where, t in tensors.items():
        if not t.is_floating_point() or t.dtype != dtype:
            raise TypeError(f"{where} has dtype {t.dtype} but prior.action_state_projector[0] has {dtype}: the "
                            f"prior and posterior must share one floating dtype")
        if t.device != device:
            raise ValueError(f"{where} is on {t.device} but prior.action_state_projector[0] is on {device}: the "
                             f"prior and posterior must be on one device")

    # --- copy --------------------------------------------------------------------------------------------------------
    rssm = RSSM(action_dim, embed_dim, stoch=stoch, deter=deter, hidden=hidden, cell="gru", act=act,
                std_mode=std_mode, min_std=min_std, device=device, dtype=dtype)

    def put(param: Tensor, src: Tensor | None, shift: float = 0.0) -> None:
        if src is None:  # a layer built with bias=False
            param.zero_()
        else:
            param.copy_(src)
        if shift:
            param[stoch:] += shift  # the raw-std half of a head's output bias

    with torch.no_grad():
        put(rssm.inp.weight, inp_w)
        put(rssm.inp.bias, inp_b)
        put(rssm.cell.weight_ih, rnn.weight_ih)
        put(rssm.cell.weight_hh, rnn.weight_hh)
        put(rssm.cell.bias_ih, rnn.bias_ih)
        put(rssm.cell.bias_hh, rnn.bias_hh)
        put(rssm.prior1.weight, p1_w)
        put(rssm.prior1.bias, p1_b)
        put(rssm.prior2.weight, p2_w)
        put(rssm.prior2.bias, p2_b, p_std[2])
        put(rssm.post1.weight, q1_w)
        put(rssm.post1.bias, q1_b)
        put(rssm.post2.weight, q2_w)
        put(rssm.post2.bias, q2_b, q_std[2])
    return rssm.train(prior.training)
