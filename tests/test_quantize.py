"""ember.load(..., quantize="int8" | "int4"): weights quantised at load into Q8_0 / Q4_1 blocks,
checked against an independent dequantiser (gguf.quants) and against the unquantised model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ember
from ember.errors import ArgumentError
from ember.io import ggml
from ember.quantize import quantize
from parity import save, tiny_hf_model


@pytest.mark.parametrize("qtype", [ggml.Q8_0, ggml.Q4_1], ids=ggml.type_name)
def test_blocks_decode_the_same_with_gguf_and_stay_within_half_a_step(qtype):
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g) * 0.05
    w[3, :32] = 0.0  # an all-zero block: scale 0, no division by it
    w[4, 5] = 3.0  # an outlier
    blocks = quantize(w, qtype)
    assert blocks.shape == (300, 96 // 32 * ggml.block_size(qtype)[1])
    theirs = quants.dequantize(blocks.numpy(), GGMLQuantizationType(qtype)).reshape(300, 96)
    ours = ggml.dequantize(blocks, qtype, (300, 96)).numpy()
    assert np.array_equal(theirs, ours)
    x = w.numpy().reshape(300, 3, 32)
    span = (x.max(-1) - x.min(-1)) / 15 if qtype == ggml.Q4_1 else np.abs(x).max(-1) / 127
    err = np.abs(theirs.reshape(300, 3, 32) - x).max(-1)
    assert (err <= span * 0.5 + 1e-3 * span + 1e-7).all()
    assert np.all(theirs[3, :32] == 0)
    # gguf's own quantiser makes (nearly) the same bytes: round-to-nearest against the f16 scale
    same = (quants.quantize(w.numpy(), GGMLQuantizationType(qtype)) == blocks.numpy()).mean()
    assert same > 0.98


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    d = tmp_path_factory.mktemp("q")
    save(tiny_hf_model(cfg, init=0.02), d)
    return d


@pytest.mark.parametrize("mode, body", [("int8", ggml.Q8_0), ("int4", ggml.Q4_1)])
def test_quantized_model_close_to_the_float_model(folder, mode, body):
    ref = ember.load(folder, dtype=torch.float32)
    q = ember.load(folder, quantize=mode)
    assert q.dtype == torch.float32 and q._loaded.transforms[0] == f"quantize-{mode}"
    from ember.backends import native

    kinds = {type(m).__name__ for m in q.model.modules()}
    assert ("NativeQuantLinear" in kinds) == native.available() and "Linear" not in kinds
    heads = [m for n, m in q.model.named_modules() if n == "lm_head"]
    assert heads[0].ggml_type == ggml.Q8_0  # the LM head stays int8 in the int4 mode too
    layer = q.model.model.layers[0].mlp.down_proj
    assert layer.ggml_type == body
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref.model(ids), q.model(ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert cos.min().item() > (0.999 if mode == "int8" else 0.98), cos.min()
    toks = [ev.token_id for ev in q.events([q.request([1, 2, 3], 5, ignore_eos=True)])]
    assert len(toks) == 5 and all(0 <= t < 256 for t in toks)


@pytest.mark.parametrize("kw, msg", [
    (dict(quantize="int3"), "quantize must be one of 'int8', 'int4'"),
    (dict(quantize="int8", device="meta"), "device 'meta'"),
])
def test_bad_quantize_arguments(folder, kw, msg):
    with pytest.raises(ArgumentError, match=msg):
        ember.load(folder, **kw)


def test_quantize_refuses_gguf_files_and_encoders(tmp_path):
    import ggufmake as gm
    from test_gguf import _hf_model
    from tinyencoders import tiny_bert

    path = gm.hf_to_gguf(_hf_model("llama"), tmp_path / "m.gguf")
    with pytest.raises(ArgumentError, match="already quantised"):
        ember.load(path, quantize="int8")
    enc = tmp_path / "bert"
    tiny_bert(enc)
    with pytest.raises(ArgumentError, match="applies to causal language models"):
        ember.load(enc, quantize="int8")
