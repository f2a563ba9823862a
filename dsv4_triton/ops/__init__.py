"""The public ops of dsv4_triton, one module per kernel family.

Every function validates its arguments, then runs the implementation the registry
picks for the tensors' device (see ``dsv4_triton.registry``).  Each family module
lists its public functions in ``__all__``.
"""

from . import activation, attention, compressor, gemm, indexer, mhc, moe, norm, quant, rope, router
from .activation import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
from .compressor import *  # noqa: F401,F403
from .gemm import *  # noqa: F401,F403
from .indexer import *  # noqa: F401,F403
from .mhc import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403
from .rope import *  # noqa: F401,F403
from .router import *  # noqa: F401,F403

FAMILIES = (norm, rope, quant, activation, mhc, router, attention, gemm, moe, compressor, indexer)
__all__ = [name for fam in FAMILIES for name in fam.__all__]
