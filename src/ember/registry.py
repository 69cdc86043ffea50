"""config.json's `model_type` / `architectures` → the native model class.

Entries name modules by string so `import ember` loads no model code. A family that is another
with flags (Mistral, Qwen2 and Qwen3 are Llama with flags) is a remap: the same module with
`defaults` filled into the config dict before it is parsed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Entry:
    model_type: str
    module: str  # e.g. "ember.models.llama"
    task: str = "causal-lm"  # or "encoder"
    model_class: str = "ForCausalLM"
    config_class: str = "Config"
    defaults: dict = field(default_factory=dict)  # filled in when config.json lacks the key
    prepare: Callable[[dict], dict] | None = None  # last fix-ups of the raw dict

    def load(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config_class), getattr(mod, self.model_class)

    def parse_config(self, raw: dict):
        cfg_cls, _ = self.load()
        d = {**self.defaults, **raw}
        if self.prepare is not None:
            d = self.prepare(d)
        return cfg_cls.from_dict(d)


_ENTRIES: dict[str, Entry] = {}
# architectures[0] → model_type, for configs that lack a model_type
_ARCHITECTURES: dict[str, str] = {}


def register(model_type: str, module: str, *, architectures: tuple[str, ...] = (), **kw: Any) -> None:
    _ENTRIES[model_type] = Entry(model_type, module, **kw)
    for a in architectures:
        _ARCHITECTURES[a] = model_type


def supported(task: str | None = None) -> list[str]:
    """Registered model types (for a task, if given), sorted."""
    return sorted(k for k, e in _ENTRIES.items() if task is None or e.task == task)


def lookup(config: dict) -> Entry:
    """The entry for a config.json dict, or UnsupportedModelError listing what is supported."""
    mt = config.get("model_type") if isinstance(config, dict) else None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(mt, str) and mt in _ENTRIES:
        return _ENTRIES[mt]
    if isinstance(archs, list):
        for a in archs:
            if isinstance(a, str) and a in _ARCHITECTURES:
                return _ENTRIES[_ARCHITECTURES[a]]
    what = f"model_type {mt!r}" if mt else f"architectures {archs!r}" if archs else "a config with no model_type"
    raise UnsupportedModelError(
        f"ember has no native implementation for {what}. Supported model types: {', '.join(supported())}"
    )


def _qwen_sliding(d: dict) -> dict:
    # Qwen2/Qwen3 carry a sliding_window value that only applies when use_sliding_window is true.
    if not d.get("use_sliding_window", False):
        d = {**d, "sliding_window": None}
    return d


register("llama", "ember.models.llama", architectures=("LlamaForCausalLM",))
register("mistral", "ember.models.llama", architectures=("MistralForCausalLM",),
         defaults={"sliding_window": 4096})
register("qwen2", "ember.models.llama", architectures=("Qwen2ForCausalLM",),
         defaults={"qkv_bias": True, "sliding_window": 4096, "max_window_layers": 28}, prepare=_qwen_sliding)
register("qwen3", "ember.models.llama", architectures=("Qwen3ForCausalLM",),
         defaults={"qk_norm": True, "sliding_window": 4096, "max_window_layers": 28}, prepare=_qwen_sliding)

# Encoders (ember.load returns an Embedder). A checkpoint of any task model (ForMaskedLM, ...) loads
# as its encoder; the task head is left unused.
_ENC = dict(task="encoder", model_class="Model")


def _archs(name: str, *tasks: str) -> tuple[str, ...]:
    return (f"{name}Model",) + tuple(f"{name}For{t}" for t in tasks)


_TASKS = ("MaskedLM", "SequenceClassification", "TokenClassification", "QuestionAnswering", "MultipleChoice")
register("bert", "ember.models.bert", architectures=_archs("Bert", "PreTraining", *_TASKS), **_ENC)
register("roberta", "ember.models.bert", architectures=_archs("Roberta", *_TASKS), **_ENC,
         defaults={"pad_token_id": 1, "padding_positions": True, "base_model_prefix": "roberta"})
register("xlm-roberta", "ember.models.bert", architectures=_archs("XLMRoberta", *_TASKS), **_ENC,
         defaults={"pad_token_id": 1, "padding_positions": True, "base_model_prefix": "roberta"})
register("camembert", "ember.models.bert", architectures=_archs("Camembert", *_TASKS), **_ENC,
         defaults={"pad_token_id": 1, "padding_positions": True, "base_model_prefix": "roberta"})
register("distilbert", "ember.models.distilbert", architectures=_archs("DistilBert", *_TASKS), **_ENC)
register("mpnet", "ember.models.mpnet", architectures=_archs("MPNet", *_TASKS), **_ENC)
register("modernbert", "ember.models.modernbert", architectures=_archs("ModernBert", *_TASKS), **_ENC)
