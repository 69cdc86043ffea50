"""Tensor parallelism (ember.distributed) on CPU with gloo and 2 ranks: each tiny model split over
two processes gives the logits of the single-process float32 model (within 1e-5 of their scale), the same greedy
tokens, the same sampled tokens on both ranks, and about half the weight bytes per rank; the CLI
starts its own ranks; a rank that dies fails the other with a clear error in bounded time.

The ranks are started once for all the models, and then one of them dies (tests/tpworker.py, with
torchrun's environment)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember
from parity import save, tiny_hf_model

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
BASE = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _configs():
    from transformers import Gemma3TextConfig, LlamaConfig, MixtralConfig, Phi3Config, Qwen2Config

    return {
        # one KV head for two ranks: replicated; vocab 257 splits unevenly; own lm_head
        "llama_kv1_untied": LlamaConfig(**BASE, num_key_value_heads=1, tie_word_embeddings=False),
        # KV heads divided (2 over 2 ranks), tied head, biases on every projection (row-parallel ones added once)
        "llama_kv2_tied": LlamaConfig(**BASE, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                      mlp_bias=True),
        "qwen2_bias": Qwen2Config(**BASE, num_key_value_heads=2, tie_word_embeddings=False),
        "gemma3_sliding": Gemma3TextConfig(**{**BASE, "vocab_size": 256}, num_key_value_heads=2, head_dim=16,
                                           sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                                           query_pre_attn_scalar=16),
        "mixtral_moe": MixtralConfig(**{**BASE, "intermediate_size": 48}, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2),
        "phi3_fused": Phi3Config(**BASE, num_key_value_heads=2, tie_word_embeddings=False),
    }


# a GGUF (and an int8-quantised checkpoint) whose Q8_0 blocks (32 values) split at every cut: o_proj's
# 64 inputs, down_proj's 128
GGUF_CONFIG = dict(vocab_size=265, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)
NAMES = list(_configs()) + ["llama_gguf_q8", "llama_int8"]
LOAD_KW = {"llama_int8": {"quantize": "int8"}}  # quantised after the split: each rank its own slices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _ranks(*args, timeout: float = 300, **extra) -> list[subprocess.CompletedProcess]:
    """tests/tpworker.py *args as the 2 ranks of a fresh group (torchrun's environment variables)."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE / "tpworker.py"), *map(str, args)],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from ggufmake import hf_to_gguf
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("tp")
    out = {name: save(tiny_hf_model(cfg), root / name) for name, cfg in _configs().items()}
    hf = tiny_hf_model(LlamaConfig(**GGUF_CONFIG))
    out["llama_gguf_q8"] = str(hf_to_gguf(hf, root / "tiny-Q8_0.gguf", qtype=8))
    out["llama_int8"] = save(hf, root / "llama_int8")
    return out


@pytest.fixture(scope="module")
def run(folders, tmp_path_factory):
    """One run of 2 ranks over every model, after which rank 1 dies: its output folder."""
    out = tmp_path_factory.mktemp("tp_out")
    spec = out / "spec.json"
    spec.write_text(json.dumps({k: (str(v), LOAD_KW.get(k, {})) for k, v in folders.items()}))
    runs = _ranks(spec, out, EMBER_TP_TIMEOUT="30")
    for r, done in enumerate(runs):
        assert done.returncode == (0, 3)[r], f"rank {r} failed:\n{done.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def split(run):
    """Each rank's results for every model."""
    return [torch.load(run / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def whole(folders):
    """The single-process float32 models."""
    return {name: ember.load(folder, dtype=torch.float32, **LOAD_KW.get(name, {})) for name, folder in folders.items()}


@pytest.mark.parametrize("name", NAMES)
def test_split_logits_match_the_whole_model(name, split, whole):
    from tpworker import ids

    llm = whole[name]
    with torch.no_grad():
        ref = llm.model(ids(llm.config.vocab_size))
    # float32 sums in another order (the all-reduces): rounding of ~1e-6 of the logits' scale, which
    # the tiny models' large weights put at ~10
    scale = ref.abs().max().item()
    for rank in split:
        assert rank[name]["logits"].shape == ref.shape
        assert (rank[name]["logits"] - ref).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("name", NAMES)
def test_split_greedy_generation_is_identical(name, split, whole):
    from tpworker import tokens

    ref = tokens(whole[name], [3, 5, 7, 11, 13])  # rank 0's prompt, which both ranks ran
    assert len(set(ref)) > 2, "degenerate reference"
    assert split[0][name]["greedy"] == split[1][name]["greedy"] == ref


@pytest.mark.parametrize("name", NAMES)
def test_ranks_sample_the_same_tokens(name, split):
    assert len(split[0][name]["sampled"]) == 12
    assert split[0][name]["sampled"] == split[1][name]["sampled"]


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_about_half_the_weights(name, split, whole):
    from tpworker import weight_bytes

    full = weight_bytes(whole[name].model)
    for rank in split:
        # norms, routers and a replicated KV head are whole on each rank: a little over half
        assert 0.45 * full < rank[name]["bytes"] < 0.6 * full, (rank[name]["bytes"], full)


def test_cli_run_tp2_starts_its_ranks(tiny_chat, capsys):
    from ember.cli import main

    args = ["run", str(tiny_chat), "hello there", "-n", "10", "--dtype", "float32"]
    split = subprocess.run([sys.executable, "-m", "ember.cli", *args, "--tp", "2"], env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert split.returncode == 0, split.stderr[-3000:]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert split.stdout == one and one.strip()  # the same text, printed once (by rank 0)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cli_run_tp2_with_an_image(family, tmp_path, capsys):
    """An image+text model split over 2 ranks (the vision tower whole on each, the decoder split; rank
    0's image features, and Qwen2.5-VL's M-RoPE positions, travel with its request) answers as the
    whole model."""
    pytest.importorskip("PIL")
    from test_image_chat import IMAGES, tiny_llava
    from test_qwen2_5_vl import SHAPES, tiny_qwen2_5_vl

    from ember.cli import main

    folder = tmp_path / family
    folder.mkdir()
    if family == "llava":
        tiny_llava(folder)
    else:
        tiny_qwen2_5_vl(folder, sorted(SHAPES)[0])
    IMAGES[0].save(tmp_path / "fox.png")
    args = ["run", str(folder), "What is it?", "--image", str(tmp_path / "fox.png"), "-n", "10", "-t", "0",
            "--dtype", "float32"]
    split = subprocess.run([sys.executable, "-m", "ember.cli", *args, "--tp", "2"], env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert split.returncode == 0, split.stderr[-3000:]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main(args[:3] + args[5:]) == 0
    assert capsys.readouterr().out != one  # without the image: another answer (so the image was used)
    assert split.stdout == one and one.strip()


def test_a_killed_rank_fails_the_other_with_a_clear_error(run):
    report = json.loads((run / "killed.json").read_text())  # rank 1 exited with code 3 (see `run`)
    assert report["error"].startswith("DistributedError: tensor-parallel rank 0/2"), report
    assert "another rank stopped" in report["error"]
    assert report["seconds"] < 40


def test_tp_without_a_process_group_says_how_to_start_one(folders, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ember.DistributedError, match="torchrun --nproc-per-node 2"):
        ember.load(folders["llama_kv2_tied"], tp=2)


def test_encoders_refuse_tp(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    folder = save(tiny_hf_model(cfg, BertModel), tmp_path)
    with pytest.raises(ember.ArgumentError, match="tensor parallelism splits causal language models"):
        ember.load(folder, tp=2)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_tp_is_refused(folders, bad):
    with pytest.raises(ember.ArgumentError, match="tp must be"):
        ember.load(folders["llama_kv2_tied"], tp=bad)


# ---- the sharded reads, in this process ----------------------------------------------------------------
@pytest.fixture
def vb(tmp_path):
    from ember import VarBuilder
    from ember.io.safetensors import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(8, 6, generator=g), "b": torch.randn(8, generator=g)}, tmp_path / "model.safetensors")
    return VarBuilder.from_mmaped_safetensors([tmp_path / "model.safetensors"], dtype=torch.float32)


def test_sharded_builder_reads_only_its_ranges(vb):
    full, bias = vb.get((8, 6), "w"), vb.get((8,), "b")
    rows = vb.sharded(0, [(2, 4)]).get((8, 6), "w")  # the whole shape is checked, the part returned
    assert torch.equal(rows, full[2:4]) and rows.data_ptr() == full[2:4].data_ptr()  # a view on the file
    assert torch.equal(vb.sharded(0, [(0, 2), (6, 8)]).get((8, 6), "w"), torch.cat([full[:2], full[6:]]))
    assert torch.equal(vb.sharded(1, [(3, 6)]).get((8, 6), "w"), full[:, 3:])
    assert torch.equal(vb.sharded(1, [(3, 6)]).get((8,), "b"), bias)  # a row-parallel bias comes whole
    assert torch.equal(vb.get_sharded((8, 6), "w", 0, 1, 2), full[4:])
    with pytest.raises(ember.ShapeMismatchError, match="dimension 1 \(6\) does not split into 4 equal parts"):
        vb.get_sharded((8, 6), "w", 1, 0, 4)
    with pytest.raises(ember.ShapeMismatchError, match="exceed its dimension 0 of 8"):
        vb.sharded(0, [(4, 9)]).get((8, 6), "w")


def test_quantised_weights_split_by_rows_and_at_block_boundaries():
    import gguf
    import numpy as np

    from ember.io.ggml_weight import GGMLWeight, slice_blocks

    values = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = GGMLWeight(torch.from_numpy(gguf.quants.quantize(values, q8)), int(q8), (4, 64))
    full = w.dequantize()
    assert torch.equal(slice_blocks(w, 0, [(1, 3)]).dequantize(), full[1:3])
    assert torch.equal(slice_blocks(w, 1, [(32, 64)]).dequantize(), full[:, 32:])
    with pytest.raises(ValueError, match="cuts through them"):
        slice_blocks(w, 1, [(16, 48)])


def test_serve_tp2_rank0_serves_and_the_other_follows(tiny_chat, tmp_path):
    import signal
    import time
    import urllib.request

    pytest.importorskip("uvicorn")
    port, log = _free_port(), tmp_path / "serve.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", str(tiny_chat), "--tp", "2", "--port",
                                 str(port), "--dtype", "float32"], env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 240
        while "listening" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

        def complete(**kw) -> str:
            body = json.dumps({"model": str(tiny_chat), "prompt": "hello there", "max_tokens": 10, **kw}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["choices"][0]["text"]

        whole = ember.load(tiny_chat, dtype=torch.float32).generate("hello there", 10)
        assert complete(temperature=0) == whole
        assert complete(temperature=1.0)  # sampled: rank 0 seeds it for both ranks
        assert complete(temperature=0) == whole  # the ranks are still in step
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


# ---- how a rank's share is computed, and families that refuse a split (built here, no collectives) -------
def test_heads_divide_or_kv_heads_replicate():
    from ember.distributed import TensorParallel

    tp = [TensorParallel(r, 4) for r in range(4)]
    gqa = [t.attention(8, 2, 16) for t in tp]  # 2 KV heads over 4 ranks: ranks 0-1 hold head 0, 2-3 head 1
    assert [(s.heads, s.kv_heads, s.q, s.kv) for s in gqa[1:3]] == [(2, 1, [(32, 64)], [(0, 16)]),
                                                                   (2, 1, [(64, 96)], [(16, 32)])]
    assert tp[3].attention(8, 8, 16).kv == [(96, 128)]  # 8 KV heads: 2 per rank (heads 6, 7)
    with pytest.raises(ember.DistributedError, match=r"num_attention_heads \(6\) does not divide over 4"):
        tp[0].attention(6, 2, 16)
    with pytest.raises(ember.DistributedError, match="3 key/value heads cannot be shared out over 4 ranks"):
        tp[0].attention(12, 3, 16)
    assert [t.padded(257, "vocab_size") for t in tp] == [(0, 65), (65, 130), (130, 195), (195, 257)]


def _build_split(folder, rank: int = 0):
    from ember import VarBuilder, hub
    from ember.distributed import TensorParallel
    from ember.distributed.layers import check_split
    from ember.loading import build, open_checkpoint

    ckpt = open_checkpoint(hub.resolve(folder))
    source, _ = ckpt.source(torch.float32, torch.device("cpu"), None)
    tp = TensorParallel(rank, 2)
    model = build(ckpt.entry, ckpt.entry.parse_config(ckpt.raw), VarBuilder(source, torch.float32, "cpu", tp=tp))
    check_split(model, tp, ckpt.entry.model_type)
    return model


@pytest.mark.parametrize("family", ["olmo2", "gpt2"])
def test_families_without_a_split_refuse_it(family, tmp_path):
    from transformers import GPT2Config, Olmo2Config

    cfg = {"olmo2": Olmo2Config(**{**BASE, "num_key_value_heads": 2}),
           "gpt2": GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)}[family]
    with pytest.raises(ember.DistributedError, match="OLMo 2" if family == "olmo2" else "'gpt2' models cannot be split"):
        _build_split(save(tiny_hf_model(cfg), tmp_path))


def test_compile_with_tp_is_refused(folders):
    with pytest.raises(ember.ArgumentError, match="compile=True with tp > 1 is not supported"):
        ember.load(folders["llama_kv2_tied"], tp=2, compile=True)
