"""Test setup: which device the kernels run on, per-dtype tolerances, and NaN-poisoned outputs.

``pytest --device cpu`` (the default without a GPU) runs the Triton kernels themselves on the CPU through the Triton
interpreter (TRITON_INTERPRET=1, set here before any kernel is imported); ``--device cuda`` runs them natively.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=None,
        choices=("cpu", "cuda"),
        help="device the kernels are tested on (default: cuda when available, else cpu under TRITON_INTERPRET=1)",
    )


def _device(config: pytest.Config) -> str:
    chosen = config.getoption("--device")
    if chosen is None:
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    return chosen


def pytest_configure(config: pytest.Config) -> None:
    if _device(config) == "cpu":
        # Read by triton.jit when fastwm.kernels is first imported, which happens lazily on the first kernel call.
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_report_header(config: pytest.Config) -> str:
    dev = _device(config)
    how = "Triton interpreter (TRITON_INTERPRET=1)" if dev == "cpu" else torch.cuda.get_device_name()
    return f"fastwm kernels on: {dev} ({how})"


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    return torch.device(_device(pytestconfig))


def dtypes_for(device: str) -> list[torch.dtype]:
    # The interpreter runs on NumPy, which has no bfloat16: half precision is tested on cuda only.
    base = [torch.float32, torch.float64]
    return base + [torch.bfloat16, torch.float16] if device == "cuda" else base


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dtype" in metafunc.fixturenames:
        dts = dtypes_for(_device(metafunc.config))
        metafunc.parametrize("dtype", dts, ids=[str(d).removeprefix("torch.") for d in dts])


# Relative tolerance of a kernel output against the float64 reference, scaled by the reference's magnitude.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, name: str,
                 eager: torch.Tensor | None = None) -> None:
    """|actual - ref64| <= rtol(dtype) * max(1, max|ref64|), elementwise; for half dtypes the bound is flash-attn's
    2 * |eager_same_dtype - ref64| + atol when the eager result in the same dtype is given."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    a = actual.detach().double().cpu()
    e = expected64.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (an unwritten, NaN-poisoned element?)"
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    atol = RTOL[dtype] * scale
    err = (a - e).abs()
    if eager is not None and dtype in (torch.bfloat16, torch.float16):
        bound = 2 * (eager.detach().double().cpu() - e).abs() + atol
    else:
        bound = torch.full_like(err, atol)
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{name} ({dtype}): max error {err.max().item():.3e} exceeds bound (scale {scale:.3e})"


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch):
    """Make every output the kernels' launchers allocate start as NaN."""
    from fastwm.kernels import gaussian, observe, rollout, rssm

    def nan_empty(shape, *, like, dtype=None):
        return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype if dtype is None else dtype)

    # every launcher module that allocates through gaussian.empty (each imported it by name)
    for module in (gaussian, rssm, observe, rollout):
        monkeypatch.setattr(module, "empty", nan_empty)
    return nan_empty
