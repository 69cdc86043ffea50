"""config.json's `model_type` / `architectures` → the native model class.

Entries name modules by string so `import ember` loads no model code. A family that is another
with flags (Mistral, Qwen2, Qwen3, Phi-3 and Granite are Llama with flags) is a remap: the same
module with `defaults` filled into the config dict before it is parsed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError, UnsupportedModelError


@dataclass(frozen=True)
class Entry:
    model_type: str
    module: str  # e.g. "ember.models.llama"
    task: str = "causal-lm"  # or "encoder"
    model_class: str = "ForCausalLM"
    config_class: str = "Config"
    defaults: dict = field(default_factory=dict)  # filled in when config.json lacks the key
    prepare: Callable[[dict], dict] | None = None  # last fix-ups of the raw dict
    gguf: tuple[str, ...] = ()  # GGUF architectures read as this type (their mapping: the module's GGUF dict)
    # image+text models built around any registered decoder (LLaVA): the config.json key holding the
    # decoder's config; parse_config hands the config class (parsed config, ForCausalLM class) as `decoder`
    decoder: str | None = None

    def load(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config_class), getattr(mod, self.model_class)

    def parse_config(self, raw: dict):
        cfg_cls, _ = self.load()
        d = {**self.defaults, **raw}
        if self.prepare is not None:
            d = self.prepare(d)
        if self.decoder is None:
            return cfg_cls.from_dict(d)
        sub = d.get(self.decoder)
        sub = sub if isinstance(sub, dict) else {"model_type": "llama"}  # transformers' default decoder
        try:
            entry = lookup(sub)
            if entry.task != "causal-lm":
                raise ConfigError(f"{entry.model_type} is not a text decoder")
            decoder = (entry.parse_config(sub), entry.load()[1])
        except (ConfigError, UnsupportedModelError) as e:
            raise type(e)(f"{self.decoder}: {e}") from None
        return cfg_cls.from_dict(d, decoder=decoder)


    def gguf_mapping(self, arch: str):
        """The family's `GGUFMapping` for GGUF architecture `arch` (declared beside its model)."""
        return importlib.import_module(self.module).GGUF[arch]


_ENTRIES: dict[str, Entry] = {}
# architectures[0] → model_type, for configs that lack a model_type
_ARCHITECTURES: dict[str, str] = {}
# GGUF general.architecture → model_type
_GGUF: dict[str, str] = {}


def register(model_type: str, module: str, *, architectures: tuple[str, ...] = (), gguf: str | None = None,
             **kw: Any) -> None:
    """Register `model_type` as implemented by `module`; `gguf` names the llama.cpp architecture
    whose files load as this type (the module's `GGUF[gguf]` maps them)."""
    _ENTRIES[model_type] = Entry(model_type, module, gguf=(gguf,) if gguf else (), **kw)
    for a in architectures:
        _ARCHITECTURES[a] = model_type
    if gguf:
        _GGUF[gguf] = model_type


def gguf_architectures() -> list[str]:
    return sorted(_GGUF)


def lookup_gguf(arch: str, where: str = "") -> Entry:
    """The entry that reads GGUF architecture `arch`, or UnsupportedModelError listing those ember reads."""
    if arch not in _GGUF:
        raise UnsupportedModelError(f"{where}{': ' if where else ''}GGUF architecture {arch!r:.80} is not supported; "
                                    f"ember reads GGUF files of: {', '.join(gguf_architectures())}")
    return _ENTRIES[_GGUF[arch]]


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


def _module_prepare(module: str) -> Callable[[dict], dict]:
    """The `prepare(d)` a family's module declares (imported when a config is parsed, not before)."""
    return lambda d: importlib.import_module(module).prepare(d)


def _qwen_sliding(d: dict) -> dict:
    # Qwen2/Qwen3 carry a sliding_window value that only applies when use_sliding_window is true.
    if not d.get("use_sliding_window", False):
        d = {**d, "sliding_window": None}
    return d


def _seed_oss_biases(d: dict) -> dict:
    # Seed-OSS: attention_bias is the q/k/v bias, attention_out_bias o_proj's
    qkv, out = d.get("attention_bias", True), d.get("attention_out_bias", False)
    if out and not qkv:
        raise ConfigError("seed_oss: attention_out_bias without attention_bias (o_proj bias alone) is not supported")
    return {**d, "qkv_bias": qkv, "attention_bias": out}


def _phi3_rope(d: dict) -> dict:
    # transformers' Phi3Config reads "su" and "yarn" scaling as longrope, and knows no other scaling.
    out = dict(d)
    for key in ("rope_parameters", "rope_scaling"):
        p = out.get(key)
        if isinstance(p, dict):
            t = p.get("rope_type", p.get("type"))
            if t in ("su", "yarn"):
                p = {**p, "rope_type": "longrope"}
                p.pop("type", None)
                out[key] = p
            elif t not in (None, "default", "longrope"):
                raise ConfigError(f"phi3 supports rope types default and longrope (su, yarn), got {t!r}")
    return out


register("llama", "ember.models.llama", gguf="llama", architectures=("LlamaForCausalLM",))
register("mistral", "ember.models.llama", architectures=("MistralForCausalLM",),
         defaults={"sliding_window": 4096})
register("qwen2", "ember.models.llama", gguf="qwen2", architectures=("Qwen2ForCausalLM",),
         defaults={"qkv_bias": True, "sliding_window": 4096, "max_window_layers": 28}, prepare=_qwen_sliding)
register("qwen3", "ember.models.llama", gguf="qwen3", architectures=("Qwen3ForCausalLM",),
         defaults={"qk_norm": True, "sliding_window": 4096, "max_window_layers": 28}, prepare=_qwen_sliding)
register("phi3", "ember.models.llama", gguf="phi3", architectures=("Phi3ForCausalLM",), prepare=_phi3_rope,
         defaults={"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 4096,
                   "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1,
                   "eos_token_id": 32000, "pad_token_id": 32000})
register("granite", "ember.models.llama", architectures=("GraniteForCausalLM",),
         defaults={"attention_multiplier": 1.0})
register("smollm3", "ember.models.smollm3", gguf="smollm3", architectures=("SmolLM3ForCausalLM",))
register("glm4", "ember.models.glm4", gguf="glm4", architectures=("Glm4ForCausalLM",), prepare=_module_prepare("ember.models.glm4"))
register("ernie4_5", "ember.models.ernie4_5", gguf="ernie4_5", architectures=("Ernie4_5ForCausalLM",))
register("hunyuan_v1_dense", "ember.models.hunyuan", gguf="hunyuan-dense", architectures=("HunYuanDenseV1ForCausalLM",))
register("exaone4", "ember.models.exaone4", gguf="exaone4", architectures=("Exaone4ForCausalLM",))
register("seed_oss", "ember.models.llama", gguf="seed_oss", architectures=("SeedOssForCausalLM",), prepare=_seed_oss_biases,
         defaults={"vocab_size": 155136, "hidden_size": 4096, "intermediate_size": 27648, "num_hidden_layers": 64,
                   "num_attention_heads": 80, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 524288, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                   "attention_bias": True})
register("cohere", "ember.models.cohere", gguf="command-r", architectures=("CohereForCausalLM",))
register("cohere2", "ember.models.cohere", gguf="cohere2", architectures=("Cohere2ForCausalLM",),
         defaults={"sliding_window": 4096}, prepare=lambda d: {**d, "cohere2": True, "use_qk_norm": False})
register("gemma", "ember.models.gemma", architectures=("GemmaForCausalLM",))
register("gemma2", "ember.models.gemma2", gguf="gemma2", architectures=("Gemma2ForCausalLM",))
register("gemma3_text", "ember.models.gemma3", gguf="gemma3", architectures=("Gemma3ForCausalLM",))
# Gemma 3 multimodal checkpoints: config.json nests the decoder's config under text_config.
register("gemma3", "ember.models.gemma3", architectures=("Gemma3ForConditionalGeneration",),
         config_class="MultimodalConfig", model_class="ForConditionalGeneration")
# Image+text chat (models/multimodal.py): a vision tower and projector before a registered decoder
register("llava", "ember.models.llava", architectures=("LlavaForConditionalGeneration",),
         model_class="ForConditionalGeneration", decoder="text_config")
# Qwen2.5-VL: a Qwen2 decoder with M-RoPE (prepare makes text_config a qwen2 one, also from flat configs)
register("qwen2_5_vl", "ember.models.qwen2_5_vl", gguf="qwen2vl", architectures=("Qwen2_5_VLForConditionalGeneration",),
         model_class="ForConditionalGeneration", decoder="text_config",
         prepare=_module_prepare("ember.models.qwen2_5_vl"))
# Qwen3-VL: its own vision tower and M-RoPE decoder (models/qwen3_vl.py)
register("qwen3_vl", "ember.models.qwen3_vl", architectures=("Qwen3VLForConditionalGeneration",),
         model_class="ForConditionalGeneration")
register("qwen3_vl_moe", "ember.models.qwen3_vl", architectures=("Qwen3VLMoeForConditionalGeneration",),
         config_class="MoeConfig", model_class="ForConditionalGeneration")
# Gemma 4: the text model, or the multimodal checkpoints' language model (vision/audio towers not loaded)
register("gemma4_text", "ember.models.gemma4", architectures=("Gemma4ForCausalLM",),
         prepare=_module_prepare("ember.models.gemma4"))
register("gemma4", "ember.models.gemma4", architectures=("Gemma4ForConditionalGeneration",),
         prepare=_module_prepare("ember.models.gemma4"))
register("phi", "ember.models.phi", architectures=("PhiForCausalLM",))
register("olmo2", "ember.models.olmo2", gguf="olmo2", architectures=("Olmo2ForCausalLM",))
register("olmo3", "ember.models.olmo3", architectures=("Olmo3ForCausalLM",))


def _qwen_moe_sliding(d: dict) -> dict:
    # Qwen3-MoE slides every layer when use_sliding_window is true (max_window_layers is ignored).
    return {**_qwen_sliding(d), "max_window_layers": None}


def _qwen2_moe_sliding(d: dict) -> dict:
    # Qwen2-MoE slides the even layers below max_window_layers when use_sliding_window is true
    # (transformers' Qwen2MoeConfig.layer_types); config.json may carry layer_types itself.
    if not d.get("use_sliding_window", False):
        return {**d, "sliding_window": None}
    if d.get("layer_types") is None and isinstance(d.get("num_hidden_layers"), int):
        n, top = d["num_hidden_layers"], d.get("max_window_layers", 28)
        d = {**d, "layer_types": ["sliding_attention" if i % 2 == 0 and i < top else "full_attention"
                                  for i in range(min(n, 1 << 16))]}
    return {**d, "max_window_layers": None}


# Llama 4: the text model, or the image-text checkpoints of the Hub (text_config; vision tower not loaded)
register("llama4_text", "ember.models.llama4", gguf="llama4", architectures=("Llama4ForCausalLM",),
         prepare=_module_prepare("ember.models.llama4"))
register("llama4", "ember.models.llama4", architectures=("Llama4ForConditionalGeneration",),
         prepare=_module_prepare("ember.models.llama4"))
# Ministral 3, and Mistral 3 image-text checkpoints' language model (text_config; vision tower not loaded)
register("ministral3", "ember.models.mistral3", architectures=("Ministral3ForCausalLM",),
         prepare=_module_prepare("ember.models.mistral3"))
register("mistral3", "ember.models.mistral3", architectures=("Mistral3ForConditionalGeneration",),
         prepare=_module_prepare("ember.models.mistral3"))
register("mixtral", "ember.models.mixtral", architectures=("MixtralForCausalLM",), defaults={"rope_theta": 1e6})
register("qwen2_moe", "ember.models.mixtral", gguf="qwen2moe", architectures=("Qwen2MoeForCausalLM",),
         defaults={"qkv_bias": True, "norm_topk_prob": False, "rms_norm_eps": 1e-6, "num_experts": 60,
                   "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                   "intermediate_size": 5632, "sliding_window": 4096, "max_window_layers": 28, "rope_theta": 10000.0},
         prepare=_qwen2_moe_sliding)
register("qwen3_moe", "ember.models.mixtral", gguf="qwen3moe", architectures=("Qwen3MoeForCausalLM",),
         defaults={"qk_norm": True, "norm_topk_prob": False, "rms_norm_eps": 1e-6, "num_experts": 128,
                   "num_experts_per_tok": 8, "moe_intermediate_size": 768, "sliding_window": 4096},
         prepare=_qwen_moe_sliding)
# transformers routes V3 by sigmoid and V2 by softmax whatever config.json's scoring_func says (and V2 never
# renormalises the top-k weights)
register("deepseek_v3", "ember.models.deepseek", architectures=("DeepseekV3ForCausalLM",),
         prepare=lambda d: {**d, "scoring_func": "sigmoid"})
register("deepseek_v2", "ember.models.deepseek", gguf="deepseek2", architectures=("DeepseekV2ForCausalLM",),
         prepare=lambda d: {**d, "scoring_func": "softmax", "norm_topk_prob": False},
         defaults={"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
                   "first_k_dense_replace": 0, "n_group": None, "topk_group": None, "n_routed_experts": 64,
                   "n_shared_experts": 2, "routed_scaling_factor": 1.0, "topk_method": "greedy",
                   "moe_intermediate_size": 1407, "num_experts_per_tok": None})
register("gpt_oss", "ember.models.gpt_oss", gguf="gpt-oss", architectures=("GptOssForCausalLM",),
         prepare=_module_prepare("ember.models.gpt_oss"))
register("phimoe", "ember.models.phimoe", gguf="phimoe", architectures=("PhimoeForCausalLM",),
         prepare=_module_prepare("ember.models.phimoe"), defaults={"rope_theta": 1e6})
register("olmoe", "ember.models.olmoe", gguf="olmoe", architectures=("OlmoeForCausalLM",))
register("granitemoe", "ember.models.granitemoe", gguf="granitemoe", architectures=("GraniteMoeForCausalLM",))
register("granitemoeshared", "ember.models.granitemoe", architectures=("GraniteMoeSharedForCausalLM",))
register("glm4_moe", "ember.models.glm4_moe", gguf="glm4moe", architectures=("Glm4MoeForCausalLM",),
         prepare=_module_prepare("ember.models.glm4_moe"))
register("minimax_m2", "ember.models.minimax_m2", gguf="minimax-m2", architectures=("MiniMaxM2ForCausalLM",),
         prepare=_module_prepare("ember.models.minimax_m2"))
register("ernie4_5_moe", "ember.models.ernie4_5_moe", gguf="ernie4_5-moe", architectures=("Ernie4_5_MoeForCausalLM",))
register("gpt2", "ember.models.gpt2", gguf="gpt2", architectures=("GPT2LMHeadModel",))
register("gptj", "ember.models.gptj", architectures=("GPTJForCausalLM",))
register("opt", "ember.models.opt", architectures=("OPTForCausalLM",))
register("gpt_bigcode", "ember.models.gpt_bigcode", gguf="starcoder", architectures=("GPTBigCodeForCausalLM",))
register("bloom", "ember.models.bloom", gguf="bloom", architectures=("BloomForCausalLM",))
register("falcon", "ember.models.falcon", gguf="falcon", architectures=("FalconForCausalLM",))
register("gpt_neox", "ember.models.gpt_neox", architectures=("GPTNeoXForCausalLM",))
# State-space models: recurrent state beside (or instead of) the KV cache (nn/state_cache.py)
register("mamba", "ember.models.mamba", architectures=("MambaForCausalLM",))
register("mamba2", "ember.models.mamba2", gguf="mamba2", architectures=("Mamba2ForCausalLM",),
         prepare=_module_prepare("ember.models.mamba2"))
register("granitemoehybrid", "ember.models.granitemoehybrid", gguf="granitehybrid",
         architectures=("GraniteMoeHybridForCausalLM",),
         prepare=_module_prepare("ember.models.granitemoehybrid"))
register("lfm2", "ember.models.lfm2", gguf="lfm2", architectures=("Lfm2ForCausalLM",), prepare=_module_prepare("ember.models.lfm2"))
register("qwen3_next", "ember.models.qwen3_next", architectures=("Qwen3NextForCausalLM",))
# Qwen3.5's text decoders (the multimodal checkpoints' vision tower is not read yet): dense MLPs, or the MoE
register("qwen3_5_text", "ember.models.qwen3_next", architectures=("Qwen3_5ForCausalLM",),
         prepare=lambda d: {**d, "num_experts": 0})
register("qwen3_5_moe_text", "ember.models.qwen3_next", architectures=("Qwen3_5MoeForCausalLM",))
register("falcon_h1", "ember.models.falcon_h1", gguf="falcon-h1", architectures=("FalconH1ForCausalLM",),
         prepare=_module_prepare("ember.models.mamba2"))  # time_step_limit as Mamba-2 writes it
register("nemotron_h", "ember.models.nemotron_h", gguf="nemotron_h", architectures=("NemotronHForCausalLM",),
         prepare=_module_prepare("ember.models.nemotron_h"))
# config.json flags spelled differently, mapped onto the fields the shared attention reads
register("starcoder2", "ember.models.starcoder2", architectures=("Starcoder2ForCausalLM",),
         prepare=lambda d: {**d, "attention_bias": d.get("use_bias", True)})
register("stablelm", "ember.models.stablelm", architectures=("StableLmForCausalLM",),
         prepare=lambda d: {**d, "qkv_bias": d.get("use_qkv_bias", False)})

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

# Image-text models (ember.load returns an ImageTextEmbedder: ember/vision_embeddings.py)
_IMAGE_TEXT = dict(task="image-text", model_class="Model")
register("clip", "ember.models.clip", architectures=("CLIPModel",), **_IMAGE_TEXT)
register("siglip", "ember.models.siglip", architectures=("SiglipModel",), **_IMAGE_TEXT)
register("siglip2", "ember.models.siglip2", architectures=("Siglip2Model",), **_IMAGE_TEXT)

# Encoder-decoders (ember.load returns a Seq2SeqLM: ember/seq2seq.py; with sentence-transformers
# modules.json, an Embedder over the encoder)
_SEQ2SEQ = dict(task="seq2seq", model_class="ForConditionalGeneration")
register("t5", "ember.models.t5", architectures=("T5ForConditionalGeneration", "T5EncoderModel", "T5Model"),
         **_SEQ2SEQ)
# mT5 never scales the decoder's output (transformers' MT5 has no such step)
register("mt5", "ember.models.t5", architectures=("MT5ForConditionalGeneration", "MT5EncoderModel", "MT5Model"),
         defaults={"vocab_size": 250112, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
                   "feed_forward_proj": "gated-gelu"},
         prepare=lambda d: {**d, "scale_decoder_outputs": False}, **_SEQ2SEQ)
# Speech to text (ember.load returns a Transcriber: ember/speech.py)
register("whisper", "ember.models.whisper", architectures=("WhisperForConditionalGeneration",),
         task="speech-seq2seq", model_class="ForConditionalGeneration")
