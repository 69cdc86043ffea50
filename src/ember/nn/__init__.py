"""Building blocks shared by the model families."""
from . import ops
from .activations import activation
from .attention import attention, build_mask, positions_from_mask
from .kv_cache import KVCache
from .layers import Embedding, FusedLinears, LayerNorm, Linear, RMSNorm, linear, linear_from_weight
from .moe import GroupLimitedMoE, SharedExpertMoE, SparseMoE, TopLogitsMoE
from .rope import RotaryEmbedding, apply_rotary, apply_rotary_bthd, apply_rotary_interleaved, rope_parameters, rotary_from_config

__all__ = [
    "activation", "attention", "ops", "build_mask", "positions_from_mask", "KVCache", "Embedding", "FusedLinears", "LayerNorm",
    "Linear", "RMSNorm", "linear", "linear_from_weight", "RotaryEmbedding", "apply_rotary", "apply_rotary_bthd", "apply_rotary_interleaved", "rope_parameters",
    "rotary_from_config", "SparseMoE", "SharedExpertMoE", "GroupLimitedMoE", "TopLogitsMoE",
]
