"""Argument checks shared by every public op.

Shape, dtype and device checks are host-side metadata reads: they always run and cost nothing on the device. Value
checks (finite inputs, std > 0) need a reduction and a host sync per call, so they are opt-in through
:func:`set_validate_args`, in the spirit of ``torch.distributions``' ``validate_args``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["set_validate_args", "get_validate_args"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_validate_values = False


def set_validate_args(enabled: bool) -> None:
    """Turn value checks on or off for every fastwm op (default: off).

    When on, each call also checks that its floating inputs are finite and its stds strictly positive, raising a
    ValueError naming the argument. Each check is one reduction plus a device-to-host sync per argument; it is
    skipped inside ``torch.compile`` graphs and CUDA graph captures. Use it while debugging NaN or exploding KL, not
    in a timed loop.
    """
    global _validate_values
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _validate_values = enabled


def get_validate_args() -> bool:
    """Whether value checks are on (see :func:`set_validate_args`)."""
    return _validate_values


def check_float(name: str, value: object) -> float:
    """A real number (an int or a float, not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_positive_int(name: str, value: object) -> int:
    """An int >= 1 (not a bool: True would pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_tensor(name: str, t: object, *, min_dim: int = 1) -> torch.Tensor:
    """A floating tensor with at least ``min_dim`` dims and a non-empty last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    if min_dim >= 1 and t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(t.shape)}")
    return t


def check_like(name: str, t: object, ref_name: str, ref: torch.Tensor, *, shape: Sequence[int] | None = None) -> None:
    """``t`` is a tensor with ref's dtype and device and the given shape (ref's shape by default)."""
    check_tensor(name, t, min_dim=0)
    assert isinstance(t, torch.Tensor)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    want = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want} (from {ref_name}), got {tuple(t.shape)}")


def check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (where a host sync is an error)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def checking_values() -> bool:
    """Whether value checks run now: enabled by :func:`set_validate_args`, and neither inside torch.compile nor
    inside a CUDA graph capture (where the host sync they need is not allowed)."""
    return _validate_values and not torch.compiler.is_compiling() and not _capturing()


def check_values(finite: dict[str, torch.Tensor | None],
                 positive: dict[str, torch.Tensor | None] | None = None) -> None:
    """Value checks, only when enabled by :func:`set_validate_args`, outside torch.compile and outside a CUDA graph
    capture. Absent (None) optional arguments are skipped."""
    if not checking_values():
        return
    checks = [(name, torch.isfinite(t).all(), "must be finite, found NaN or infinite values")
              for name, t in finite.items() if t is not None]
    checks += [(name, (t > 0).all(), "must be strictly positive (a standard deviation), found values <= 0")
               for name, t in (positive or {}).items() if t is not None]
    if not checks:
        return
    # one device-to-host sync for all of them (the flags of tensors on other devices are moved first)
    ok = torch.stack([flag.to(checks[0][1].device) for _, flag, _ in checks]).tolist()
    for (name, _, what), good in zip(checks, ok):
        if not good:
            raise ValueError(f"{name} {what}")
