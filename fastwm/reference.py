"""The eager reference: plain PyTorch, exact in float64.

It is the ground truth of the tests, the CPU path of the "reference" backend, and the "eager" baseline of the
benchmarks. Every function here takes tensors of any floating dtype; half-precision inputs are computed in float32
(as the kernels do) and float64 inputs stay float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "STD_MODES",
    "std_from_raw",
    "gaussian_rsample",
    "gaussian_kl",
    "gaussian_sample_kl",
    "gaussian_head_sample_kl",
    "philox_normal",
    "ACTIVATIONS",
    "CELLS",
    "StepConfig",
    "StepWeights",
    "activation",
    "dense",
    "gru_cell",
    "layernorm_gru_cell",
    "rssm_prior_step",
    "rssm_posterior_step",
]

STD_MODES = ("softplus", "softplus_clamp", "sigmoid2")


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _kl_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def std_from_raw(raw: torch.Tensor, *, min_std: float = 0.1, mode: str = "softplus") -> torch.Tensor:
    """std from a raw head output: softplus(raw) + min_std, softplus(raw).clamp_min(min_std) or
    2 * sigmoid(raw / 2) + min_std. Computed in fp32 (fp64 for fp64 input), returned in raw's dtype."""
    return _std_compute(raw, min_std, mode).to(raw.dtype)


def _std_compute(raw: torch.Tensor, min_std: float, mode: str) -> torch.Tensor:
    """std_from_raw in fp32 (fp64 for fp64), not rounded back to raw's dtype: what the sample and the KL read, as the
    kernels do (a half std rounded to 0 would make the KL NaN)."""
    x = _compute(raw)
    if mode == "softplus":
        std = F.softplus(x) + min_std
    elif mode == "softplus_clamp":
        std = F.softplus(x).clamp_min(min_std)
    elif mode == "sigmoid2":
        std = 2.0 * torch.sigmoid(x / 2.0) + min_std
    else:
        raise ValueError(f"mode must be one of {STD_MODES}, got {mode!r}")
    return std


def gaussian_rsample(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mean + std * noise, computed in fp32 (fp64 for fp64) and returned in mean's dtype."""
    return (_compute(mean) + _compute(std) * _compute(noise)).to(mean.dtype)


def gaussian_kl(q_mean: torch.Tensor, q_std: torch.Tensor, p_mean: torch.Tensor, p_std: torch.Tensor) -> torch.Tensor:
    """KL(N(q_mean, q_std) || N(p_mean, p_std)) summed over the last dim, in fp32 (fp64 for fp64 inputs)."""
    qm, qs, pm, ps = (_compute(t) for t in (q_mean, q_std, p_mean, p_std))
    var_ratio = (qs / ps) ** 2
    t1 = ((qm - pm) / ps) ** 2
    kl = 0.5 * (var_ratio + t1 - 1.0 - torch.log(var_ratio))
    return kl.sum(-1).to(_kl_dtype(q_mean.dtype))


def gaussian_sample_kl(
    q_mean: torch.Tensor, q_std: torch.Tensor, p_mean: torch.Tensor, p_std: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl): the sample of q and KL(q || p)."""
    return gaussian_rsample(q_mean, q_std, noise), gaussian_kl(q_mean, q_std, p_mean, p_std)


def gaussian_head_sample_kl(
    post_raw: torch.Tensor,
    prior_raw: torch.Tensor,
    noise: torch.Tensor,
    *,
    min_std: float = 0.1,
    mode: str = "softplus",
) -> tuple[torch.Tensor, ...]:
    """Raw head outputs [..., 2S] (mean first) of posterior and prior -> (z, kl, post_mean, post_std, prior_mean,
    prior_std)."""
    q_mean, q_raw = post_raw.chunk(2, dim=-1)
    p_mean, p_raw = prior_raw.chunk(2, dim=-1)
    q_std, p_std = _std_compute(q_raw, min_std, mode), _std_compute(p_raw, min_std, mode)  # fp32: the KL reads them
    z, kl = gaussian_sample_kl(q_mean, q_std, p_mean, p_std, noise)
    return z, kl, q_mean, q_std.to(q_raw.dtype), p_mean, p_std.to(p_raw.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Philox noise, bit-exact with the kernels' in-kernel generator (triton.language.random, 10 rounds).
# ----------------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    # 32 x 32 -> 64-bit product of uint32 values held in int64, split at 16 bits so nothing overflows.
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_lo
    u = a * b_hi + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    # triton's uint_to_uniform_float for 32-bit words: bitcast to int32, fold negatives, scale.
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = 6.283185307179586 * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def philox_normal(
    seed: torch.Tensor | int,
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normals of ``shape`` [..., S] in ``dtype``: the noise the kernels draw for ``seed``.

    The uniforms are float32 as in Triton; Box-Muller runs in float64 for float64 and in float32 otherwise.
    Element (row, col) of the flattened [N, S] view uses Philox counter row * ceil(S / 4) + col // 4 and lane
    col % 4 of the four normals one call yields (two Box-Muller pairs)."""
    shape = tuple(shape)
    s = shape[-1] if shape else 1
    n = 1
    for d in shape[:-1]:
        n *= d
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        seed_t = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        seed_t = torch.tensor(int(seed), dtype=torch.int64, device=device)
    s4 = (s + 3) // 4
    counter = torch.arange(n * s4, dtype=torch.int64, device=device)
    c0, c1 = counter & _MASK32, counter >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed_t & _MASK32, (seed_t >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    n0, n1 = _box_muller(_uniform(c0).to(compute), _uniform(c1).to(compute))
    n2, n3 = _box_muller(_uniform(c2).to(compute), _uniform(c3).to(compute))
    lanes = torch.stack((n0, n1, n2, n3), dim=-1).reshape(n, s4 * 4)[:, :s]
    return lanes.reshape(shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Recurrent cells and the RSSM step
# ----------------------------------------------------------------------------------------------------------------------

ACTIVATIONS = ("elu", "silu")
CELLS = ("gru", "layernorm_gru", "none")


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """ELU (alpha 1) or SiLU."""
    if act == "elu":
        return F.elu(x)
    if act == "silu":
        return F.silu(x)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch.nn.GRUCell: r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise, n = tanh(W_in x + b_in + r * (W_hn h +
    b_hn)), h' = (1 - z) * n + z * h. weight_ih [3D, X], weight_hh [3D, D], rows in the order r, z, n."""
    gi = F.linear(x, weight_ih, bias_ih)
    gh = F.linear(h, weight_hh, bias_hh)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1.0 - z) * n + z * h


def layernorm_gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    *,
    eps: float = 1e-3,
    update_bias: float = -1.0,
) -> torch.Tensor:
    """The Dreamer LayerNorm GRU (DreamerV2, dreamerv3-torch): parts = LayerNorm(cat([x, h]) @ weight.T) over all 3D
    outputs; reset, cand, update = split(parts, 3); reset = sigmoid(reset); cand = tanh(reset * cand);
    update = sigmoid(update + update_bias); h' = update * cand + (1 - update) * h. weight [3D, X + D], no bias."""
    d = h.shape[-1]
    parts = F.linear(torch.cat([x, h], dim=-1), weight)
    parts = F.layer_norm(parts, (3 * d,), norm_weight, norm_bias, eps)
    reset, cand, update = parts.chunk(3, dim=-1)
    reset = torch.sigmoid(reset)
    cand = torch.tanh(reset * cand)
    update = torch.sigmoid(update + update_bias)
    return update * cand + (1.0 - update) * h


def dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    *,
    act: str,
    eps: float = 1e-3,
) -> torch.Tensor:
    """One MLP layer: act(Linear(x)), or act(LayerNorm(Linear(x))) when norm_weight is given (Dreamer's layers)."""
    y = F.linear(x, weight, bias)
    if norm_weight is not None:
        y = F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)
    return activation(y, act)


class StepConfig(NamedTuple):
    """The fixed choices of an RSSM step: the cell kind (one of CELLS), the activation (one of ACTIVATIONS), whether
    the MLP layers carry a LayerNorm, the std convention (one of STD_MODES) and its floor, and the LayerNorm eps."""

    cell: str = "gru"
    act: str = "elu"
    norm: bool = False
    std_mode: str = "softplus"
    min_std: float = 0.1
    eps: float = 1e-3


class StepWeights(NamedTuple):
    """The weights of one RSSM step, in torch.nn.Linear layout ([out, in]); None where a configuration has none.

    - inp: [z, a] -> hidden (Hd); ``inp_w`` [Hd, S + A].
    - cell: "gru": ``cell_w`` = weight_ih [3D, Hd], ``cell_w2`` = weight_hh [3D, D], ``cell_b`` / ``cell_b2`` their
      biases; "layernorm_gru": ``cell_w`` [3D, Hd + D], ``cell_nw`` / ``cell_nb`` the LayerNorm over 3D;
      "none": no cell, the deterministic part is the hidden x itself and the heads read it.
    - prior head: ``p1`` [Hd, D'] then ``p2`` [2S, Hd] (mean first, then raw std); D' = D, or Hd for cell "none".
    - posterior head: ``q1`` [Hd, D' + E] on [h, e] then ``q2`` [2S, Hd].
    ``*_nw`` / ``*_nb`` are the LayerNorm weight and bias of a layer when the config has norm=True.
    """

    inp_w: torch.Tensor
    inp_b: torch.Tensor | None
    inp_nw: torch.Tensor | None
    inp_nb: torch.Tensor | None
    cell_w: torch.Tensor | None
    cell_w2: torch.Tensor | None
    cell_b: torch.Tensor | None
    cell_b2: torch.Tensor | None
    cell_nw: torch.Tensor | None
    cell_nb: torch.Tensor | None
    p1_w: torch.Tensor
    p1_b: torch.Tensor | None
    p1_nw: torch.Tensor | None
    p1_nb: torch.Tensor | None
    p2_w: torch.Tensor
    p2_b: torch.Tensor | None
    q1_w: torch.Tensor | None
    q1_b: torch.Tensor | None
    q1_nw: torch.Tensor | None
    q1_nb: torch.Tensor | None
    q2_w: torch.Tensor | None
    q2_b: torch.Tensor | None


def _cell(cfg: StepConfig, w: StepWeights, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if cfg.cell == "gru":
        return gru_cell(x, h, w.cell_w, w.cell_w2, w.cell_b, w.cell_b2)
    if cfg.cell == "layernorm_gru":
        return layernorm_gru_cell(x, h, w.cell_w, w.cell_nw, w.cell_nb, eps=cfg.eps)
    return x  # "none": the hidden layer is the (stateless) deterministic part


def _head(cfg: StepConfig, w1, b1, nw, nb, w2, b2, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (mean, std): the std in fp32 (fp64 for fp64), as the sample and the KL read it; the steps return it rounded
    y = dense(x, w1, b1, nw, nb, act=cfg.act, eps=cfg.eps)
    mean, raw = F.linear(y, w2, b2).chunk(2, dim=-1)
    return mean, _std_compute(raw, cfg.min_std, cfg.std_mode)


def rssm_prior_step(
    cfg: StepConfig, w: StepWeights, stoch: torch.Tensor, action: torch.Tensor, deter: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prior step p(z_t | h_t): x = act(inp([z, a])), h' = cell(x, h), (mean, std) = prior head(h'),
    z' = mean + std * noise. Returns (h', z', mean, std); h' is [B, 0] for cell "none"."""
    x = dense(torch.cat([stoch, action], dim=-1), w.inp_w, w.inp_b, w.inp_nw, w.inp_nb, act=cfg.act, eps=cfg.eps)
    h = _cell(cfg, w, x, deter)
    mean, std = _head(cfg, w.p1_w, w.p1_b, w.p1_nw, w.p1_nb, w.p2_w, w.p2_b, h)
    new_deter = h if cfg.cell != "none" else deter
    return new_deter, gaussian_rsample(mean, std, noise), mean, std.to(mean.dtype)


def rssm_posterior_step(
    cfg: StepConfig, w: StepWeights, stoch: torch.Tensor, action: torch.Tensor, deter: torch.Tensor,
    embed: torch.Tensor, noise: torch.Tensor, prior_noise: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The posterior step: the prior step, then (mean, std) = posterior head([h', e]), its sample and
    KL(q || p) summed over S. Returns (h', post_z, post_mean, post_std, prior_z, prior_mean, prior_std, kl)."""
    x = dense(torch.cat([stoch, action], dim=-1), w.inp_w, w.inp_b, w.inp_nw, w.inp_nb, act=cfg.act, eps=cfg.eps)
    h = _cell(cfg, w, x, deter)
    p_mean, p_std = _head(cfg, w.p1_w, w.p1_b, w.p1_nw, w.p1_nb, w.p2_w, w.p2_b, h)
    q_mean, q_std = _head(cfg, w.q1_w, w.q1_b, w.q1_nw, w.q1_nb, w.q2_w, w.q2_b, torch.cat([h, embed], dim=-1))
    new_deter = h if cfg.cell != "none" else deter
    return (
        new_deter,
        gaussian_rsample(q_mean, q_std, noise),
        q_mean,
        q_std.to(q_mean.dtype),
        gaussian_rsample(p_mean, p_std, prior_noise),
        p_mean,
        p_std.to(p_mean.dtype),
        gaussian_kl(q_mean, q_std, p_mean, p_std),
    )
