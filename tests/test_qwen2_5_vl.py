"""Qwen2.5-VL (qwen2_5_vl) against transformers on tiny random checkpoints: the processor's pixels,
grids and prompt ids, the vision tower, image+text logits, M-RoPE positions, greedy generation with
images (rope deltas in decode: plain Generator and the engine's static step), text-only prompts,
image and text prompts decoding side by side, both checkpoint layouts, the server, bad images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import ember  # noqa: E402
from parity import assert_varied, tiny_hf_model  # noqa: E402
from test_image_chat import assert_serves_image_chat, _data_url, _png  # noqa: E402
from tinymodels import build_tokenizer  # noqa: E402

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL / Qwen2.5-VL-Instruct's chat template (tokenizer_config.json)
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Two shapes: (text_config, vision_config, processor sizes, checkpoint layout)
SHAPES = {
    # a nested config as transformers writes it; GQA 2:1; windows of 2x2 merged blocks, block 1 full
    "nested": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                            "rope_theta": 10000.0}),
               dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=8, window_size=32,
                    out_hidden_size=64, fullatt_block_indexes=[1]),
               dict(min_pixels=16 * 16 * 4, max_pixels=64 * 64 * 4), "saved"),
    # older Hub form: the decoder's keys at the top level (rope_scaling "mrope"), transformers'
    # in-memory tensor names (model.visual.*, model.language_model.*); head_dim 24, MQA, tied head,
    # windows of 3x3 merged blocks, blocks 0 and 2 full
    "flat": (dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]},
                  rope_theta=100000.0),
             dict(depth=3, hidden_size=48, intermediate_size=64, num_heads=2, patch_size=6, window_size=36,
                  out_hidden_size=96, fullatt_block_indexes=[0, 2]),
             dict(min_pixels=12 * 12 * 4, max_pixels=60 * 60 * 4), "in-memory"),
}


def _image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


IMAGES = [_image(37, 53, 0), _image(90, 40, 1), _image(13, 17, 2, "L")]


def tiny_qwen2_5_vl(folder, shape: str | tuple):
    """(transformers model, its Qwen2_5_VLProcessor) of a tiny Qwen2.5-VL saved in folder (shape: a
    SHAPES key, or such a tuple)."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, \
        Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text, vision, sizes, layout = SHAPES[shape] if isinstance(shape, str) else shape
    tk = build_tokenizer()
    tk.add_special_tokens(SPECIALS)
    tk.save(str(folder / "tokenizer.json"))
    ids = {t: tk.token_to_id(t) for t in SPECIALS}
    eos = tk.token_to_id("<|im_end|>")
    text = dict(vocab_size=tk.get_vocab_size(), **text, bos_token_id=None, eos_token_id=eos,
                tie_word_embeddings=shape == "flat")
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=shape == "flat")
    hf = tiny_hf_model(cfg, Qwen2_5_VLForConditionalGeneration)
    hf.save_pretrained(folder)
    if shape == "flat":
        raw = json.loads((folder / "config.json").read_text())
        flat = {k: v for k, v in raw.pop("text_config").items() if k not in ("rope_parameters", "model_type")}
        (folder / "config.json").write_text(json.dumps({**raw, **flat, **{k: text[k] for k in ("rope_scaling",
                                                                                                  "rope_theta")}}))
    if layout == "in-memory":
        from safetensors.torch import save_file

        (folder / "model.safetensors").unlink()
        sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or shape != "flat"}
        assert any(k.startswith("model.visual.") for k in sd) and any(k.startswith("model.language_model.") for k in sd)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    p = vision["patch_size"]
    improc = Qwen2VLImageProcessorPil(patch_size=p, merge_size=2, temporal_patch_size=2, **sizes)
    improc.save_pretrained(folder)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")

    class Processor(Qwen2_5_VLProcessor):  # without a video processor (that one needs torchvision)
        def check_argument_for_proper_class(self, name, arg):
            if arg is not None:
                return super().check_argument_for_proper_class(name, arg)

    return hf, Processor(image_processor=improc, tokenizer=tok, chat_template=TEMPLATE)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    """(transformers model, its processor, the ember LLM) of one shape."""
    folder = tmp_path_factory.mktemp(f"qwen2_5_vl_{request.param}")
    hf, proc = tiny_qwen2_5_vl(folder, request.param)
    return hf, proc, ember.load(folder, dtype=torch.float32, device="cpu")


def _messages(images, text="The quick brown fox?"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def _ember_messages(images, text="The quick brown fox?"):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": _data_url(_png(im))}}
                                           for im in images), {"type": "text", "text": text}]}]


def _hf_inputs(proc, images, text="The quick brown fox?"):
    return proc.apply_chat_template(_messages(images, text), add_generation_prompt=True, tokenize=True,
                                    return_dict=True, return_tensors="pt")


def _hf_generate(hf, inputs, n=16):
    k = inputs["input_ids"].shape[1]
    with torch.no_grad():
        return hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, k:].tolist()


def test_processor_prompt_ids_and_rope_positions_match_transformers(pair):
    hf, proc, llm = pair
    assert llm.takes_images and type(llm.model).__module__ == "ember.models.qwen2_5_vl"
    for images in ([IMAGES[0]], IMAGES):
        ref = _hf_inputs(proc, images)
        got = llm.image_processor(images)
        assert got["pixel_values"].dtype == torch.float32
        assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
        assert torch.allclose(got["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
        c = llm.chat_inputs(_ember_messages(images))
        assert c.ids == ref["input_ids"][0].tolist()
        want, delta = hf.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                              image_grid_thw=ref["image_grid_thw"])
        assert torch.equal(c.rope_positions, want[:, 0]) and int(delta) < 0  # images fold positions
        assert c.image_embeds.shape == (int((ref["input_ids"] == hf.config.image_token_id).sum()),
                                        hf.config.text_config.hidden_size)


def test_vision_tower_matches_transformers(pair):
    hf, proc, llm = pair
    ref_in = _hf_inputs(proc, IMAGES)
    with torch.no_grad():
        want = hf.model.visual(ref_in["pixel_values"], grid_thw=ref_in["image_grid_thw"]).pooler_output
        got = llm.model.visual(ref_in["pixel_values"], ref_in["image_grid_thw"])
    assert got.shape == want.shape
    d = (want - got).abs().max().item()
    assert d <= 1e-4, f"vision tower outputs differ by {d}"


def test_image_text_logits_match_transformers(pair):
    hf, proc, llm = pair
    for images in ([IMAGES[0]], IMAGES[:2]):
        ref_in = _hf_inputs(proc, images)
        with torch.no_grad():
            want = hf(**ref_in).logits
            got = llm.model(ref_in["input_ids"], pixel_values=ref_in["pixel_values"],
                            image_grid_thw=ref_in["image_grid_thw"])
        d = (want - got).abs().max().item()
        assert d <= 1e-4, f"logits differ by {d}"
        other = _hf_inputs(proc, [IMAGES[1]] * len(images))  # another image of another size: other logits
        with torch.no_grad():
            assert (hf(**other).logits[:, -1] - want[:, -1]).abs().max() > 1e-3


def test_padded_batch_of_image_prompts_matches_transformers(pair):
    """Two image prompts of different lengths (one image, two images) left-padded into one batch
    (attention_mask) give transformers' logits at every real token."""
    hf, proc, llm = pair
    proc.tokenizer.padding_side = "left"
    convs = [_messages([IMAGES[0]], "Hi"), _messages([IMAGES[1], IMAGES[2]], "What are these two?")]
    ref_in = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt", padding=True)
    mask = ref_in["attention_mask"].bool()
    assert not mask.all()
    with torch.no_grad():
        want = hf(**ref_in).logits
        got = llm.model(ref_in["input_ids"], attention_mask=ref_in["attention_mask"],
                        pixel_values=ref_in["pixel_values"], image_grid_thw=ref_in["image_grid_thw"])
    d = (want - got)[mask].abs().max().item()
    assert d <= 1e-4, f"logits differ by {d}"


def test_chat_with_images_greedy_matches_transformers(pair):
    """Greedy continuations after images decode at cache position + the prompt's rope delta."""
    hf, proc, llm = pair
    images = IMAGES[:2]
    ref_in = _hf_inputs(proc, images)
    want = _hf_generate(hf, ref_in)
    assert_varied(want, "an image chat")
    calls = []
    hook = llm.model.visual.merger.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        got = llm.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True)
    finally:
        hook.remove()
    assert got.token_ids == want
    assert calls == [len(ref_in["pixel_values"])]  # the tower ran once, over both images
    assert got.usage.prompt_tokens == ref_in["input_ids"].shape[1]
    # the engine's static decode step (CUDA graphs on a GPU; the same static shapes on CPU)
    fast = llm.with_engine(cuda_graphs=True, max_batch=2, max_len=256)
    assert fast.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True).token_ids == want
    paged = llm.with_engine(cuda_graphs=True, max_batch=2, max_len=256, kv_blocks=32, kv_block=16)  # PagedKVCache
    assert paged.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True).token_ids == want


def test_text_only_prompt_matches_transformers(pair):
    hf, proc, llm = pair
    ref_in = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}],
                                      add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    want = _hf_generate(hf, ref_in)
    c = llm.chat_inputs([{"role": "user", "content": "Once upon a time"}])
    assert c.ids == ref_in["input_ids"][0].tolist() and c.image_embeds is None and c.rope_positions is None
    assert llm.generate(c.ids, 16, ignore_eos=True, temperature=0, details=True).token_ids == want
    with torch.no_grad():  # no images: plain positions, the model alone
        d = (hf(**ref_in).logits - llm.model(ref_in["input_ids"])).abs().max().item()
    assert d <= 1e-4


def test_image_and_text_prompts_decode_together_as_alone(pair):
    """Continuous batching: image prompts (their own rope deltas) and text prompts (delta 0) in one
    decode batch give what each gives alone, in the plain Generator and the engine; a slot an image
    prompt used serves a text prompt next with plain positions again."""
    _, _, llm = pair
    texts = [llm.tokenizer.encode("The capital of France is"), llm.tokenizer.encode("Once upon a time")]
    chats = [llm.chat_inputs(_ember_messages([img])) for img in IMAGES[:2]]

    def requests(model):
        return [model.request(c.ids, 10, ignore_eos=True, temperature=0, image_embeds=c.image_embeds,
                              rope_positions=c.rope_positions) for c in chats] + [
            model.request(t, 10, ignore_eos=True, temperature=0) for t in texts]

    alone = [[ev.token_id for ev in llm.events([r])] for r in requests(llm)]
    assert alone[0] != alone[1]
    fast = llm.with_engine(cuda_graphs=True, max_batch=4, max_len=256)
    for model in (llm, fast):
        reqs = requests(model)
        order = [reqs[0], reqs[2], reqs[1], reqs[3]]  # image, text, image, text in slots 0..3
        out = {r.id: [] for r in reqs}
        for ev in model.generator(order, max_batch=4).run(order):
            out[ev.request.id].append(ev.token_id)
        assert [out[r.id] for r in reqs] == alone
        if model is llm:  # a fresh cache per generator
            continue
        # the slots the image prompts took serve text prompts next (their deltas reset: a text prompt's
        # keys at its plain positions, as the prefix cache keeps them)
        again = requests(model)[2:]
        out = {r.id: [] for r in again}
        gen = model.generator(again, max_batch=4)
        deltas = gen.cache.rope_deltas.values  # the engine's cache persists: slots 0 and 2 hold the image prompts'
        assert deltas[[0, 2]].tolist() == [int(r.rope_positions.max()) + 1 - len(r.prompt_ids) for r in reqs[:2]]
        assert deltas[0] < 0
        for ev in gen.run(again):
            out[ev.request.id].append(ev.token_id)
        assert [out[r.id] for r in again] == alone[2:]
        assert deltas[:2].tolist() == [0, 0]


def test_image_prompt_without_rope_positions_is_refused(pair):
    _, _, llm = pair
    c = llm.chat_inputs(_ember_messages([IMAGES[0]]))
    with pytest.raises(ember.GenerationError, match="rope_positions"):
        llm.request(c.ids, 4, image_embeds=c.image_embeds)
    with pytest.raises(ember.GenerationError, match="rope_positions must be"):
        list(llm.events([llm.request(c.ids, 4, image_embeds=c.image_embeds, rope_positions=c.rope_positions[:2])]))


@pytest.mark.parametrize("img, match", [
    (b"\x89PNG\r\n\x1a\n not really a png", "corrupt|not an image"),
    (_png(_image(3, 700)), "aspect ratio"),
])
def test_bad_images_are_image_errors(pair, img, match):
    _, _, llm = pair
    with pytest.raises(ember.ImageError, match=match):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}}]}], 4)


@pytest.mark.parametrize("change, match", [
    ({"vision_config": {"out_hidden_size": 32}}, "out_hidden_size"),
    ({"vision_config": {"hidden_size": 30, "num_heads": 4}}, "num_heads"),
    ({"vision_config": {"window_size": 4}}, "window_size"),
    ({"text_config": {"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"mrope_section": [2, 2, 2]}}},
     "mrope_section"),
])
def test_bad_configs_are_config_errors(change, match):
    from ember.models import qwen2_5_vl
    from ember.nn.rope import rotary_from_config
    from ember.registry import lookup

    text, vision, _, _ = SHAPES["nested"]
    raw = {"model_type": "qwen2_5_vl", "image_token_id": 5, "text_config": {**text, "vocab_size": 300},
           "vision_config": vision}
    raw = {**raw, **{k: {**raw[k], **v} for k, v in change.items()}}
    with pytest.raises(ember.ConfigError, match=match):
        cfg = lookup(raw).parse_config(raw)
        assert isinstance(cfg, qwen2_5_vl.Config)
        rotary_from_config(cfg.text.raw, cfg.text.head_dim, 128)


def test_default_processor_is_transformers_default():
    """Without preprocessor_config.json: Qwen2VLImageProcessor's defaults (14 px patches, 2x2 merge,
    56*56 .. 28*28*1280 pixels, CLIP's mean and std)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ember.image_patches import GridPatchProcessor

    img = _image(300, 500, 3)
    want = Qwen2VLImageProcessorPil()([img], return_tensors="pt")
    got = GridPatchProcessor.from_file(None)([img])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert torch.allclose(got["pixel_values"], want["pixel_values"], atol=1e-6, rtol=0)


def test_processor_reads_hub_pixel_bounds():
    """Hub checkpoints' preprocessor_config.json spell the bounds min_pixels / max_pixels (winning over
    size, as in transformers)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ember.image_patches import GridPatchProcessor

    d = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 20, "size": {"shortest_edge": 10, "longest_edge": 10 ** 7},
         "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}
    img = _image(300, 500, 4)
    want = Qwen2VLImageProcessorPil(**{k: v for k, v in d.items() if k != "image_processor_type"})([img],
                                                                                                   return_tensors="pt")
    got = GridPatchProcessor.from_dict(d)([img])
    assert want["image_grid_thw"].tolist() == got["image_grid_thw"].tolist()
    assert int(got["image_grid_thw"].prod()) * 14 * 14 <= d["max_pixels"] < 300 * 500  # max_pixels, not size, bound it
    assert torch.allclose(got["pixel_values"], want["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("change, match", [
    ({"max_pixels": 1 << 40}, "max_pixels"),
    ({"min_pixels": 0}, "min_pixels"),
    ({"merge_size": 3}, "not the vision tower's"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std"),
    ({"resample": "bicubic"}, "resample"),
])
def test_bad_processor_configs_are_config_errors(pair, tmp_path, change, match):
    _, _, llm = pair
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"patch_size": llm.model.mm_config.vision.patch_size, "merge_size": 2, **change}))
    with pytest.raises(ember.ConfigError, match=match):
        llm.model.make_image_processor(path)


def test_mrope_rotary_matches_transformers():
    """[3, B, T] positions rotate as transformers' M-RoPE (Qwen2.5-VL's sections, Qwen3-VL's
    interleaved ones); [B, T] positions (text) as plain RoPE."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    from ember.nn.rope import rotary_from_config

    pos = torch.randint(0, 60, (3, 2, 9), generator=torch.Generator().manual_seed(0))
    section = [2, 3, 3]
    ref = Qwen2_5_VLRotaryEmbedding(Qwen2_5_VLConfig(text_config=dict(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                                "rope_theta": 1e4})).text_config)
    rot = rotary_from_config({"rope_scaling": {"type": "mrope", "mrope_section": section}, "rope_theta": 1e4}, 16, 128)
    x = torch.zeros(1)
    for want, got in zip(ref(x, pos), rot(pos, torch.float32)):
        assert torch.equal(want, got)
    plain = rotary_from_config({"rope_theta": 1e4}, 16, 128)
    for want, got in zip(plain(pos[0], torch.float32), rot(pos[0], torch.float32)):
        assert torch.equal(want, got)
    try:
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    except ImportError:
        return
    section = [2, 3, 3]
    ref = Qwen3VLTextRotaryEmbedding(Qwen3VLConfig(text_config=dict(
        hidden_size=64, num_attention_heads=4, head_dim=16,
        rope_parameters={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True,
                         "rope_theta": 1e4})).text_config)
    rot = rotary_from_config({"rope_parameters": {"rope_type": "default", "mrope_section": section,
                                                  "mrope_interleaved": True, "rope_theta": 1e4}}, 16, 128)
    for want, got in zip(ref(x, pos), rot(pos, torch.float32)):
        assert torch.equal(want, got)


def test_server_chat_with_a_data_url_image(pair):
    assert_serves_image_chat(pair[2], _ember_messages([IMAGES[1]], "Tell me about foxes."))
