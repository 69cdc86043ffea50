"""Image+text chat from a GGUF decoder and a llama.cpp mmproj file (`ember.load(model.gguf,
mmproj=...)`) against transformers on tiny random LLaVA and Gemma 3 checkpoints: logits of
image+text prompts (f32 and f16 mmproj files), greedy chats, and bad / mismatched mmproj files
refused with EmberErrors. The files are written as llama.cpp's converters lay them out
(tests/mmprojmake.py); with EMBER_LLAMA_CPP set, Gemma 3's mmproj is also made by
convert_hf_to_gguf.py --mmproj itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("gguf")

import ember  # noqa: E402
import mmprojmake as mm  # noqa: E402
from ember.errors import CheckpointError, ConfigError, UnsupportedModelError  # noqa: E402
from test_image_chat import (GEMMA3_TEMPLATE, IMAGES, LLAVA_TEMPLATE, _ember_messages, _hf_inputs, _image,  # noqa: E402
                             tiny_gemma3, tiny_llava)
from test_qwen2_5_vl import TEMPLATE as QWEN_TEMPLATE  # noqa: E402


def _gemma3(folder):
    # both layers sliding: llama.cpp's gemma3 files carry no per-layer pattern (every 6th layer global)
    hf, proc = tiny_gemma3(folder, sliding_window=512, layer_types=("sliding_attention", "sliding_attention"))
    with torch.no_grad():  # the converter always writes the input projection as F16: the reference rounded alike
        w = hf.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(w.half().float())
    return hf, proc


def _llava(folder):
    hf, proc = tiny_llava(folder)
    with torch.no_grad():  # the converter always writes these as F16: the reference rounded alike
        for w in (hf.model.vision_tower.embeddings.patch_embedding.weight, hf.model.multi_modal_projector.linear_1.weight,
                  hf.model.multi_modal_projector.linear_2.weight):
            w.copy_(w.half().float())
    return hf, proc


def _qwen2_5_vl(folder, hidden=64):
    # patch 14 and 112-pixel windows: what llama.cpp's files assume (the converter writes no window size);
    # transformers' default pixel bounds (the mmproj file carries none)
    from test_qwen2_5_vl import tiny_qwen2_5_vl

    section = [2, 3, 3] if hidden == 64 else [4, 4, 4]
    text = dict(hidden_size=hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                        "rope_theta": 10000.0})
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=14, window_size=112,
                  out_hidden_size=hidden, fullatt_block_indexes=[1])
    return tiny_qwen2_5_vl(folder, (text, vision, {}, "saved"))


FAMILIES = {"llava": (_llava, mm.llava_mmproj, LLAVA_TEMPLATE), "gemma3": (_gemma3, mm.gemma3_mmproj, GEMMA3_TEMPLATE),
            "qwen2_5_vl": (_qwen2_5_vl, mm.qwen25vl_mmproj, QWEN_TEMPLATE)}
DECODERS = {"qwen2_5_vl": mm.qwen2vl_decoder}


def _tk(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, its processor, folder with model.gguf, mmproj-f32.gguf, mmproj-f16.gguf
    and nothing else: the pixels' mean/std come from the mmproj file)."""
    hf_folder = tmp_path_factory.mktemp(request.param)
    build, write, template = FAMILIES[request.param]
    hf, proc = build(hf_folder)
    folder = hf_folder / "gguf"
    folder.mkdir()
    DECODERS.get(request.param, mm.decoder)(hf, folder / "model.gguf", _tk(hf_folder), template)
    write(hf, folder / "mmproj-f32.gguf", f16=False)
    write(hf, folder / "mmproj-f16.gguf", f16=True)
    return request.param, hf, proc, folder


def _pixels(inputs) -> dict:
    """The processor's image tensors (Qwen2.5-VL: flattened patches and their grids)."""
    return {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}


def _load(folder, mmproj="mmproj-f32.gguf"):
    return ember.load(folder / "model.gguf", mmproj=folder / mmproj, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("f16", [False, True])
def test_logits_match_transformers(family, f16):
    name, hf, proc, folder = family
    llm = _load(folder, f"mmproj-{'f16' if f16 else 'f32'}.gguf")
    assert type(llm.model).__module__ == f"ember.models.{name}"
    big = _image(150, 230, 5)  # Qwen2.5-VL: 140 x 224 pixels, 2 x 2 windows of 4 x 4 merged blocks (112 pixels)
    for images in ([IMAGES[0]], IMAGES[:2], [big]):
        ref_in = _hf_inputs(proc, images)
        _, ids, _ = llm.chat_prompt(_ember_messages(images))
        assert ids == ref_in["input_ids"][0].tolist()  # the GGUF's template and tokens, the processor's prompt
        pixels = llm.image_processor(images)
        pixels = pixels if isinstance(pixels, dict) else {"pixel_values": pixels}
        assert all(torch.equal(v, ref_in[k]) for k, v in pixels.items())
        with torch.no_grad():
            ref = hf(**ref_in).logits
            got = llm.model(ref_in["input_ids"], **_pixels(ref_in))
            other_in = _hf_inputs(proc, [_image(im.height, im.width, seed=10 + i) for i, im in enumerate(images)])
            assert other_in["input_ids"].shape == ref_in["input_ids"].shape
            other = llm.model(ref_in["input_ids"], **_pixels(other_in))
        d = (ref - got).abs().max().item()
        assert d <= (2e-2 if f16 else 1e-4), f"logits differ by {d}"
        assert (other - got).abs().max() > 1e-2  # the image matters


def test_quantized_mmproj(family, tmp_path):
    """An mmproj file whose tower weights are Q8_0 blocks (as llama-quantize leaves one) gives the logits
    of the transformers model holding those weights as gguf.quants dequantises them."""
    import copy

    import gguf

    name, hf, proc, folder = family
    q8 = gguf.GGMLQuantizationType.Q8_0
    FAMILIES[name][1](hf, tmp_path / "q8.gguf", f16=False, qtype=int(q8))
    assert any(t.tensor_type == q8 for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors)
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if (".encoder.layers." in pname or ".visual.blocks." in pname) and p.dim() == 2 and p.shape[-1] % 32 == 0:
                blocks = gguf.quants.quantize(p.numpy(), q8)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, q8).reshape(p.shape)))
    llm = _load(folder, tmp_path / "q8.gguf")
    ref_in = _hf_inputs(proc, IMAGES[:2])
    with torch.no_grad():
        d = (ref(**ref_in).logits - llm.model(ref_in["input_ids"], **_pixels(ref_in))).abs().max().item()
        assert (hf(**ref_in).logits - ref(**ref_in).logits).abs().max() > 1e-3  # the blocks changed the weights
    assert d <= 1e-4, f"logits differ by {d}"


def test_mean_and_std_come_from_the_mmproj_file(family, tmp_path):
    name, hf, proc, folder = family
    FAMILIES[name][1](hf, tmp_path / "mmproj.gguf", meta={"clip.vision.image_mean": [0.0, 0.0, 0.0],
                                                           "clip.vision.image_std": [1.0, 1.0, 1.0]})
    got = _load(folder, tmp_path / "mmproj.gguf").image_processor([IMAGES[0]])
    ref = _hf_inputs(proc, [IMAGES[0]])["pixel_values"]
    if isinstance(got, dict):  # flattened patches: [patches, channels x temporal x p x p]
        got, ref = got["pixel_values"].view(len(ref), 3, -1), ref.view(len(ref), 3, -1)
    shape = (1, 3) + (1,) * (ref.dim() - 2)
    mean = torch.tensor(proc.image_processor.image_mean).view(shape)
    std = torch.tensor(proc.image_processor.image_std).view(shape)
    assert (got - (ref * std + mean)).abs().max() < 1e-5


def test_greedy_chat_matches_transformers(family):
    _, hf, proc, folder = family
    llm = _load(folder)
    ref_in = _hf_inputs(proc, IMAGES[:2])
    n = len(ref_in["input_ids"][0])
    with torch.no_grad():
        want = hf.generate(**ref_in, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, n:].tolist()
    got = llm.chat(_ember_messages(IMAGES[:2]), 12, ignore_eos=True, temperature=0, details=True)
    assert got.token_ids == want


def test_bad_mmproj_files_are_ember_errors(family, tmp_path):
    name, hf, _, folder = family
    _, write, _ = FAMILIES[name]
    bad = tmp_path / "bad.gguf"
    with pytest.raises(CheckpointError, match="not a multimodal projector"):
        _load(folder, folder / "model.gguf")  # a decoder given as the mmproj
    write(hf, bad, meta={"clip.projector_type": "resampler"})
    with pytest.raises(UnsupportedModelError, match="'resampler' is not supported"):
        _load(folder, bad)
    write(hf, bad, meta={"clip.vision.embedding_length": 1 << 30})
    with pytest.raises(ConfigError, match="embedding_length"):
        _load(folder, bad)
    own = {"llava": ("clip.vision.feature_layer", ([99], mm.gm.ARR)), "gemma3": ("clip.vision.projector.scale_factor", 3),
           "qwen2_5_vl": ("clip.vision.n_wa_pattern", 0)}[name]
    for key, value in (own, ("clip.vision.image_mean", [0.5, 0.5])):
        write(hf, bad, meta={key: value})
        with pytest.raises(ConfigError, match=key):
            _load(folder, bad)
    proj = "mm.input_projection.weight" if name == "gemma3" else "mm.2.weight"
    write(hf, bad, drop=(proj,))
    with pytest.raises(CheckpointError, match=proj):
        _load(folder, bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(folder, tmp_path / "missing.gguf")


def test_mismatched_pair_is_a_config_error(family, tmp_path_factory):
    """The other family's mmproj file (wrong projector type, another hidden size) is refused."""
    name, _, _, folder = family
    other = {"llava": "gemma3", "gemma3": "qwen2_5_vl", "qwen2_5_vl": "llava"}[name]
    o_folder = tmp_path_factory.mktemp("other")
    hf_o, _ = FAMILIES[other][0](o_folder)
    FAMILIES[other][1](hf_o, o_folder / "mmproj.gguf")
    with pytest.raises(ConfigError, match="needs a Gemma 3 decoder|needs a Qwen2-VL decoder|does not go with"):
        _load(folder, o_folder / "mmproj.gguf")


def test_wrong_width_is_a_config_error(family, tmp_path):
    name, hf, _, folder = family
    cfg = hf.config
    wide_folder = tmp_path / "wide"
    wide_folder.mkdir()
    build = FAMILIES[name][0]
    import test_image_chat as tic

    old = dict(tic.TEXT)
    tic.TEXT.update(hidden_size=96)
    try:
        hf_w, _ = build(wide_folder, hidden=96) if name == "qwen2_5_vl" else build(wide_folder)
    finally:
        tic.TEXT.clear()
        tic.TEXT.update(old)
    assert hf_w.config.text_config.hidden_size != cfg.text_config.hidden_size
    FAMILIES[name][1](hf_w, tmp_path / "wide.gguf")
    with pytest.raises(ConfigError, match="belongs to another model"):
        _load(folder, tmp_path / "wide.gguf")


def test_mmproj_file_alone_says_how_it_loads(family):
    _, _, _, folder = family
    with pytest.raises(UnsupportedModelError, match="multimodal projector file.*mmproj="):
        ember.load(folder / "mmproj-f32.gguf", dtype=torch.float32, device="cpu")
    info = ember.loading.describe_gguf(folder / "mmproj-f32.gguf")
    assert "multimodal projector file" in str(info)


def test_mmproj_needs_a_gguf_decoder(family):
    _, _, _, folder = family
    with pytest.raises(ember.errors.ArgumentError, match="goes with a GGUF decoder"):
        ember.load(folder.parent, mmproj=folder / "mmproj-f32.gguf", dtype=torch.float32, device="cpu")  # safetensors


# ---- llama.cpp's own converter ---------------------------------------------------------------------
LLAMA_CPP = os.environ.get("EMBER_LLAMA_CPP", "")


@pytest.mark.skipif(not (LLAMA_CPP and Path(LLAMA_CPP, "convert_hf_to_gguf.py").is_file()),
                    reason="EMBER_LLAMA_CPP names no llama.cpp source tree")
def test_gemma3_mmproj_from_llama_cpp_converter(tmp_path):
    """convert_hf_to_gguf.py --mmproj writes what mmprojmake writes, and ember reads it to the same logits."""
    import gguf
    from safetensors.torch import load_file, save_file

    hf, proc = _gemma3(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")  # the Hub's names, which the converter maps
    save_file({("vision_tower.vision_model." + k[13:] if k.startswith("vision_tower.") else k): v.contiguous()
               for k, v in sd.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())  # the Hub's carries the image's tokens
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "image_seq_length": 4}))
    subprocess.run([sys.executable, str(Path(__file__).with_name("llamacpp_convert.py")), LLAMA_CPP, str(tmp_path),
                    str(tmp_path / "mmproj-real.gguf"), "--mmproj"], check=True, capture_output=True)
    mm.decoder(hf, tmp_path / "model.gguf", _tk(tmp_path), GEMMA3_TEMPLATE)
    mm.gemma3_mmproj(hf, tmp_path / "mmproj-ours.gguf")
    real, ours = gguf.GGUFReader(tmp_path / "mmproj-real.gguf"), gguf.GGUFReader(tmp_path / "mmproj-ours.gguf")
    assert {t.name: (t.tensor_type, t.shape.tolist()) for t in real.tensors} == \
        {t.name: (t.tensor_type, t.shape.tolist()) for t in ours.tensors}
    for k in ours.fields:
        if k.startswith("clip."):
            assert real.fields[k].contents() == pytest.approx(ours.fields[k].contents()), k
    llm = _load(tmp_path, "mmproj-real.gguf")
    ref_in = _hf_inputs(proc, IMAGES[:2])
    with torch.no_grad():
        d = (hf(**ref_in).logits - llm.model(ref_in["input_ids"], pixel_values=ref_in["pixel_values"])).abs().max()
    assert d <= 1e-4, f"logits differ by {d}"


@pytest.mark.skipif(not (LLAMA_CPP and Path(LLAMA_CPP, "tools/mtmd/legacy-models").is_dir()),
                    reason="EMBER_LLAMA_CPP names no llama.cpp source tree")
def test_llava_mmproj_from_llama_cpp_converter(tmp_path):
    """tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py (after llava_surgery_v2's split) writes
    what mmprojmake writes, and ember reads it to transformers' logits."""
    import gguf

    hf, proc = _llava(tmp_path)
    hf.model.vision_tower.save_pretrained(tmp_path / "vision")
    torch.save({k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.multi_modal_projector.")},
               tmp_path / "llava.projector")
    subprocess.run([sys.executable, str(Path(__file__).with_name("llamacpp_legacy_mmproj.py")), LLAMA_CPP,
                    str(tmp_path / "vision"), str(tmp_path / "llava.projector"), str(tmp_path / "out")],
                   check=True, capture_output=True)
    mm.decoder(hf, tmp_path / "model.gguf", _tk(tmp_path), LLAVA_TEMPLATE)
    mm.llava_mmproj(hf, tmp_path / "mmproj-ours.gguf")
    real = gguf.GGUFReader(tmp_path / "out" / "mmproj-model-f16.gguf")
    ours = gguf.GGUFReader(tmp_path / "mmproj-ours.gguf")
    assert {t.name: (t.tensor_type, t.shape.tolist()) for t in real.tensors} == \
        {t.name: (t.tensor_type, t.shape.tolist()) for t in ours.tensors}
    assert {k for k in real.fields if k.startswith("clip.")} == {k for k in ours.fields if k.startswith("clip.")}
    for k in ours.fields:
        if k.startswith("clip.") and k != "clip.vision.projection_dim":  # CLIP's own (unused), from its config
            assert real.fields[k].contents() == pytest.approx(ours.fields[k].contents()), k
    llm = _load(tmp_path, "out/mmproj-model-f16.gguf")
    ref_in = _hf_inputs(proc, IMAGES[:2])
    with torch.no_grad():
        d = (hf(**ref_in).logits - llm.model(ref_in["input_ids"], pixel_values=ref_in["pixel_values"])).abs().max()
    assert d <= 2e-2, f"logits differ by {d}"



def test_cli_run_with_mmproj(family, tmp_path, capsys):
    """`ember run model.gguf PROMPT --mmproj FILE --image PATH` answers as llm.chat with that image."""
    from ember import cli

    _, _, _, folder = family
    llm = _load(folder)
    path = tmp_path / "fox.png"
    IMAGES[0].save(path)
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                        {"type": "text", "text": "What is it?"}]}
    want = llm.chat([user], 6, temperature=0, ignore_eos=True)
    opts = ["-n", "6", "-t", "0", "--dtype", "float32", "--device", "cpu"]
    assert cli.main(["run", str(folder / "model.gguf"), "What is it?", "--image", str(path),
                     "--mmproj", str(folder / "mmproj-f32.gguf"), *opts]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_server_loads_the_pair(family):
    """`ember serve model.gguf --mmproj FILE` loads the image+text model."""
    from ember.serve.server import load_models

    name, _, _, folder = family
    llm, _, _ = load_models(str(folder / "model.gguf"), dtype="float32", device="cpu",
                            mmproj=str(folder / "mmproj-f32.gguf"))
    assert llm.takes_images and type(llm.model).__module__ == f"ember.models.{name}"


@pytest.mark.skipif(not (LLAMA_CPP and Path(LLAMA_CPP, "convert_hf_to_gguf.py").is_file()),
                    reason="EMBER_LLAMA_CPP names no llama.cpp source tree")
def test_qwen2_5_vl_files_from_llama_cpp_converter(tmp_path):
    """convert_hf_to_gguf.py writes the decoder (qwen2vl) and --mmproj the tower as mmprojmake does, and
    ember reads its mmproj file to transformers' logits."""
    import gguf

    hf, proc = _qwen2_5_vl(tmp_path)
    script = str(Path(__file__).with_name("llamacpp_convert.py"))
    for out, opts in (("mmproj-real.gguf", ["--mmproj"]), ("model-real.gguf", [])):
        subprocess.run([sys.executable, script, LLAMA_CPP, str(tmp_path), str(tmp_path / out), *opts], check=True,
                       capture_output=True)
    mm.qwen2vl_decoder(hf, tmp_path / "model.gguf", _tk(tmp_path), QWEN_TEMPLATE)
    mm.qwen25vl_mmproj(hf, tmp_path / "mmproj-ours.gguf")
    for real_name, ours_name, prefix in (("mmproj-real.gguf", "mmproj-ours.gguf", "clip."),
                                         ("model-real.gguf", "model.gguf", "qwen2vl.")):
        real, ours = gguf.GGUFReader(tmp_path / real_name), gguf.GGUFReader(tmp_path / ours_name)
        assert {t.name: (t.tensor_type, t.shape.tolist()) for t in real.tensors} == \
            {t.name: (t.tensor_type, t.shape.tolist()) for t in ours.tensors}
        for k in ours.fields:
            if k.startswith(prefix) and k != "qwen2vl.vocab_size":
                assert real.fields[k].contents() == pytest.approx(ours.fields[k].contents()), k
    llm = _load(tmp_path, "mmproj-real.gguf")
    ref_in = _hf_inputs(proc, IMAGES[:2])
    with torch.no_grad():
        d = (hf(**ref_in).logits - llm.model(ref_in["input_ids"], **_pixels(ref_in))).abs().max()
    assert d <= 1e-4, f"logits differ by {d}"
