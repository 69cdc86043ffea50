"""Real GGUF files against transformers loading the same file (dequantised, float32):
SmolLM2-135M-Instruct Q4_1 (llama), Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, untied head),
Gemma 3 270M Q4_K_M (gemma3). Each reference model is loaded once per module."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world", " leading space", "  two leading spaces", "trailing space ", "tabs\tand\nnewlines\n\n\nend",
    "Ünïcödé façade — naïve café", "日本語のテキストと中文混合", "emoji 😀👍🏽 family 👨‍👩‍👧",
    "digits 1234567890 3.14159 1,000,000", "code: def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<bos>text with bos<eos>",
    "<start_of_turn>user\nHi<end_of_turn>", "   ", "", "I'm don't we'll THEY'RE", "Ελληνικά и русский текст",
    "\u00a0non-breaking\u2009thin", "<|endoftext|><|endoftext|>", "<think>reasoning</think>", "mixed\r\nwindows\rlines",
    "zero\u200bwidth", "🤗🤗🤗", "The quick brown fox jumps over the lazy dog. " * 3,
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


class Ref:
    """The transformers side (model and tokenizer) and the ember side for one GGUF file."""

    def __init__(self, path: Path, model: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        self.path = path
        self.tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.hf = None
        if model:
            self.hf = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32).eval()
        self.llm = ember.load(path, dtype=torch.float32, device="cpu", keep_quantized=False) if model else None


def _native(model_type: str) -> bool:
    try:
        ember.registry.lookup({"model_type": model_type}).load()
        return True
    except (ember.UnsupportedModelError, ImportError):
        return False


@pytest.fixture(scope="module")
def smollm2():
    import realmodels

    return Ref(realmodels.smollm2_gguf())


@pytest.fixture(scope="module")
def qwen():
    import realmodels

    return Ref(realmodels.qwen25_coder_gguf())


@pytest.fixture(scope="module")
def gemma3():
    import realmodels

    return Ref(realmodels.gemma3_gguf(), model=_native("gemma3_text"))


def _check_logits_and_greedy(ref: Ref, prompt: str):
    from parity import ember_greedy, hf_greedy

    ids = ref.tok.encode(prompt)
    assert ref.llm.encode(prompt) == ids
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, ref.llm.config.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        for batch in (torch.tensor([ids]), rand):
            want, got = ref.hf(batch).logits, ref.llm.model(batch)
            d = (want - got).abs().max().item()
            assert d <= 1e-3, f"logits differ by {d}"
    prompts = [ids, rand[0, :7].tolist()]
    want = [hf_greedy(ref.hf, p, 32) for p in prompts]
    assert ember_greedy(ref.llm, prompts, 32) == want


def _check_tokenizer(ref: Ref, tok):
    for text in TEXTS:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == ref.tok.encode(text, add_special_tokens=special), (text, special)
        ids = ref.tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.tok.decode(ids, skip_special_tokens=skip), text
    if ref.tok.chat_template:
        for agp in (True, False):
            want = ref.tok.apply_chat_template(MESSAGES, add_generation_prompt=agp, tokenize=False)
            assert tok.apply_chat_template(MESSAGES, add_generation_prompt=agp) == want


# ---- SmolLM2 (llama, Q4_1 + Q8_0 tied embeddings) ------------------------------------------------
def test_smollm2_logits_and_greedy(smollm2):
    _check_logits_and_greedy(smollm2, "The capital of France is")


def test_smollm2_tokenizer_and_chat_template(smollm2):
    _check_tokenizer(smollm2, smollm2.llm.tokenizer)


def _kept_quantised_matches_dequantised(ref, text, monkeypatch):
    """Blocks on the pure-PyTorch layer: the dequantised model's numbers. On ember's native kernels
    (int8 activations, as llama.cpp): the same top token at nearly every position."""
    from ember import transforms

    native = ember.load(ref.path, dtype=torch.float32, keep_quantized=True)
    with monkeypatch.context() as m:
        m.setattr(transforms, "native_kernels", lambda device: False)
        plain = ember.load(ref.path, dtype=torch.float32, keep_quantized=True)
    ids = torch.tensor([ref.tok.encode(text)])
    with torch.no_grad():
        want, got, fast = ref.llm.model(ids), plain.model(ids), native.model(ids)
    assert (got - want).abs().max().item() <= 1e-3
    if "native-quant" in native._loaded.transforms:
        cos = torch.nn.functional.cosine_similarity(fast[0], want[0], dim=-1)
        assert cos.min().item() > 0.99, cos
        assert (fast.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8
    return plain


def test_smollm2_kept_quantised_matches_dequantized(smollm2, monkeypatch):
    _kept_quantised_matches_dequantised(smollm2, "Packed weights are dequantised inside the layer.", monkeypatch)


def test_default_model_chats_and_stops(smollm2):
    from ember.fixtures import default_model

    path = default_model()
    llm = ember.load(path)
    assert llm._loaded.entry.model_type == "llama"
    # (the capital of France is a near-tie for this 4-bit 135M model: with activations rounded to int8
    # it answers "L'Étoile, la Marseillaise, ...", exactly as llama.cpp does on this file)
    reqs = [llm.request(llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2 + 2?"}]), 64)]
    events = list(llm.events(reqs))
    text = "".join(e.text for e in events)
    assert "4" in text, text
    assert events[-1].finish_reason == "stop", events[-1].finish_reason  # stopped on <|im_end|>, not the budget
    assert llm.tokenizer.token_to_id("<|im_end|>") in llm.eos_token_ids


# ---- Qwen2.5-Coder (qwen2, q/k/v bias, untied head, Q5_0/Q8_0/Q4_K/Q6_K) ---------------------------
def test_qwen_logits_and_greedy(qwen):
    assert not qwen.llm.config.tie_word_embeddings
    _check_logits_and_greedy(qwen, "def fibonacci(n):")


def test_qwen_tokenizer_and_chat_template(qwen):
    _check_tokenizer(qwen, qwen.llm.tokenizer)


def test_qwen_kept_quantised_matches_dequantized(qwen, monkeypatch):
    plain = _kept_quantised_matches_dequantised(qwen, "import numpy as np\nx = np.", monkeypatch)
    from ember.nn.quantized import quantized_nbytes

    assert quantized_nbytes(plain.model) > 0.8 * (qwen.path.stat().st_size - 10_000_000)


RSS_SCRIPT = """
import json, resource, sys
import torch
import ember
from ember.io.ggml import type_name
from ember.loading import int4_fast as int4_fast_path
from ember.transforms import native_kernels


def peak():
    # The process's peak resident memory so far, in bytes: VmHWM belongs to this program's own memory
    # map. (Linux's ru_maxrss survives execve: a child forked from a large pytest process would report
    # the parent's peak.)
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except OSError:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


base = peak()  # Python + torch + ember imported, no model yet
kw = json.loads(sys.argv[2])
if kw.pop("float32", False):
    kw["dtype"] = torch.float32
llm = ember.load(sys.argv[1], device="cpu", **kw)
load = peak()
llm.generate("def f(x):", max_tokens=8, ignore_eos=True)
FORMS = {"QuantLinear": "blocks", "NativeQuantLinear": "native", "Int4Linear": "int4"}
forms = {}
for m in llm.model.modules():
    name = type(m).__name__
    if name in FORMS:
        forms.setdefault(type_name(m.ggml_type), set()).add(FORMS[name])
    elif name == "QuantEmbedding":
        forms.setdefault("embedding", set()).add(type_name(m.ggml_type))
    elif name in ("Linear", "PrepackedLinear") and len(list(m.children())) == 0:
        forms.setdefault("dense", set()).add(name)
print(json.dumps({"base": base, "load": load, "run": peak(), "int4_fast_path": int4_fast_path(torch.device("cpu")),
                  "native": native_kernels(torch.device("cpu")), "transforms": list(llm._loaded.transforms),
                  "forms": {k: sorted(v) for k, v in forms.items()}}))
"""


def _qwen_rss(**kw) -> tuple[dict, int]:
    import realmodels

    path = realmodels.qwen25_coder_gguf()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ember.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), json.dumps(kw)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), path.stat().st_size


def test_qwen_packed_float32_peak_rss_under_1_6x_file_size():
    """keep_quantized=True in float32, the memory-lean mode: every quantised weight stays as the file's blocks.
    Loading: the whole process (Python and torch included) peaks under 1.6x the 491 MB file (the
    issue's bar). After generating, the weights' mapped file pages count as resident too; what the
    model adds over the bare interpreter + torch (whose own size varies with the installed package
    versions: 231 MB on the dev venv, 292 MB on a fresh CI venv) also stays under 1.6x. Measured:
    0.97-1.18x after load; 1.04x above the baseline after generating (1.43-1.64x whole process)."""
    r, size = _qwen_rss(keep_quantized=True, float32=True)
    assert set(r["forms"]) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "embedding"}
    form = ["native"] if r["native"] else ["blocks"]
    assert all(v == form for k, v in r["forms"].items() if k != "embedding"), r["forms"]
    assert r["load"] < 1.6 * size, r
    assert r["run"] - r["base"] < 1.6 * size, r


def test_qwen_default_keeps_weights_quantised_and_bounds_memory():
    """The default (keep_quantized=None). Where ember's native kernels run (any x86 CPU with a
    compiler): every linear computes on its GGUF blocks (Q4_K, Q5_0, Q6_K, Q8_0), nothing is
    dequantised or repacked, the embedding stays as its Q5_0 blocks: the model adds at most 1.3x the
    file beyond the runtime (the CPU-speed issue's bar), loading and after generating.
    Without them, on a CPU with native bf16: Q4_K, Q5_0 and Q8_0 become torch int4-kernel planes, Q6_K
    is dequantised to bf16 once (1.44x the file measured, bounded at 1.8x: a whole-tensor copy while
    repacking the 151936 x 896 Q8_0 head once pushed it past 2x)."""
    r, size = _qwen_rss()
    if r["native"]:
        assert r["forms"] == {"Q4_K": ["native"], "Q5_0": ["native"], "Q8_0": ["native"], "Q6_K": ["native"],
                              "embedding": ["Q5_0"]}, r["forms"]
        assert r["transforms"] == ["native-quant", "native-ops"], r["transforms"]
        assert r["load"] - r["base"] < 1.3 * size, r
        assert r["run"] - r["base"] < 1.3 * size, r
        return
    if r["int4_fast_path"]:
        assert r["forms"]["Q4_K"] == ["int4"] and r["forms"]["embedding"] == ["Q5_0"], r["forms"]
    assert r["load"] - r["base"] < 1.8 * size, r
    assert r["run"] - r["base"] < 1.8 * size, r


# ---- Gemma 3 270M (gemma3: w+1 norms, sliding window, Q8_0 tied embeddings) ------------------------
def test_gemma3_tokenizer(gemma3):
    from ember.io.gguf import GGUFFile
    from ember.gguf_tokenizer import tokenizer_from_gguf

    tok = gemma3.llm.tokenizer if gemma3.llm is not None else tokenizer_from_gguf(GGUFFile(gemma3.path).metadata)
    _check_tokenizer(gemma3, tok)
    assert tok.encode("Hi")[0] == tok.bos_token_id  # SentencePiece vocabularies add BOS


def test_gemma3_config_and_names():
    import realmodels
    from ember.io.gguf import GGUFFile
    from ember import registry
    from ember.gguf_source import GGUFSource, architecture
    from ember.loading import gguf_config as config_dict

    def family_for(f):
        arch = architecture(f)
        return arch, registry.lookup_gguf(arch).gguf_mapping(arch)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    f = GGUFFile(realmodels.gemma3_gguf())
    raw = config_dict(f)
    assert raw["model_type"] == "gemma3_text" and raw["head_dim"] == 256 and raw["sliding_window"] == 512
    assert raw["num_hidden_layers"] == 18 and raw["num_key_value_heads"] == 1 and raw["tie_word_embeddings"]
    cfg = Gemma3TextConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "rope_theta")})
    with torch.device("meta"):
        hf = Gemma3ForCausalLM(cfg)
    want = {k for k in hf.state_dict() if k != "lm_head.weight"}
    src = GGUFSource(f, family_for(f)[1], raw, quantized=True, dtype=torch.float32)
    assert set(src.keys()) == want
    for k, v in hf.state_dict().items():
        if k in want:
            assert tuple(src.shape(k)) == tuple(v.shape), k
    norm = src.load("model.layers.0.input_layernorm.weight")  # stored as w + 1
    raw_norm = f.raw("blk.0.attn_norm.weight").reshape(-1).view(torch.float32)
    assert torch.equal(norm, raw_norm - 1)


def test_gemma3_logits_and_greedy(gemma3):
    if gemma3.llm is None:
        pytest.skip("ember.models.gemma3 (model_type gemma3_text) is not on this branch")
    _check_logits_and_greedy(gemma3, "The capital of France is")
    assert gemma3.llm.tokenizer.token_to_id("<end_of_turn>") in gemma3.llm.eos_token_ids


def test_gemma3_past_its_sliding_window(gemma3):
    """A prompt longer than Gemma 3's 512-token window: its sliding layers keep a ring of 512
    columns (kv_cache.py), prefilled in chunks that wrap it, batched with a short prompt; greedy
    continuations equal transformers'."""
    from parity import hf_greedy

    from ember.generation.loop import Generator, Request

    if gemma3.llm is None:
        pytest.skip("ember.models.gemma3 (model_type gemma3_text) is not on this branch")
    text = " ".join(f"Item {i} is {'red' if i % 3 else 'blue'}." for i in range(120)) + " So item 121 is"
    long = gemma3.tok.encode(text)
    assert 600 < len(long) < 1100, len(long)  # 858 with this tokenizer
    short = gemma3.tok.encode("The capital of France is")
    want = [hf_greedy(gemma3.hf, p, 12) for p in (long, short)]
    model = gemma3.llm.model
    gen = Generator(model, None, max_batch=2, max_len=len(long) + 16, prefill_chunk=256)
    assert 512 in gen.cache.windows and gen.cache.k[0].shape[2] == 513
    reqs = [Request(long, 12, ignore_eos=True), Request(short, 12, ignore_eos=True)]
    got = {r.id: [] for r in reqs}
    for ev in gen.run(reqs):
        got[ev.request.id].append(ev.token_id)
    assert [got[r.id] for r in reqs] == want


def test_gemma3_mapping_reproduces_transformers_logits(gemma3):
    """Without the native model: transformers' Gemma3 built from ember's config dict and ember's
    tensors gives the logits transformers gets from the GGUF itself."""
    from ember.io.gguf import GGUFFile
    from ember import registry
    from ember.gguf_source import GGUFSource, architecture
    from ember.loading import gguf_config as config_dict

    def family_for(f):
        arch = architecture(f)
        return arch, registry.lookup_gguf(arch).gguf_mapping(arch)
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GgufConfig

    f = GGUFFile(gemma3.path)
    raw = config_dict(f)
    src = GGUFSource(f, family_for(f)[1], raw, quantized=False, dtype=torch.float32)
    cfg = Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    mine = Gemma3ForCausalLM(cfg).eval()
    sd = {k: src.load(k).float() for k in src.keys()}
    missing, unexpected = mine.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    mine.tie_weights()
    ref = gemma3.hf or AutoModelForCausalLM.from_pretrained(
        gemma3.path.parent, gguf_file=gemma3.path.name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32).eval()
    ids = torch.tensor([gemma3.tok.encode("The capital of France is")])
    with torch.no_grad():
        d = (mine(ids).logits - ref(ids).logits).abs().max().item()
    assert d <= 1e-4
