"""The eager reference: plain PyTorch, exact in float64.

It is the ground truth of the tests, the CPU path of the "reference" backend, and the "eager" baseline of the
benchmarks. Every function here takes tensors of any floating dtype; half-precision inputs are computed in float32
(as the kernels do) and float64 inputs stay float64.
"""

from __future__ import annotations

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
]

STD_MODES = ("softplus", "softplus_clamp", "sigmoid2")


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _kl_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def std_from_raw(raw: torch.Tensor, *, min_std: float = 0.1, mode: str = "softplus") -> torch.Tensor:
    """std from a raw head output: softplus(raw) + min_std, softplus(raw).clamp_min(min_std) or
    2 * sigmoid(raw / 2) + min_std. Computed in fp32 (fp64 for fp64 input), returned in raw's dtype."""
    x = _compute(raw)
    if mode == "softplus":
        std = F.softplus(x) + min_std
    elif mode == "softplus_clamp":
        std = F.softplus(x).clamp_min(min_std)
    elif mode == "sigmoid2":
        std = 2.0 * torch.sigmoid(x / 2.0) + min_std
    else:
        raise ValueError(f"mode must be one of {STD_MODES}, got {mode!r}")
    return std.to(raw.dtype)


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
    q_std = std_from_raw(q_raw, min_std=min_std, mode=mode)
    p_std = std_from_raw(p_raw, min_std=min_std, mode=mode)
    z, kl = gaussian_sample_kl(q_mean, q_std, p_mean, p_std, noise)
    return z, kl, q_mean, q_std, p_mean, p_std


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
