"""Every bad input gets a clear error naming the argument; value checks follow set_validate_args."""

from __future__ import annotations

import pytest
import torch

import fastwm

BACKENDS = ["reference", "triton"]


def _q(device=torch.device("cpu"), shape=(4, 30), dtype=torch.float32):
    # on the tests' device: a CPU tensor on the "triton" backend raises before any check when the interpreter is off
    return torch.randn(shape, dtype=dtype).to(device), (torch.rand(shape, dtype=dtype) + 0.1).to(device)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastwm.backend(request.param):
        yield request.param


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m, s: fastwm.gaussian_kl(m, s, m, s[:, :3]), ValueError, "p_std must have shape"),
        (lambda m, s: fastwm.gaussian_kl(m, s.double(), m, s), TypeError, "q_std must have the dtype"),
        (lambda m, s: fastwm.gaussian_kl(m, s, m.int(), s), TypeError, "p_mean must be float16"),
        (lambda m, s: fastwm.gaussian_kl(m.cpu().numpy(), s, m, s), TypeError, "q_mean must be a torch.Tensor"),
        (lambda m, s: fastwm.gaussian_kl(m[:, :0], s[:, :0], m[:, :0], s[:, :0]), ValueError,
         "q_mean must have a non-empty last dimension"),
        (lambda m, s: fastwm.gaussian_kl(m[0, 0], s[0, 0], m[0, 0], s[0, 0]), ValueError, "q_mean must have at least"),
        (lambda m, s: fastwm.gaussian_rsample(m, s, m[:, :2]), ValueError, "noise must have shape"),
        (lambda m, s: fastwm.gaussian_rsample(m, s.half()), TypeError, "std must have the dtype"),
        (lambda m, s: fastwm.gaussian_rsample(m, s, m, generator=torch.Generator()), ValueError,
         "either noise or generator"),
        (lambda m, s: fastwm.gaussian_rsample(m, s, generator=3), TypeError, "generator must be a torch.Generator"),
        (lambda m, s: fastwm.gaussian_sample_kl(m, s, m, s, s[None]), ValueError, "noise must have shape"),
        (lambda m, s: fastwm.gaussian_head_sample_kl(m[:, :29], m[:, :29]), ValueError, "post_raw's last dimension"),
        (lambda m, s: fastwm.gaussian_head_sample_kl(m, m[:2]), ValueError, "prior_raw must have shape"),
        (lambda m, s: fastwm.gaussian_head_sample_kl(m, m, m), ValueError, r"noise must have shape \(4, 15\)"),
        (lambda m, s: fastwm.gaussian_head_sample_kl(m, m, mode="exp"), ValueError, "mode must be one of"),
        (lambda m, s: fastwm.std_from_raw(m, mode="relu"), ValueError, "mode must be one of"),
        (lambda m, s: fastwm.std_from_raw(m, min_std=-0.1), ValueError, "min_std must be a finite float >= 0"),
        (lambda m, s: fastwm.std_from_raw(m, min_std="0.1"), TypeError, "min_std must be a float"),
        (lambda m, s: fastwm.std_from_raw(m, mode="softplus_clamp", min_std=0.0), ValueError, "min_std must be > 0"),
    ],
)
def test_bad_input_errors(call, exc, match, backend, device):
    m, s = _q(device)
    with pytest.raises(exc, match=match):
        call(m, s)


def test_device_mismatch_names_argument():
    m, s = _q()
    meta = s.to("meta")
    with pytest.raises(ValueError, match="q_std must be on the device of q_mean"):
        fastwm.gaussian_kl(m, meta, m, s)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, s: fastwm.gaussian_kl(m, s, m, s.neg()), "p_std must be strictly positive"),
        (lambda m, s: fastwm.gaussian_kl(m.masked_fill(m > 1, float("nan")), s, m, s), "q_mean must be finite"),
        (lambda m, s: fastwm.gaussian_rsample(m, s, torch.full_like(m, float("inf"))), "noise must be finite"),
        (lambda m, s: fastwm.gaussian_head_sample_kl(torch.cat([m, m.masked_fill(m > 0, float("nan"))], -1), m.repeat(1, 2)),
         "post_raw must be finite"),
        (lambda m, s: fastwm.std_from_raw(torch.full_like(m, float("nan"))), "raw must be finite"),
    ],
)
def test_value_checks_when_enabled(call, match, backend, device):
    m, s = _q(device)
    fastwm.set_validate_args(True)
    try:
        assert fastwm.get_validate_args()
        with pytest.raises(ValueError, match=match):
            call(m, s)
    finally:
        fastwm.set_validate_args(False)


def test_cell_weights_are_value_checked(backend, device):
    x, h = torch.randn(3, 4, device=device), torch.randn(3, 5, device=device)
    w_ih, w_hh = torch.randn(15, 4, device=device), torch.randn(15, 5, device=device)
    fastwm.set_validate_args(True)
    try:
        with pytest.raises(ValueError, match="^weight_hh must be finite"):
            fastwm.gru_cell(x, h, w_ih, w_hh.index_fill(0, torch.tensor([2], device=device), float("nan")))
        with pytest.raises(ValueError, match="^norm_bias must be finite"):
            fastwm.layernorm_gru_cell(x, h, torch.randn(15, 9, device=device), torch.ones(15, device=device),
                                      torch.full((15,), float("inf"), device=device))
    finally:
        fastwm.set_validate_args(False)


def test_set_validate_args_takes_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastwm.set_validate_args("no")
    assert not fastwm.get_validate_args()


def test_value_checks_off_by_default():
    assert not fastwm.get_validate_args()
    m, s = _q()
    with fastwm.backend("reference"):
        kl = fastwm.gaussian_kl(m, s, m, torch.zeros_like(s))  # a zero std is not checked: inf or NaN comes back
    assert not torch.isfinite(kl).all()
