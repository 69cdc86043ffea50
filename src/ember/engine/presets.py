"""Model shapes for benchmarks with random weights (no download): `ember bench --config llama-1b`."""
from __future__ import annotations

import torch

from ..varbuilder import DictSource, VarBuilder

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                     rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                     num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                     rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                     rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    # sliding-window layers (512) five to one with global ones: what the ring KV cache is for
    "gemma3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                      num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                      max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                      sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
                      rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
}


class RandomVarBuilder(VarBuilder):
    """Hands out random tensors of whatever shape a layer asks for (benchmarks only).

    Matrices ~ N(0, 0.02²); 1-D tensors named like norms are ones, other 1-D (biases) small. The
    lm_head is reported missing so tied models tie it, as real tied checkpoints do.
    """

    def __init__(self, dtype, device, seed: int = 0, prefix: str = "", tie: bool = True, _gen=None):
        super().__init__(DictSource({}, "random weights"), dtype, device, prefix)
        self._gen = _gen or torch.Generator(device=device).manual_seed(seed)
        self._tie = tie

    def _derive(self, prefix=None, renames=None, dtype=None, device=None):
        return RandomVarBuilder(dtype or self.dtype, device or self.device, prefix=self.prefix if prefix is None else prefix,
                                tie=self._tie, _gen=self._gen)

    def contains(self, name: str) -> bool:
        return not (self._tie and self._join(name) == "lm_head.weight")

    contains_tensor = contains

    def get(self, shape, name, dtype=None, *, quantized=False):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = dtype or self.dtype or torch.float32
        if len(shape) == 1 and "norm" in self._join(name):
            return torch.ones(shape, dtype=dtype, device=self.device)
        t = torch.randn(shape, generator=self._gen, device=self.device, dtype=torch.float32) * 0.02
        return t.to(dtype)

    def get_optional(self, shape, name, dtype=None, *, quantized=False):
        return self.get(shape, name, dtype) if self.contains(name) else None

    def unused(self) -> list[str]:
        return []


def random_model(preset: str | dict, dtype=torch.bfloat16, device="cpu", prepack: bool | None = None, **model_kw):
    """(config, model) with random weights for a preset name or a config dict, built as `ember.load`
    builds a checkpoint (on CPU: the transforms ember.load plans, e.g. the native bf16 GEMV, with
    oneDNN-prepacked prefill copies when prepack=True and none when prepack=False)."""
    from .. import registry, transforms
    from ..loading import build

    raw = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    entry = registry.lookup(raw)
    cfg = entry.parse_config(raw)
    vb = RandomVarBuilder(dtype, torch.device(device), tie=bool(raw.get("tie_word_embeddings", False)))
    model = build(entry, cfg, vb, **model_kw)
    transforms.apply(model, transforms.plan(entry.task, dtype, torch.device(device), prepack=prepack))
    return cfg, model
