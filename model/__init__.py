"""DeepSeek-V4 inference on the dsv4_triton op registry.

``DSV4Model.from_pretrained(path_or_preset, device, max_batch, max_seq_len, seed)`` builds
the model from a release-layout checkpoint directory or from a preset/config with random
weights; ``forward(input_ids, start_pos)`` runs a prefill or a decode step against the
model's own cache; ``generate`` decodes greedily; ``python -m model.generate`` is a demo.
"""

from .cache import KVCache
from .checkpoint import CheckpointError, LoadReport, load_checkpoint, random_init, save_checkpoint
from .config import DSV4Config, get_config
from .dsv4 import DSV4Model

__all__ = ["DSV4Model", "DSV4Config", "KVCache", "get_config", "load_checkpoint", "save_checkpoint",
           "random_init", "CheckpointError", "LoadReport"]
