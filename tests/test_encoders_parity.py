"""BERT, RoBERTa, XLM-RoBERTa, CamemBERT, DistilBERT, MPNet and ModernBERT encoders against
transformers on tiny random checkpoints: last hidden states on a plain and a right-padded batch
(padded rows equal to the rows alone), with and without the task models' checkpoint prefixes."""
import pytest
import torch

from parity import randomize_, save

VOCAB = 120


def _hf(config, cls_name: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    m = getattr(transformers, cls_name)(config)
    return randomize_(m.float().eval(), seed)


def _base(hf):
    """The encoder inside a task model (BertForMaskedLM.bert, ...) or the model itself."""
    return getattr(hf, hf.base_model_prefix, hf)


def _batch(pad_id: int, seed: int = 0, lengths=(17, 9, 4, 1 + 0)):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = pad_id
    return ids, mask


def check_encoder(hf, folder, pad_id: int, atol: float = 1e-4, lengths=(17, 9, 4, 1)):
    import ember

    enc = ember.load(folder, dtype=torch.float32, device="cpu")
    assert isinstance(enc, ember.Embedder)
    ref_model = _base(hf)
    ids, mask = _batch(pad_id, lengths=lengths)
    with torch.no_grad():
        ref = ref_model(input_ids=ids[:1, :lengths[0]]).last_hidden_state
        got = enc.model(ids[:1, :lengths[0]])
        assert got.shape == ref.shape and got.dtype == torch.float32
        d = (ref - got).abs().max().item()
        assert d <= atol, f"hidden states differ by {d}"
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = enc.model(ids, attention_mask=mask)
        m = mask.bool()
        d = (ref[m] - got[m]).abs().max().item()
        assert d <= atol, f"padded-batch hidden states differ by {d}"
        for i, n in enumerate(lengths):  # a padded row equals the row alone
            solo = enc.model(ids[i:i + 1, :n])
            d = (solo[0] - got[i, :n]).abs().max().item()
            assert d <= atol, f"row {i} padded differs from alone by {d}"
    return enc


def _bert_cfg(cls="BertConfig", **kw):
    import transformers

    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=64, type_vocab_size=2)
    return getattr(transformers, cls)(**{**base, **kw})


@pytest.mark.parametrize("model_cls", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
def test_bert_matches(tmp_path, model_cls):
    hf = _hf(_bert_cfg(), model_cls)
    check_encoder(hf, save(hf, tmp_path), pad_id=0)


def test_bert_gelu_new_no_token_types(tmp_path):
    hf = _hf(_bert_cfg(hidden_act="gelu_new", type_vocab_size=0 + 1, layer_norm_eps=1e-7), "BertModel")
    check_encoder(hf, save(hf, tmp_path), pad_id=0)


@pytest.mark.parametrize("cls,model_cls", [("RobertaConfig", "RobertaModel"), ("RobertaConfig", "RobertaForMaskedLM"),
                                           ("XLMRobertaConfig", "XLMRobertaModel"),
                                           ("XLMRobertaConfig", "XLMRobertaForSequenceClassification"),
                                           ("CamembertConfig", "CamembertModel")])
def test_roberta_family_matches(tmp_path, cls, model_cls):
    # positions count from padding_idx + 1; max_position_embeddings leaves room for the offset
    hf = _hf(_bert_cfg(cls, pad_token_id=1, max_position_embeddings=66, type_vocab_size=1), model_cls)
    enc = check_encoder(hf, save(hf, tmp_path), pad_id=1)
    assert enc.model.max_tokens == 64


@pytest.mark.parametrize("model_cls", ["DistilBertModel", "DistilBertForMaskedLM"])
@pytest.mark.parametrize("sinusoidal", [False, True])
def test_distilbert_matches(tmp_path, model_cls, sinusoidal):
    from transformers import DistilBertConfig

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=64,
                           sinusoidal_pos_embds=sinusoidal)
    hf = _hf(cfg, model_cls)
    check_encoder(hf, save(hf, tmp_path), pad_id=0)


@pytest.mark.parametrize("model_cls", ["MPNetModel", "MPNetForMaskedLM"])
def test_mpnet_matches(tmp_path, model_cls):
    from transformers import MPNetConfig

    cfg = MPNetConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                      max_position_embeddings=80)
    hf = _hf(cfg, model_cls)
    # sequences past 8 and 16 tokens exercise the logarithmic relative-position buckets
    check_encoder(hf, save(hf, tmp_path), pad_id=1, lengths=(40, 23, 9, 2))


@pytest.mark.parametrize("model_cls", ["ModernBertModel", "ModernBertForMaskedLM"])
@pytest.mark.parametrize("kw", [dict(), dict(norm_bias=True, attention_bias=True, mlp_bias=True, global_attn_every_n_layers=2)])
def test_modernbert_matches(tmp_path, model_cls, kw):
    from transformers import ModernBertConfig

    # local_attention 8: a 4-token half window, shorter than the sequences, so sliding layers differ from global
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=64, local_attention=8, pad_token_id=0,
                           bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, **kw)
    hf = _hf(cfg, model_cls)
    check_encoder(hf, save(hf, tmp_path), pad_id=0)


def test_modernbert_original_config_keys(tmp_path):
    """An answerdotai-style config.json: global_attn_every_n_layers and global/local_rope_theta, no layer_types."""
    import json

    from transformers import ModernBertConfig

    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=64, local_attention=6, pad_token_id=0,
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})
    hf = _hf(cfg, "ModernBertModel")
    save(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for k in ("layer_types", "rope_parameters"):
        raw.pop(k, None)
    raw.update(global_attn_every_n_layers=3, global_rope_theta=5000.0, local_rope_theta=500.0)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    check_encoder(hf, str(tmp_path), pad_id=0)


@pytest.mark.parametrize("pack", ["1", "0"], ids=["packed", "plain"])
@pytest.mark.parametrize("family", ["bert", "mpnet", "modernbert"])
def test_bf16_matmuls_track_float32(tmp_path, monkeypatch, family, pack):
    """dtype=bfloat16: bf16 matmuls (oneDNN-prepacked on CPUs that allow it, else F.linear) with a
    float32 residual stream stay close to float32, padded batches included."""
    import ember
    from ember.backends import onednn

    monkeypatch.setenv("EMBER_PREPACK", pack)
    onednn.can_prepack.cache_clear()
    try:
        if family == "bert":
            hf = _hf(_bert_cfg(num_hidden_layers=3), "BertModel")
        elif family == "mpnet":
            from transformers import MPNetConfig

            hf = _hf(MPNetConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=80), "MPNetModel")
        else:
            from transformers import ModernBertConfig

            hf = _hf(ModernBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64, local_attention=8,
                                      pad_token_id=0), "ModernBertModel")
        folder = save(hf, tmp_path)
        e32 = ember.load(folder, dtype=torch.float32, device="cpu")
        e16 = ember.load(folder, dtype=torch.bfloat16, device="cpu")
        prepacked = any(isinstance(m, onednn.PrepackedLinear) for m in e16.model.modules())
        assert prepacked == (pack == "1" and onednn.can_prepack())
        assert ("prepack" in e16._loaded.transforms) == prepacked
        pad = 1 if family == "mpnet" else 0
        ids, mask = _batch(pad, lengths=(30, 12, 5))
        with torch.no_grad():
            a, b = e32.model(ids, mask), e16.model(ids, mask)
            solo = e16.model(ids[1:2, :12])
        assert b.dtype == torch.float32  # the residual stream and the hidden states stay float32
        m = mask.bool()
        cos = torch.nn.functional.cosine_similarity(a[m], b[m], dim=-1)
        assert cos.min().item() > 0.999, cos.min().item()
        assert (solo[0] - b[1, :12]).abs().max().item() < 0.05
    finally:
        onednn.can_prepack.cache_clear()


def test_bert_tf_era_gamma_beta_names(tmp_path):
    """Old BERT checkpoints name LayerNorm parameters gamma/beta (transformers renames them on load)."""
    from safetensors.torch import load_file, save_file

    hf = _hf(_bert_cfg(), "BertForMaskedLM")
    save(hf, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    check_encoder(hf, str(tmp_path), pad_id=0)


AVX2_CAPS = {"EMBER_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def prepacked_float32_parity(folder: str) -> None:
    """The float32 encoder's default CPU path (oneDNN-prepacked Linears, bias + GELU + residual add
    fused into the matmuls, SDPA attention) against the plain F.linear path and transformers."""
    import transformers

    import ember
    from ember.backends import onednn

    assert onednn.can_prepack(torch.float32)  # x86 torch builds ship oneDNN
    fast = ember.load(folder, dtype=torch.float32, device="cpu")
    plain = ember.load(folder, dtype=torch.float32, device="cpu", prepack=False)
    assert "prepack-f32" in fast._loaded.transforms and "prepack-f32" not in plain._loaded.transforms
    layer = fast.model.layers[0]
    assert all(isinstance(getattr(layer, n), onednn.PrepackedLinear) for n in ("o", "up", "down"))
    assert layer.up.attr == "gelu" and layer.o.attr == "none"  # GELU fused; o and down add the residual
    assert not any(isinstance(m, onednn.PrepackedLinear) for m in plain.model.modules())
    ref_model = transformers.AutoModel.from_pretrained(folder).float().eval()
    ids, mask = _batch(0, lengths=(23, 11, 3))
    with torch.no_grad():
        a, b = fast.model(ids, mask), plain.model(ids, mask)
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        x, r = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
        lin = layer.o
        want = torch.nn.functional.linear(x, lin.weight_dense(), lin.bias) + r
        assert (lin.linear_add(x, r) - want).abs().max().item() < 1e-5
        r2 = torch.randn(3, 5, 96)
        assert torch.allclose(layer.up.linear_add(x, r2), layer.up(x) + r2)  # a fused GELU comes first
    m = mask.bool()
    assert (a[m] - b[m]).abs().max().item() < 1e-5, (a[m] - b[m]).abs().max().item()
    assert (a[m] - ref[m]).abs().max().item() < 1e-4, (a[m] - ref[m]).abs().max().item()


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_float32_prepacked_path_matches_plain_and_transformers(tmp_path, isa):
    """The default CPU float32 path against prepack=False and transformers, on this CPU's own ISA and
    (in a subprocess, every library capped: oneDNN, MKL, ATen, ember) on AVX2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    hf = _hf(_bert_cfg(num_hidden_layers=2), "BertModel")
    folder = save(hf, tmp_path)
    if isa == "native":
        prepacked_float32_parity(folder)
        return
    tests = str(Path(__file__).parent)
    code = (f"import sys; sys.path[:0] = [{tests!r}]; import test_encoders_parity as t; "
            f"t.prepacked_float32_parity({str(folder)!r}); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_CAPS}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_float32_prepack_waits_for_a_batch(tmp_path, monkeypatch):
    """float32 encoder Linears keep the checkpoint's weight (F.linear) until a call with LAZY_ROWS
    rows reorders it: a one-off short query skips the reorders' cost; both forms agree with the
    plain path, fused GELU and residual add included; a failed oneDNN check (deferred to the first
    reorder) keeps the plain weight."""
    import ember
    from ember.backends import onednn
    from ember.nn.layers import Linear

    if not onednn.can_prepack(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    folder = save(_hf(_bert_cfg(), "BertModel"), tmp_path)
    fast = ember.load(folder, dtype=torch.float32, device="cpu")
    plain = ember.load(folder, dtype=torch.float32, device="cpu", prepack=False)
    packed = [m for m in fast.model.modules() if isinstance(m, onednn.PrepackedLinear)]
    assert len(packed) == 8 and all(m.prepacked is None for m in packed)  # 2 layers x (qkv, o, up, down)
    ids, mask = _batch(0, lengths=(5,))
    with torch.no_grad():
        assert (fast.model(ids, mask) - plain.model(ids, mask)).abs().max().item() < 1e-5
        assert all(m.prepacked is None for m in packed)  # 5 rows: still the plain weights
        ids, mask = _batch(0, lengths=(30, 20, 9))  # 90 rows
        assert 90 >= onednn.LAZY_ROWS
        assert (fast.model(ids, mask) - plain.model(ids, mask)).abs().max().item() < 1e-5
    assert all(m.prepacked is not None for m in packed)

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    for gelu in (False, True):
        lin = onednn.PrepackedLinear(Linear(w.clone(), b), gelu=gelu, lazy_rows=8)
        ref = Linear(w, b)
        for rows in (3, 8, 2):  # plain, packed by the 8-row call, packed
            x, r = torch.randn(rows, 16, generator=g), torch.randn(rows, 24, generator=g)
            want = torch.nn.functional.gelu(ref(x)) if gelu else ref(x)
            assert (lin.linear_add(x, r) - (want + r)).abs().max().item() < 1e-5
            assert (lin.prepacked is None) == (rows == 3)
            assert (lin(x) - want).abs().max().item() < 1e-5
        assert lin.prepacked is not None and torch.equal(lin.weight_dense(), w)
    unpacked = onednn.PrepackedLinear(Linear(w.clone(), b), lazy_rows=8).unpack()  # before any call
    assert torch.equal(unpacked.weight, w)
    monkeypatch.setattr(onednn, "can_prepack", lambda dtype: False)
    lin = onednn.PrepackedLinear(Linear(w.clone(), b), gelu=True, lazy_rows=8)
    x = torch.randn(16, 16, generator=g)
    assert (lin(x) - torch.nn.functional.gelu(Linear(w, b)(x))).abs().max().item() < 1e-5
    assert lin.prepacked is None and lin(x).shape == (16, 24)


def test_encoder_load_leaves_native_kernels_unloaded(tmp_path):
    """A BERT-style encoder calls none of ember.nn.ops: loading and running one does not load (or
    build) the native kernel library, a cost of the first embedding otherwise."""
    import os
    import subprocess
    import sys

    folder = save(_hf(_bert_cfg(), "BertModel"), tmp_path)
    code = (f"import torch, ember; from ember.kernels import _build; e = ember.load({folder!r}, device='cpu'); "
            f"e.model(torch.tensor([[1, 2, 3]])); print(_build.info().get('loaded'), e._loaded.transforms)")
    r = subprocess.run([sys.executable, "-c", code], env=os.environ, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, transforms = r.stdout.strip().split(" ", 1)
    assert loaded == "None" and "native-ops" not in transforms, r.stdout
