"""fastwm: fused Triton kernels for latent world models (the RSSM of PlaNet and Dreamer).

Public surface (see the README): backends, the Gaussian latent ops (std transform, reparameterized sample, KL, the
fused head entry the RSSM step calls), the KL conventions of the sequence ELBO, and value validation.
"""

from . import _checkout  # noqa: F401, before the rest: in a source checkout it finds kernels/ and benchmarks/
from . import interop, reference
from ._backend import BACKENDS, backend, get_backend, set_backend
from ._validation import get_validate_args, set_validate_args
from .gaussian import (
    GaussianHeadSample,
    gaussian_head_sample_kl,
    gaussian_kl,
    gaussian_rsample,
    gaussian_sample_kl,
    std_from_raw,
)
from .kl import KL_MODES, KL_PRESETS, kl_loss
from .cells import gru_cell, layernorm_gru_cell
from .rssm import RSSM, LayerNormGRUCell, State
from .planning import CEMPlanner, MPPIPlanner
from .elbo import ELBOTerms, SequenceELBO, gaussian_log_prob, sequence_elbo
from .overshooting import latent_overshooting_kl

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
