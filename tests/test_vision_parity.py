"""CLIP and SigLIP against transformers on tiny random checkpoints: the image processors' pixel
tensors (odd sizes, grey, palette and transparent images, images smaller than the crop), image and
text embeddings, logits_per_image; bad images refused with EmbeddingErrors."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from parity import randomize_  # noqa: E402

SPECIALS = ["<pad>", "<start>", "<end>"]
CORPUS = ["a photo of a cat", "a photo of a dog", "two dogs playing in the snow", "a red car", "the night sky"] * 10
TEXTS = ["a photo of a cat", "a red car in the snow", "dog", "the night sky and a photo of two cats playing"]


def _tokenizer(folder, eos_last: bool):
    """A BPE tokenizer wrapping texts in <start> ... <end>; eos_last puts <end> at the top id (as
    real CLIP vocabularies do: older configs pool the highest id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = SPECIALS[:2] if eos_last else SPECIALS
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=80, special_tokens=specials, show_progress=False))
    if eos_last:
        tk.add_special_tokens(["<end>"])
    start, end = tk.token_to_id("<start>"), tk.token_to_id("<end>")
    tk.post_processor = processors.TemplateProcessing(single="<start> $A <end>", special_tokens=[("<start>", start),
                                                                                                  ("<end>", end)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "<end>"}))
    return tk


def _images():
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    rgba = Image.fromarray(rng.integers(0, 256, (41, 29, 4), dtype=np.uint8), "RGBA")
    pal = rgb(30, 50).convert("P")
    pal.info["transparency"] = 3
    return [rgb(37, 53), rgb(64, 64), rgb(90, 20), rgba, rgb(13, 17).convert("L"), pal, rgb(8, 9)]


def _tiny_clip(folder, eos_last=True):
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tk = _tokenizer(folder, eos_last)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2 if not eos_last else tk.token_to_id("<end>")),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    hf = randomize_(CLIPModel(cfg).eval(), 0)
    hf.save_pretrained(folder)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(folder)
    return hf, proc


def _tiny_siglip(folder, use_head=True):
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tk = _tokenizer(folder, eos_last=False)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_size=24),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, vision_use_head=use_head))
    torch.manual_seed(0)
    hf = randomize_(SiglipModel(cfg).eval(), 0)
    hf.save_pretrained(folder)
    proc = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    proc.save_pretrained(folder)
    return hf, proc


def _check(hf, proc, folder, pad_to_max: bool):
    import ember
    from ember.vision_embeddings import ImageTextEmbedder

    enc = ember.load(folder, dtype=torch.float32, device="cpu", task="image-text")
    assert isinstance(enc, ImageTextEmbedder)
    with pytest.raises(ember.ArgumentError, match="task='image-text'"):
        ember.load(folder, dtype=torch.float32, device="cpu", task="generate")
    images = _images()
    px = enc.pixel_values(images)
    ref_px = proc(images, return_tensors="pt")["pixel_values"]
    assert px.dtype == torch.float32 and px.shape == ref_px.shape
    assert torch.equal(px, ref_px), f"pixel values differ by {(px - ref_px).abs().max()}"

    ids, mask = enc.tokenize(TEXTS)
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for i, t in enumerate(TEXTS):  # the tokenizer's own ids, then padding
        want = tk.encode(t).ids
        assert ids[i, :len(want)].tolist() == want and mask[i].sum() == len(want)
    assert ids.shape[1] == (16 if pad_to_max else max(len(tk.encode(t).ids) for t in TEXTS))
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=ref_px).pooler_output
        ref_txt = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        ref_logits = hf(input_ids=ids, attention_mask=mask, pixel_values=ref_px).logits_per_image
    img = enc.embed(images=images, batch_size=3)
    txt = enc.embed(TEXTS, batch_size=2)
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    assert (img - ref_img).abs().max() < 1e-4
    assert (txt - ref_txt).abs().max() < 1e-4
    logits = enc.logits(images, TEXTS)
    assert logits.shape == (len(images), len(TEXTS))
    assert (logits - ref_logits).abs().max() < 1e-3
    assert ref_logits.std() > 0.01  # the towers discriminate: the check can fail
    for i, t in enumerate(TEXTS):  # a text alone gives what it gives in the padded batch
        assert (enc.embed([t]) - txt[i]).abs().max() < 1e-4
    n = enc.embed(images=images[:2], normalize=True)
    assert torch.allclose(n.norm(dim=-1), torch.ones(2))
    return enc


@pytest.mark.parametrize("eos_last", [True, False], ids=["eos-id", "legacy-eos-2-argmax"])
def test_clip_matches_transformers(tmp_path, eos_last):
    hf, proc = _tiny_clip(tmp_path, eos_last)
    _check(hf, proc, tmp_path, pad_to_max=False)


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_matches_transformers(tmp_path, use_head):
    hf, proc = _tiny_siglip(tmp_path, use_head)
    if not use_head:  # transformers has no pooled image output without the head: compare the tokens' mean
        import ember

        enc = ember.load(tmp_path, dtype=torch.float32, device="cpu")
        px = proc(_images(), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ref = hf.vision_model(pixel_values=px).last_hidden_state.mean(dim=1)
        assert (enc.embed(images=_images()) - ref).abs().max() < 1e-4
        return
    _check(hf, proc, tmp_path, pad_to_max=True)


def test_clip_processor_defaults_without_preprocessor_config(tmp_path):
    """No preprocessor_config.json: CLIP's defaults at the tower's image size (OpenAI mean/std,
    shortest edge, center crop), as CLIPImageProcessor(size=..., crop_size=...)."""
    import ember
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _tiny_clip(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    enc = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    ref = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert torch.equal(enc.pixel_values(_images()), ref(_images(), return_tensors="pt")["pixel_values"])


@pytest.fixture(scope="module")
def clip_enc(tmp_path_factory):
    import ember

    folder = tmp_path_factory.mktemp("clip")
    _tiny_clip(folder)
    return ember.load(folder, dtype=torch.float32, device="cpu")


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def _lying_png(w: int, h: int) -> bytes:
    """A small PNG whose header claims w x h pixels (its CRC fixed up, so only the size is wrong)."""
    import struct
    import zlib

    data = bytearray(_png(4, 4))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", w, h)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def test_images_from_paths_and_bytes_match_pil(clip_enc, tmp_path):
    img = _images()[0]
    p = tmp_path / "a.png"
    img.save(p)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    a = clip_enc.embed(images=[img, str(p), p, buf.getvalue()])
    assert (a - a[0]).abs().max() == 0


@pytest.mark.parametrize("bad,what", [
    (b"not an image at all", "not an image"),
    (_png(20, 20)[:60], "corrupt or truncated"),
    ("/nonexistent/cat.jpg", "cannot read"),
    (Image.new("RGB", (0, 0)), "no pixels"),
    (_lying_png(100_000, 100_000), "more than the"),
    (_lying_png(0x7FFFFFFF, 3), "more than the"),
    (_lying_png(10_000, 9_500), "more than the"),  # between Pillow's warning and error thresholds
    (3, "expected a PIL image"),
], ids=["garbage", "truncated", "missing", "zero-size", "bomb", "bomb-wide", "over-limit", "wrong-type"])
def test_bad_images_are_embedding_errors(clip_enc, bad, what):
    import ember

    with pytest.raises(ember.EmbeddingError, match=what):
        clip_enc.embed(images=[_images()[1], bad])


def test_bad_embed_arguments(clip_enc):
    import ember

    for kw in ({}, {"texts": ["a"], "images": [_images()[0]]}, {"images": []}, {"texts": []},
               {"texts": ["a"], "batch_size": 0}, {"texts": ["a"], "normalize": "yes"}):
        with pytest.raises(ember.EmbeddingError):
            clip_enc.embed(**kw)


def test_bad_preprocessor_config_is_refused(tmp_path):
    import ember

    _tiny_clip(tmp_path)
    for bad in ({"size": {"shortest_edge": 10**9}}, {"image_std": [0, 1, 1]}, {"resample": "cubic"},
                {"crop_size": {"height": 31, "width": 32}}, {"size": "big"}):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(bad))
        with pytest.raises(ember.EmbeddingError):
            ember.load(tmp_path, dtype=torch.float32, device="cpu")
