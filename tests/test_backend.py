"""Backend selection: names, nesting, "auto" resolution and the error of "triton" where it cannot run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastwm
from fastwm import _backend


def test_default_and_nesting():
    assert fastwm.get_backend() == "auto"
    with fastwm.backend("reference"):
        assert fastwm.get_backend() == "reference"
        with fastwm.backend("triton"):
            assert fastwm.get_backend() == "triton"
        assert fastwm.get_backend() == "reference"
    assert fastwm.get_backend() == "auto"


def test_restored_after_exception():
    with pytest.raises(RuntimeError):
        with fastwm.backend("reference"):
            raise RuntimeError("boom")
    assert fastwm.get_backend() == "auto"


def test_unknown_name():
    with pytest.raises(ValueError, match="backend name must be one of"):
        with fastwm.backend("cuda"):
            pass
    with pytest.raises(ValueError, match="backend name must be one of"):
        fastwm.set_backend("fast")


def test_auto_resolution(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _backend.use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.use_triton(cpu) == _backend.triton_available()
    with fastwm.backend("reference"):
        assert not _backend.use_triton(cpu)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = torch.zeros(3, 4)
    with fastwm.backend("triton"):
        with pytest.raises(RuntimeError, match="cannot run on a cpu tensor"):
            fastwm.gaussian_kl(m, m + 1, m, m + 1)


def test_bfloat16_never_reaches_the_interpreter(monkeypatch):
    """The interpreter has no bfloat16 (NumPy): "auto" runs bfloat16 CPU tensors on the reference, "triton" refuses
    them with a clear error instead of returning garbage."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    bf = torch.zeros(2, dtype=torch.bfloat16)
    assert not _backend.use_triton(bf)
    assert _backend.use_triton(bf.float()) == _backend.triton_available()
    x, h = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(3, 5, dtype=torch.bfloat16)
    w_ih, w_hh = torch.randn(15, 4, dtype=torch.bfloat16), torch.randn(15, 5, dtype=torch.bfloat16)
    with fastwm.backend("reference"):
        want = fastwm.gru_cell(x, h, w_ih, w_hh)
    assert torch.equal(fastwm.gru_cell(x, h, w_ih, w_hh), want)
    if _backend.triton_available():
        with fastwm.backend("triton"), pytest.raises(RuntimeError, match="cannot run bfloat16 under the Triton"):
            fastwm.gru_cell(x, h, w_ih, w_hh)


def test_reference_runs_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = torch.zeros(3, 4)
    kl = fastwm.gaussian_kl(m, m + 1, m, m + 1)  # auto on CPU: the eager reference
    assert torch.equal(kl, torch.zeros(3))


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_seeded_sample_reproducible_on_each_backend(name, device):
    mean = torch.randn(6, 30, dtype=torch.float64, device=device)
    std = torch.rand(6, 30, dtype=torch.float64, device=device) + 0.5
    with fastwm.backend(name):
        a, b, c = (fastwm.gaussian_rsample(mean, std, generator=torch.Generator().manual_seed(k)) for k in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reference_noise_is_torch_randn():
    mean, std = torch.zeros(6, 30), torch.ones(6, 30)
    with fastwm.backend("reference"):
        z = fastwm.gaussian_rsample(mean, std, generator=torch.Generator().manual_seed(4))
    assert torch.equal(z, torch.randn(6, 30, generator=torch.Generator().manual_seed(4)))


def test_import_touches_no_triton():
    # Importing fastwm must not import triton (whose driver lookup fails on machines without a GPU).
    code = "import sys, fastwm; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kernels_ship_as_fastwm_kernels():
    import fastwm.kernels.gaussian as kg

    assert hasattr(kg, "gaussian_fwd") and hasattr(kg, "gaussian_bwd")
