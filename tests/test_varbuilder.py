"""VarBuilder: prefixes, shape checks before reads, clear errors, conversions, usage tracking."""
import pytest
import torch

from ember import VarBuilder
from ember.errors import CheckpointError, ShapeMismatchError, TensorNotFoundError
from ember.io.safetensors import save_file


@pytest.fixture
def vb(tmp_path):
    save_file({
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 4),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 4),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 4),
        "model.embed_tokens.weight": torch.randn(10, 4).bfloat16(),
        "model.step": torch.tensor([3], dtype=torch.int64),
    }, tmp_path / "model.safetensors")
    return VarBuilder.from_mmaped_safetensors([tmp_path / "model.safetensors"], dtype=torch.float32)


def test_pp_maps_prefixes_to_keys(vb):
    layer = vb.pp("model").pp("layers").pp(0).pp("self_attn")
    assert layer.get((8, 4), "q_proj.weight").shape == (8, 4)
    assert vb.pp("model.layers.1").contains("self_attn.q_proj.weight")
    assert not vb.pp("model.layers.1").contains("self_attn.k_proj.weight")


def test_missing_tensor_names_the_key_and_nearest_keys(vb):
    with pytest.raises(TensorNotFoundError) as e:
        vb.pp("model.layers.1.self_attn").get((4, 4), "k_proj.weight")
    msg = str(e.value)
    assert "'model.layers.1.self_attn.k_proj.weight' not found" in msg
    assert "nearest keys: model.layers.0.self_attn.k_proj.weight" in msg
    assert isinstance(e.value, CheckpointError)


def test_shape_mismatch_names_key_expected_and_found_without_reading(vb, monkeypatch):
    src = vb._shared.source
    monkeypatch.setattr(src, "load", lambda key: pytest.fail("data was read before the shape check"))
    with pytest.raises(ShapeMismatchError) as e:
        vb.get((4, 8), "model.layers.0.self_attn.q_proj.weight")
    assert "'model.layers.0.self_attn.q_proj.weight'" in str(e.value)
    assert "[8, 4]" in str(e.value) and "[4, 8]" in str(e.value)


def test_floats_convert_to_the_builder_dtype_and_ints_keep_theirs(vb):
    assert vb.get((10, 4), "model.embed_tokens.weight").dtype == torch.float32
    assert vb.get_unchecked("model.step").dtype == torch.int64
    assert vb.to(torch.bfloat16).get((8, 4), "model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def test_same_dtype_on_cpu_is_zero_copy(vb):
    a = vb.get((8, 4), "model.layers.0.self_attn.q_proj.weight")
    b = vb.get((8, 4), "model.layers.0.self_attn.q_proj.weight")
    assert a.data_ptr() == b.data_ptr()


def test_unused_reports_tensors_nobody_consumed(vb):
    vb.pp("model.layers.0.self_attn").get((8, 4), "q_proj.weight")
    assert "model.layers.0.self_attn.q_proj.weight" not in vb.unused()
    assert "model.layers.1.self_attn.q_proj.weight" in vb.unused()


def test_rename_maps_model_keys_to_checkpoint_keys(vb):
    r = vb.rename({"decoder": "model"})
    assert r.pp("decoder.layers.0.self_attn").get((8, 4), "q_proj.weight").shape == (8, 4)
    fn = vb.rename(lambda k: k.replace("attention", "self_attn"))
    assert fn.contains("model.layers.0.attention.k_proj.weight")


def test_duplicate_keys_across_shards_are_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "1.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "2.safetensors")
    with pytest.raises(CheckpointError, match="appears in both"):
        VarBuilder.from_mmaped_safetensors([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])


def test_pp_first_picks_the_prefix_the_checkpoint_uses():
    plain = VarBuilder.from_tensors({"embeddings.w": torch.zeros(2), "encoder.x": torch.zeros(3)})
    wrapped = VarBuilder.from_tensors({"bert.embeddings.w": torch.ones(2), "cls.head": torch.zeros(1)})
    for vb, want in ((plain, ""), (wrapped, "bert")):
        sub = vb.pp_first(["", "bert"], "embeddings.w")
        assert sub.prefix == want and sub.get(2, "embeddings.w").shape == (2,)
    # nested: the candidates are relative to the current prefix
    nested = VarBuilder.from_tensors({"m.roberta.embeddings.w": torch.zeros(2)}).pp("m")
    assert nested.pp_first(["", "bert", "roberta"], "embeddings.w").prefix == "m.roberta"
    with pytest.raises(TensorNotFoundError) as e:
        plain.pp_first(["", "bert"], "embeddings.word_embeddings.weight")
    msg = str(e.value)
    assert "'embeddings.word_embeddings.weight'" in msg and "'bert.embeddings.word_embeddings.weight'" in msg
