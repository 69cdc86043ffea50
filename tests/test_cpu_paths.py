"""The CPU paths ember picks, per ISA, exercised on any machine by capping the ISA
(EMBER_CPU_ISA=avx2 also tells ember's bf16 check that the CPU has no native bf16)."""
from __future__ import annotations

import pytest
import torch

import ember
from ember.backends import native
from parity import save, tiny_hf_model

needs_native = pytest.mark.skipif(not native.available(), reason="ember's native kernels do not build here")


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    d = tmp_path_factory.mktemp("bf16")
    save(tiny_hf_model(cfg, init=0.02).to(torch.bfloat16), d)
    return d


def _logits(llm, ids):
    with torch.no_grad():
        return llm.model(ids).float()


@needs_native
def test_bf16_checkpoint_on_an_avx2_cpu_stays_bf16_on_the_native_gemv(bf16_folder, monkeypatch):
    """On a CPU without native bf16, a bf16 checkpoint used to load as float32 (twice the bytes per
    decode step); with the native kernels it stays bf16: decode rows stream it through the bf16 GEMV,
    prefill widens it per matmul."""
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = _logits(ember.load(bf16_folder, dtype=torch.float32), ids)
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")
    llm = ember.load(bf16_folder)
    assert llm.dtype == torch.bfloat16 and llm._loaded.transforms == ("native-ops", "native-bf16")
    kinds = {type(m).__name__ for m in llm.model.modules()}
    assert "NativeBf16Linear" in kinds and "PrepackedLinear" not in kinds
    got = _logits(llm, ids)  # prefill rows: the float32 path
    cos = torch.nn.functional.cosine_similarity(got.flatten(0, 1), ref.flatten(0, 1), dim=-1)
    assert cos.min().item() > 0.999
    # decode rows: the native GEMV, the same numbers as a bf16 model's matmuls summed in float32
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    lin = next(m for m in llm.model.modules() if type(m).__name__ == "NativeBf16Linear")
    want = torch.nn.functional.linear(x.float(), lin.weight.float())
    torch.testing.assert_close(lin(x).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    toks = [ev.token_id for ev in llm.events([llm.request([1, 2, 3], 6, ignore_eos=True)])]
    assert len(toks) == 6


@needs_native
def test_gguf_on_a_capped_isa_uses_that_isas_kernels(tmp_path, monkeypatch):
    import ggufmake as gm
    from test_gguf import _hf_model

    from ember import kernels
    from ember.io import ggml

    path = gm.hf_to_gguf(_hf_model("llama"), tmp_path / "m.gguf", qtype=ggml.Q8_0)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    best = _logits(ember.load(path), ids)
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")
    assert kernels.isa() == "avx2"
    llm = ember.load(path)
    assert llm._loaded.transforms == ("native-quant", "native-ops")
    got = _logits(llm, ids)
    # every ISA path rounds activations to int8 the same way: the same numbers up to summation order
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4 * best.abs().max().item())


def test_without_native_kernels_the_torch_paths_remain(bf16_folder, monkeypatch):
    from ember import transforms

    monkeypatch.setattr(transforms, "native_kernels", lambda device: False)
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")
    llm = ember.load(bf16_folder)
    assert llm.dtype == torch.float32 and llm._loaded.transforms == ()  # as before the kernels: f32 on AVX2
