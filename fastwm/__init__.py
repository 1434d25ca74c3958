"""fastwm: fused Triton kernels for latent world models (the RSSM of PlaNet and Dreamer).

Public surface (see the README): backends, the Gaussian latent ops (std transform, reparameterized sample, KL, the
fused head entry the RSSM step calls), the KL conventions of the sequence ELBO, and value validation.
"""

import os as _os


def _checkout_subpackages() -> None:
    """In a source checkout imported without installing (``python -m ...`` from the repository root, as a GPU
    machine with no registry runs it), find ``fastwm.kernels`` and ``fastwm.benchmarks`` in the repository's
    kernels/ and benchmarks/ folders, where setuptools' package-dir maps them when installed. An installed copy
    (wheel or editable) is left as it is."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    installed = _os.path.isdir(_os.path.join(here, "kernels"))
    checkout = all(_os.path.isfile(_os.path.join(root, *p)) for p in (("pyproject.toml",), ("kernels", "__init__.py"),
                                                                     ("benchmarks", "__init__.py")))
    if checkout and not installed and root not in __path__:
        __path__.append(root)


_checkout_subpackages()

from . import interop, reference  # noqa: E402
from ._backend import BACKENDS, backend, get_backend, set_backend  # noqa: E402
from ._validation import get_validate_args, set_validate_args  # noqa: E402
from .gaussian import (  # noqa: E402
    GaussianHeadSample,
    gaussian_head_sample_kl,
    gaussian_kl,
    gaussian_rsample,
    gaussian_sample_kl,
    std_from_raw,
)
from .kl import KL_MODES, KL_PRESETS, kl_loss  # noqa: E402
from .cells import gru_cell, layernorm_gru_cell  # noqa: E402
from .rssm import RSSM, LayerNormGRUCell, State  # noqa: E402
from .planning import CEMPlanner, MPPIPlanner  # noqa: E402
from .elbo import ELBOTerms, SequenceELBO, gaussian_log_prob, sequence_elbo  # noqa: E402
from .overshooting import latent_overshooting_kl  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CEMPlanner",
    "MPPIPlanner",
    "ELBOTerms",
    "SequenceELBO",
    "LayerNormGRUCell",
    "RSSM",
    "State",
    "GaussianHeadSample",
    "KL_MODES",
    "KL_PRESETS",
    "backend",
    "gaussian_head_sample_kl",
    "gaussian_kl",
    "gaussian_log_prob",
    "gaussian_rsample",
    "gaussian_sample_kl",
    "get_backend",
    "get_validate_args",
    "interop",
    "gru_cell",
    "layernorm_gru_cell",
    "kl_loss",
    "latent_overshooting_kl",
    "reference",
    "set_backend",
    "sequence_elbo",
    "set_validate_args",
    "std_from_raw",
]
