"""dsv4_triton: the kernels DeepSeek-V4 inference needs, in Triton (and CUDA where it wins),
each with a pure-torch FP32 reference and one registry choosing among them."""

from . import ops, registry
from .registry import BackendUnavailableError, set_backend, use_backend
from .validate import set_checks

__version__ = "0.1.0"
__all__ = ["ops", "registry", "use_backend", "set_backend", "set_checks", "BackendUnavailableError"]
