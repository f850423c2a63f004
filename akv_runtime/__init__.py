"""akv_runtime: a CUDA-Python runtime for precision-aligned (AlignedKV) bit-plane KV caches.

Public names: :class:`AlignedKVCache`, :class:`AlignmentRule`, :data:`SEED_RULE`,
:class:`CudaError`, :class:`NoCubinError`, :class:`CPUFallbackWarning`. See README.md and
docs/design.md. Importing the package imports neither torch nor the CUDA driver.
"""

from .cache import AlignedKVCache, CPUFallbackWarning, cuda_unavailable_reason
from .driver import CudaError, NoCubinError
from .reference import SEED_RULE, AlignmentRule

__all__ = ["AlignedKVCache", "AlignmentRule", "SEED_RULE", "CudaError", "NoCubinError",
           "CPUFallbackWarning", "cuda_unavailable_reason"]
__version__ = "0.1.0"
