"""torch.compile(fullgraph=True) traces through the fastwm custom ops (Triton kernels under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import fastwm

pytestmark = pytest.mark.interpreter


def _loss(q_raw, p_raw, noise):
    out = fastwm.gaussian_head_sample_kl(q_raw, p_raw, noise, mode="softplus")
    std = fastwm.std_from_raw(q_raw, mode="sigmoid2")
    kl = fastwm.kl_loss(out.post_mean, out.post_std, out.prior_mean, out.prior_std, **fastwm.KL_PRESETS["dreamerv3"])
    z = fastwm.gaussian_rsample(out.prior_mean, out.prior_std)  # seeded: a seed tensor drawn inside the graph
    return (out.sample.square().sum() + out.kl.sum() + kl + std.sum(), z)


def test_fullgraph_compile_matches_eager(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q_raw = torch.randn(3, 5, 64, generator=g).to(device).requires_grad_()
    p_raw = torch.randn(3, 5, 64, generator=g).to(device).requires_grad_()
    noise = torch.randn(3, 5, 32, generator=g).to(device)
    with fastwm.backend("triton"):
        compiled = torch.compile(_loss, fullgraph=True)
        loss_c, z_c = compiled(q_raw, p_raw, noise)
        grads_c = torch.autograd.grad(loss_c, (q_raw, p_raw))
        loss_e, z_e = _loss(q_raw, p_raw, noise)
        grads_e = torch.autograd.grad(loss_e, (q_raw, p_raw))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert z_c.shape == (3, 5, 32) and torch.isfinite(z_c).all()


def test_custom_ops_registered():
    for name in ("gaussian_fused", "gaussian_fused_backward", "std_from_raw", "std_from_raw_backward"):
        assert hasattr(torch.ops.fastwm, name)


def test_opcheck_fused(device):
    # torch.library.opcheck: schema, fake tensor and autograd registration are consistent with the kernel.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 20, generator=g, dtype=torch.float64).to(device).requires_grad_()
    p = torch.randn(4, 20, generator=g, dtype=torch.float64).to(device).requires_grad_()
    n = torch.randn(4, 10, generator=g, dtype=torch.float64).to(device)
    torch.library.opcheck(torch.ops.fastwm.gaussian_fused.default, (q, None, p, None, n, None, 0, 0.1, True, True))
    torch.library.opcheck(torch.ops.fastwm.std_from_raw.default, (q, 0.1, 2))
