"""GPT-OSS checkpoints with MXFP4 experts, as the Hub lays them out (`*_blocks` uint8 [E, R, G, 16],
`*_scales` uint8 [E, R, G], quantization_config {"quant_method": "mxfp4", modules_to_not_convert}):
ember's dequantiser against transformers' own (integrations/mxfp4.py), ember's logits against
transformers' model holding the dequantised experts, and bad tensors as clear errors."""
import json

import pytest
import torch

import ember
from ember.errors import CheckpointError, EmberError, UnsupportedModelError
from hostile import fuzz_settings, memory_cap, time_limit
from hypothesis import given
from hypothesis import strategies as st
from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, sliding_window=6, num_local_experts=4, num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4})
HUB_QC = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                     "lm_head"], "quant_method": "mxfp4"}
PROJS = ("gate_up_proj", "down_proj")


def _random_mxfp4(shape_rows_in, g):
    """Random codes (every nibble value) and scales 2^-8..2^-4 for a [E, R, K] projection."""
    e, r, k = shape_rows_in
    blocks = torch.randint(0, 256, (e, r, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(119, 124, (e, r, k // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    """(transformers model with the dequantised experts, folder of the MXFP4 checkpoint)."""
    from safetensors.torch import load_file, save_file
    from transformers import GptOssConfig
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    cfg = GptOssConfig(**BASE)
    hf = tiny_hf_model(cfg)
    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    save(hf, folder)
    tensors = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    E, H, F = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for i, layer in enumerate(hf.model.layers):
        for proj, rows_in in zip(PROJS, ((E, 2 * F, H), (E, H, F))):
            blocks, scales = _random_mxfp4(rows_in, g)
            name = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[name]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            with torch.no_grad():  # transformers' own dequantisation, in the model's [E, in, out] layout
                getattr(layer.mlp.experts, proj).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "quantization_config": HUB_QC}))
    return hf, folder


def test_dequantize_matches_transformers_bit_for_bit_over_every_code_and_exponent():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from ember.hfquant.mxfp4 import dequantize

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 256, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(2, 256, 3).contiguous()
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [2, 96, 256]
    got = dequantize(blocks, scales, chunk=100).transpose(1, 2)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    # and by hand: element 2i of a block is byte i's low nibble, 2i+1 its high one; 2^(e-127)
    fp4 = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    b, e = int(blocks[1, 130, 2, 5]), 130
    assert got[1, 2 * 32 + 10, 130].item() == fp4[b & 15] * 2.0 ** (e - 127)
    assert got[1, 2 * 32 + 11, 130].item() == fp4[b >> 4] * 2.0 ** (e - 127)


def test_mxfp4_gpt_oss_logits_match_transformers_dequantized(mxfp4_model):
    hf, folder = mxfp4_model
    llm = check_parity(hf, folder, hf.config.vocab_size)
    assert not llm._loaded.quantized and "mxfp4" in llm._loaded.load_mode and "dequantised at load" in llm._loaded.load_mode


def test_transformers_own_mxfp4_loader_agrees_on_the_written_checkpoint(mxfp4_model):
    """The folder is what transformers itself reads as an MXFP4 checkpoint (its quantizer, dequantising
    on CPU), and ember's logits match that model's."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    folder = mxfp4_model[1]
    hf = GptOssForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                           dtype=torch.float32).eval()
    llm = ember.load(folder, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 40, 41]])
    with torch.no_grad():
        ref, got = hf(ids).logits, llm.model(ids)
    assert (ref - got).abs().max().item() <= 1e-4 and ref.abs().max().item() > 1


def test_inspect_shows_mxfp4(mxfp4_model, capsys):
    from ember import cli

    assert cli.main(["inspect", str(mxfp4_model[1]), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "quantization: mxfp4 experts" in out and "4 quantised expert tensors" in out


def test_keep_quantized_true_is_refused(mxfp4_model):
    with pytest.raises(UnsupportedModelError, match="dequantises this checkpoint"):
        ember.load(mxfp4_model[1], dtype=torch.float32, keep_quantized=True)


def _edited(folder, tmp_path, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copy(folder / "config.json", tmp_path / "config.json")
    t = load_file(folder / "model.safetensors")
    edit(t)
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


S = "model.layers.1.mlp.experts.down_proj"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.__setitem__(f"{S}_scales", t[f"{S}_scales"][:, :, :0].clone()),
     rf"'{S}_scales' is torch.uint8 \[4, 64, 0\].*must be uint8 \[4, 64, 1\]"),
    (lambda t: t.__setitem__(f"{S}_scales", t[f"{S}_scales"].float()), rf"'{S}_scales' is torch.float32"),
    (lambda t: t.__setitem__(f"{S}_blocks", t[f"{S}_blocks"][..., :8].clone()), rf"'{S}_blocks' is .*\[4, 64, 1, 8\]"),
    (lambda t: t.pop(f"{S}_scales"), rf"'{S}_blocks' has no scales"),
    (lambda t: t.pop(f"{S}_blocks"), rf"'{S}_scales' has no blocks"),
    (lambda t: t[f"{S}_scales"].view(-1)[7:9].fill_(255), rf"'{S}_scales' holds the E8M0 exponent 255"),
    (lambda t: t.__setitem__(S, torch.zeros(4, 32, 64)), rf"'{S}' is stored both plain and as MXFP4"),
])
def test_bad_mxfp4_tensors_are_checkpoint_errors_naming_them(mxfp4_model, tmp_path, edit, match):
    d = _edited(mxfp4_model[1], tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        ember.load(d, dtype=torch.float32)


@fuzz_settings(25)
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(f"model.layers.{i}.mlp.experts.{p}{part}" for i in (0, 1)
                                                        for p in PROJS for part in ("_blocks", "_scales"))),
                                st.sampled_from(["shape", "dtype", "drop"]),
                                st.lists(st.integers(0, 70), max_size=5),
                                st.sampled_from([torch.uint8, torch.int8, torch.int32, torch.float16, torch.float32])),
                      min_size=1, max_size=3))
def test_fuzz_hostile_mxfp4_tensors_fail_cleanly_or_load(mxfp4_model, tmp_path_factory, edits):
    """Blocks/scales of any shape or dtype, or dropped: an EmberError naming the tensor, or (edits
    that keep the layout) a model that loads and generates."""
    def edit(t):
        for name, kind, shape, dtype in edits:
            if name not in t:
                continue
            if kind == "drop":
                del t[name]
            elif kind == "shape":
                t[name] = torch.zeros(shape, dtype=t[name].dtype)
            else:
                t[name] = t[name].to(dtype)

    d = _edited(mxfp4_model[1], tmp_path_factory.mktemp("mx"), edit)
    with time_limit(30), memory_cap(1 << 30):
        try:
            llm = ember.load(d, dtype=torch.float32)
        except EmberError as e:
            assert "model.layers." in str(e) or "is missing" in str(e), e
            return
        toks = [ev.token_id for ev in llm.events([llm.request([1, 2, 3], 3, ignore_eos=True)])]
    assert len(toks) == 3
