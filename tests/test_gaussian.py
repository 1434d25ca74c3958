"""The fused Gaussian kernels against the float64 eager reference: values and every gradient.

All tests here run the Triton kernels themselves (``fastwm.backend("triton")``): on cuda natively, on the CPU under
the Triton interpreter. Outputs are NaN-poisoned before each launch (the ``poison`` fixture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import fastwm
from fastwm import reference

from .conftest import assert_close

pytestmark = pytest.mark.interpreter

# (leading shape, S): odd sizes and powers of two; 150 rows of S = 30 span two row blocks; S = 1030 spans two column
# chunks of the kernel's loop.
SHAPES = [((1,), 1), ((7,), 30), ((5, 3), 37), ((4, 16), 32), ((41,), 7), ((3, 50), 30), ((3,), 1030)]
SHAPE_IDS = [f"{'x'.join(map(str, lead))}-S{s}" for lead, s in SHAPES]
STD_MODES = ["softplus", "softplus_clamp", "sigmoid2"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape: Sequence[int], g: torch.Generator, device: torch.device, dtype: torch.dtype,
           scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def _std(shape: Sequence[int], g: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * 0.5).exp().add(0.05).to(device, dtype)


def _q_p(shape: Sequence[int], g: torch.Generator, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """[q_mean, q_std, p_mean, p_std], each of ``shape``."""
    return [_randn(shape, g, device, dtype), _std(shape, g, device, dtype),
            _randn(shape, g, device, dtype), _std(shape, g, device, dtype)]


def _odd_strides(t: torch.Tensor) -> torch.Tensor:
    """The same values with non-contiguous strides (as grad outputs often arrive)."""
    return t.unsqueeze(-1).expand(*t.shape, 2)[..., 0] if t.dim() else t


def check_against_reference(
    fused: Callable[..., Sequence[torch.Tensor]],
    ref: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    names: Sequence[str],
    seed: int = 0,
) -> None:
    """Run ``fused`` on ``inputs`` and ``ref`` on float64 copies; compare every output and, with random upstream
    gradients, the gradient of every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    with fastwm.backend("triton"):
        outs = fused(*leaves)
    outs64 = ref(*leaves64)
    with fastwm.backend("reference"):
        eager = ref(*[t.detach() for t in inputs])  # same dtype, for the half-precision bound
    g = _gen(1000 + seed)
    grads_out = [torch.randn(tuple(o.shape), generator=g, dtype=torch.float64) for o in outs64]
    for i, (o, o64) in enumerate(zip(outs, outs64)):
        assert o.dtype == (o64.dtype if dtype == torch.float64 else o.dtype)
        assert_close(o, o64, dtype, f"output {i}", eager=eager[i])
    grads_fused = torch.autograd.grad(
        outs, leaves, [_odd_strides(go.to(o.device, o.dtype)) for go, o in zip(grads_out, outs)], allow_unused=True
    )
    grads_ref = torch.autograd.grad(outs64, leaves64, grads_out, allow_unused=True)
    for name, gf, gr in zip(names, grads_fused, grads_ref):
        assert gf is not None, f"no gradient for {name}"
        assert gf.dtype == dtype
        assert_close(gf, gr if gr is not None else torch.zeros_like(gf, dtype=torch.float64), dtype, f"d {name}")


@pytest.mark.parametrize("mode", STD_MODES)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_std_from_raw(mode, shape, dtype, device, poison):
    lead, s = shape
    raw = _randn((*lead, s), _gen(1), device, dtype, scale=3.0)
    check_against_reference(
        lambda r: (fastwm.std_from_raw(r, mode=mode),),
        lambda r: (reference.std_from_raw(r, mode=mode),),
        [raw], dtype, ["raw"],
    )


@pytest.mark.parametrize("mode", ["softplus", "sigmoid2"])
def test_kl_of_tiny_stds_is_exact(mode, device, poison):
    # Stds below ~1e-19 (min_std 0 lets them through) square to 0 in float32: the KL, computed in ratios, stays
    # finite and equal to the reference's (0 for identical distributions), and so do the sample's gradients when no
    # KL gradient is asked for (a 0 x inf there was a NaN).
    std = torch.tensor([[1e-20, 1e-30, 0.5]], device=device)
    mean = torch.tensor([[0.25, -1.0, 2.0]], device=device)
    for impl in (fastwm.gaussian_kl, reference.gaussian_kl):
        kl = impl(mean, std, mean.clone(), std.clone())
        assert kl.dtype == torch.float32 and kl.tolist() == [0.0], (impl, kl)
    tiny = (-44.0, -50.0) if mode == "softplus" else (-100.0, -120.0)  # stds of about 1e-19 to 1e-26
    raw = torch.tensor([[0.25, -1.0, 2.0, *tiny, 0.3]], device=device)
    noise = torch.tensor([[0.5, -1.5, 1.0]], device=device)
    grads = []
    for backend in ("reference", "triton"):
        r = raw.clone().requires_grad_(True)
        with fastwm.backend(backend):
            out = fastwm.gaussian_head_sample_kl(r, r, noise, min_std=0.0, mode=mode)
        assert out.kl.tolist() == [0.0], (backend, out.kl)
        grads.append(torch.autograd.grad(out.sample.sum(), r)[0])
    assert torch.isfinite(grads[1]).all(), grads[1]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_head_kl_is_computed_from_fp32_stds(half, device, poison):
    # The KL of half raw head outputs is computed from the fp32 stds on both backends (not from stds rounded to the
    # half dtype): fp32-level error against float64 on the same raw values, and a std that would round to 0 in the
    # half dtype (min_std 1e-8, raw -30) gives the exact 0 of identical heads instead of 0 / 0.
    g = torch.Generator().manual_seed(7)
    post, prior = (torch.randn(6, 10, generator=g).to(device, half) for _ in range(2))
    noise = torch.randn(6, 5, generator=g).to(device, half)
    want = reference.gaussian_head_sample_kl(post.double(), prior.double(), noise.double())[1]
    same = torch.full((1, 4), -30.0, device=device, dtype=half)
    interpreted_bf16 = half == torch.bfloat16 and torch.device(device).type == "cpu"  # NumPy has no bfloat16
    for backend in ("reference",) if interpreted_bf16 else ("reference", "triton"):
        with fastwm.backend(backend):
            kl = fastwm.gaussian_head_sample_kl(post, prior, noise).kl
            zero = fastwm.gaussian_head_sample_kl(same, same.clone(), same[:, :2] * 0, min_std=1e-8).kl
        assert kl.dtype == torch.float32
        torch.testing.assert_close(kl.double(), want, rtol=2e-6, atol=1e-6, msg=backend)
        assert zero.tolist() == [0.0], (backend, zero)


def test_std_from_raw_extremes(device, poison):
    # softplus's threshold branch and underflow to the floor in float64 and float32; in float64 also raw exactly at
    # softplus_clamp's boundary (softplus(raw) == 0.1), where the gradient must pass as torch.clamp_min's does.
    for dtype, extra in ((torch.float64, [-2.2521684610440904]), (torch.float32, [])):
        raw = torch.tensor([-200.0, -30.0, 0.0, 19.9, 20.0, 20.1, 80.0, *extra], dtype=dtype, device=device)
        for mode in STD_MODES:
            check_against_reference(
                lambda r: (fastwm.std_from_raw(r, mode=mode, min_std=0.1),),
                lambda r: (reference.std_from_raw(r, mode=mode, min_std=0.1),),
                [raw], dtype, ["raw"],
            )


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rsample_given_noise(shape, dtype, device, poison):
    lead, s = shape
    g = _gen(2)
    full = (*lead, s)
    inputs = [_randn(full, g, device, dtype), _std(full, g, device, dtype), _randn(full, g, device, dtype)]
    check_against_reference(
        lambda m, sd, n: (fastwm.gaussian_rsample(m, sd, n),),
        lambda m, sd, n: (reference.gaussian_rsample(m, sd, n),),
        inputs, dtype, ["mean", "std", "noise"],
    )


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_kl(shape, dtype, device, poison):
    lead, s = shape
    g = _gen(3)
    full = (*lead, s)
    inputs = _q_p(full, g, device, dtype)
    check_against_reference(
        lambda *a: (fastwm.gaussian_kl(*a),),
        lambda *a: (reference.gaussian_kl(*a),),
        inputs, dtype, ["q_mean", "q_std", "p_mean", "p_std"],
    )


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_sample_kl_given_noise(shape, dtype, device, poison):
    lead, s = shape
    g = _gen(4)
    full = (*lead, s)
    inputs = [*_q_p(full, g, device, dtype), _randn(full, g, device, dtype)]
    check_against_reference(
        lambda *a: fastwm.gaussian_sample_kl(*a),
        lambda *a: reference.gaussian_sample_kl(*a),
        inputs, dtype, ["q_mean", "q_std", "p_mean", "p_std", "noise"],
    )


@pytest.mark.parametrize("mode", STD_MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_head_sample_kl_given_noise(mode, shape, dtype, device, poison):
    lead, s = shape
    g = _gen(5)
    inputs = [_randn((*lead, 2 * s), g, device, dtype, scale=2.0), _randn((*lead, 2 * s), g, device, dtype, scale=2.0),
              _randn((*lead, s), g, device, dtype)]
    check_against_reference(
        lambda q, p, n: tuple(fastwm.gaussian_head_sample_kl(q, p, n, mode=mode)),
        lambda q, p, n: reference.gaussian_head_sample_kl(q, p, n, mode=mode),
        inputs, dtype, ["post_raw", "prior_raw", "noise"],
    )


def test_head_unused_outputs_send_no_gradient(device, poison):
    # Only sample and kl reach the loss: the other four outputs' gradients arrive as None, not zeros.
    g = _gen(6)
    q, p = (_randn((9, 2 * 30), g, device, torch.float64, scale=2.0).requires_grad_() for _ in range(2))
    noise = _randn((9, 30), g, device, torch.float64)
    w = _randn((9, 30), g, device, torch.float64)
    with fastwm.backend("triton"):
        out = fastwm.gaussian_head_sample_kl(q, p, noise, mode="softplus")
        dq, dp = torch.autograd.grad((out.sample * w).sum() + out.kl.pow(2).sum(), (q, p))
    q64, p64 = q.detach().requires_grad_(), p.detach().requires_grad_()
    ref = reference.gaussian_head_sample_kl(q64, p64, noise, mode="softplus")
    rq, rp = torch.autograd.grad((ref[0] * w).sum() + ref[1].pow(2).sum(), (q64, p64))
    assert_close(dq, rq, torch.float64, "d post_raw")
    assert_close(dp, rp, torch.float64, "d prior_raw")


# -- seeded noise ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [((7,), 30), ((5, 3), 37), ((2,), 1030)], ids=["7-S30", "5x3-S37", "2-S1030"])
def test_seeded_noise_matches_reference_philox(shape, dtype, device, poison):
    """The kernel's in-register Philox noise is reference.philox_normal: same generator, same sample, same grads."""
    lead, s = shape
    g = _gen(7)
    full = (*lead, s)
    inputs = _q_p(full, g, device, dtype)
    check_against_reference(
        lambda *a: fastwm.gaussian_sample_kl(*a, generator=_gen(123)),
        _reference_seeded,
        inputs, dtype, ["q_mean", "q_std", "p_mean", "p_std"],
    )


def _reference_seeded(qm, qs, pm, ps):
    # The seed the public function draws from a fresh generator, and the Philox noise the kernel derives from it.
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=_gen(123))
    noise = reference.philox_normal(seed, qm.shape, dtype=qm.dtype, device=qm.device)
    return reference.gaussian_sample_kl(qm, qs, pm, ps, noise)


def test_seeded_noise_reproducible_and_distinct(device, poison):
    g = _gen(8)
    mean = _randn((64, 37), g, device, torch.float32)
    std = torch.ones_like(mean)
    with fastwm.backend("triton"):
        a = fastwm.gaussian_rsample(mean, std, generator=_gen(11))
        b = fastwm.gaussian_rsample(mean, std, generator=_gen(11))
        c = fastwm.gaussian_rsample(mean, std, generator=_gen(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    eps = (a - mean).double()
    # 2,368 draws: the sample mean and std of N(0, 1) are within 5 standard errors.
    assert abs(eps.mean().item()) < 5 / eps.numel() ** 0.5
    assert abs(eps.std().item() - 1.0) < 5 * (0.5 / eps.numel()) ** 0.5 * 2
    # Distinct columns and rows get distinct numbers (no counter reuse across the 4-lane groups).
    assert torch.unique(eps).numel() == eps.numel()


def test_seeded_backward_regenerates_noise(device, poison):
    """d std = upstream * noise: the backward's regenerated noise must be the forward's."""
    g = _gen(9)
    mean = _randn((13, 30), g, device, torch.float64).requires_grad_()
    std = _std((13, 30), g, device, torch.float64).requires_grad_()
    w = _randn((13, 30), g, device, torch.float64)
    with fastwm.backend("triton"):
        z = fastwm.gaussian_rsample(mean, std, generator=_gen(5))
        (dstd,) = torch.autograd.grad((z * w).sum(), (std,))
    noise = (z.detach() - mean.detach()) / std.detach()
    assert_close(dstd, w * noise, torch.float64, "d std")


def test_philox_normal_statistics():
    x = reference.philox_normal(3, (256, 64), dtype=torch.float64)
    assert x.shape == (256, 64) and x.dtype == torch.float64
    assert abs(x.mean().item()) < 5 / x.numel() ** 0.5
    assert abs(x.var().item() - 1.0) < 5 * (2 / x.numel()) ** 0.5
    assert torch.equal(reference.philox_normal(3, (4, 5)), reference.philox_normal(torch.tensor([3]), (4, 5)))


# -- float64 gradcheck ----------------------------------------------------------------------------------------------


def test_gradcheck_float64(device):
    g = _gen(10)
    f64 = torch.float64
    qm, pm, noise = (_randn((3, 5), g, device, f64).requires_grad_() for _ in range(3))
    qs, ps = (_std((3, 5), g, device, f64).requires_grad_() for _ in range(2))
    raw_q, raw_p = (_randn((2, 3, 10), g, device, f64, scale=2.0).requires_grad_() for _ in range(2))
    with fastwm.backend("triton"):
        assert torch.autograd.gradcheck(lambda r: fastwm.std_from_raw(r, mode="softplus"), (raw_q,))
        assert torch.autograd.gradcheck(fastwm.gaussian_rsample, (qm, qs, noise))
        assert torch.autograd.gradcheck(lambda m, s: fastwm.gaussian_rsample(m, s, generator=_gen(1)), (qm, qs))
        assert torch.autograd.gradcheck(fastwm.gaussian_kl, (qm, qs, pm, ps))
        assert torch.autograd.gradcheck(fastwm.gaussian_sample_kl, (qm, qs, pm, ps, noise))
        for mode in STD_MODES:
            assert torch.autograd.gradcheck(
                lambda q, p: tuple(fastwm.gaussian_head_sample_kl(q, p, generator=_gen(2), mode=mode)), (raw_q, raw_p)
            )


# -- layouts ----------------------------------------------------------------------------------------------------------


def test_empty_batch(device):
    with fastwm.backend("triton"):
        z, kl = fastwm.gaussian_sample_kl(*(torch.ones(0, 4, 30, device=device) for _ in range(4)))
        out = fastwm.gaussian_head_sample_kl(torch.ones(2, 0, 60, device=device), torch.ones(2, 0, 60, device=device))
    assert z.shape == (0, 4, 30) and kl.shape == (0, 4)
    assert out.sample.shape == (2, 0, 30) and out.kl.shape == (2, 0) and out.prior_std.shape == (2, 0, 30)


def test_non_contiguous_inputs(device, poison):
    g = _gen(11)
    base = [_randn((30, 6), g, device, torch.float64) for _ in range(5)]
    qm, pm, noise = base[0].t(), base[2].t(), base[4].t()
    qs, ps = base[1].t().exp(), base[3].t().exp()
    with fastwm.backend("triton"):
        z, kl = fastwm.gaussian_sample_kl(qm, qs, pm, ps, noise)
    rz, rkl = reference.gaussian_sample_kl(qm, qs, pm, ps, noise)
    assert_close(z, rz, torch.float64, "z")
    assert_close(kl, rkl, torch.float64, "kl")
