"""SigLIP 2 NaFlex (`siglip2`) against transformers on tiny random checkpoints: the processor's
patches, patch masks and spatial shapes (images of many aspect ratios, grey, transparent, smaller
than a patch) equal to Siglip2ImageProcessorPil's, image and text embeddings and logits_per_image
equal to Siglip2Model's, with and without the pooling head."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from parity import randomize_  # noqa: E402
from test_vision_parity import TEXTS, _images, _tokenizer  # noqa: E402


def _tiny_siglip2(folder, use_head=True, max_num_patches=20):
    from transformers import Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    tk = _tokenizer(folder, eos_last=False)
    cfg = Siglip2Config(
        text_config=dict(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_size=24),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=4, num_patches=16, vision_use_head=use_head))
    torch.manual_seed(0)
    hf = randomize_(Siglip2Model(cfg).eval(), 0)
    hf.save_pretrained(folder)
    proc = Siglip2ImageProcessorPil(patch_size=4, max_num_patches=max_num_patches)
    proc.save_pretrained(folder)
    return hf, proc


@pytest.mark.parametrize("use_head", [True, False], ids=["head", "mean"])
def test_siglip2_matches_transformers(tmp_path, use_head):
    import ember
    from ember.vision_embeddings import ImageTextEmbedder

    hf, proc = _tiny_siglip2(tmp_path, use_head)
    enc = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    assert isinstance(enc, ImageTextEmbedder)
    images = _images() + [Image.new("RGB", (3, 2), (9, 99, 199)), Image.new("RGB", (200, 7), (1, 2, 3))]
    got = enc.pixel_values(images)
    ref = proc(images, return_tensors="pt", do_convert_rgb=True)  # (transparency on white, as ember)
    for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
        assert got[k].shape == ref[k].shape, k
        assert torch.equal(got[k].to(ref[k].dtype), ref[k]), (k, (got[k].float() - ref[k].float()).abs().max())
    assert len({tuple(s) for s in ref["spatial_shapes"].tolist()}) >= 4  # aspect ratios differ
    assert (ref["pixel_attention_mask"] == 0).any()  # and some images are padded
    ids, mask = enc.tokenize(TEXTS)
    with torch.no_grad():
        if use_head:
            ref_img = hf.get_image_features(**ref).pooler_output
            ref_logits = hf(input_ids=ids, attention_mask=mask, **ref).logits_per_image
        else:  # Siglip2Model needs its head; the patches' masked mean, as Siglip2ForImageClassification pools
            h = hf.vision_model(**ref).last_hidden_state
            m = ref["pixel_attention_mask"][..., None].float()
            ref_img = (h * m).sum(1) / m.sum(1)
        ref_txt = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    img = enc.embed(images=images, batch_size=4)
    txt = enc.embed(TEXTS)
    assert img.shape == ref_img.shape and (img - ref_img).abs().max() < 1e-4
    assert (txt - ref_txt).abs().max() < 1e-4
    if use_head:
        logits = enc.logits(images, TEXTS)
        assert (logits - ref_logits).abs().max() < 1e-3 and ref_logits.std() > 0.01
    assert (enc.embed(images=images[:1]) - img[0]).abs().max() < 1e-4  # alone = in a padded batch


def test_siglip2_bad_processor_configs_are_refused(tmp_path):
    import json

    import ember

    _tiny_siglip2(tmp_path)
    pre = tmp_path / "preprocessor_config.json"
    good = json.loads(pre.read_text())
    for bad, msg in (({"patch_size": 8}, "patch"), ({"max_num_patches": 10**9}, "max_num_patches"),
                     ({"max_num_patches": 60000, "patch_size": 4000}, "more than"), ({"image_std": [0, 1, 1]}, "0")):
        pre.write_text(json.dumps({**good, **bad}))
        with pytest.raises(ember.EmbeddingError, match=msg):
            ember.load(tmp_path, dtype=torch.float32, device="cpu")
