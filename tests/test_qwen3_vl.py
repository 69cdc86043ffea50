"""Qwen3-VL (qwen3_vl) image+text chat against transformers on tiny random checkpoints of two
shapes: the processor's patches, grids and prompt ids; the vision tower and its DeepStack features;
image+text logits (M-RoPE positions, DeepStack); greedy generation with images and without; bad
images refused; the checkpoint names transformers writes and the older ones."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("PIL")
import ember  # noqa: E402
from parity import assert_varied, tiny_hf_model  # noqa: E402
from test_image_chat import assert_serves_image_chat, IMAGES, _data_url, _image, _png  # noqa: E402
from tinymodels import build_tokenizer  # noqa: E402

SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
# Qwen3-VL's template cut down to its content handling: each image part is
# <|vision_start|><|image_pad|><|vision_end|>
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# (text_config, vision_config, tie_word_embeddings): GQA 2:1 with three deepstack sets' worth of
# layers and 8-pixel patches; 2:1 heads of 32 with one deepstack set, 4-pixel patches, a tied head
SHAPES = {
    "gqa": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3]),
            dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=8, num_position_embeddings=16,
                 deepstack_visual_indexes=[0, 2]), False),
    "tied": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, mrope_section=[6, 5, 5]),
             dict(depth=2, hidden_size=48, intermediate_size=64, num_heads=2, patch_size=4, num_position_embeddings=36,
                  deepstack_visual_indexes=[1]), True),
}
# Qwen3-VL MoE: the first shape's with a Qwen3-MoE decoder (4 experts, top 2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)


def tiny_qwen3_vl(folder, shape="gqa", moe=False):
    """(transformers model, its image processor, its tokenizer) of a tiny Qwen3-VL in `folder`."""
    from transformers import (PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text, vision, tie = SHAPES[shape]
    tk = build_tokenizer()
    tk.add_special_tokens(SPECIALS)
    tk.save(str(folder / "tokenizer.json"))
    ids = {t: tk.token_to_id(t) for t in SPECIALS}
    text = {k: v for k, v in text.items() if k != "mrope_section"}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SHAPES[shape][0]["mrope_section"],
            "mrope_interleaved": True}
    config_class, model_class = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                                 else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    cfg = config_class(text_config=dict(vocab_size=tk.get_vocab_size(), rope_parameters=rope, **text,
                                        eos_token_id=tk.token_to_id("<|im_end|>"), **(MOE if moe else {})),
                        vision_config=dict(out_hidden_size=text["hidden_size"], **vision),
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        tie_word_embeddings=tie)
    hf = tiny_hf_model(cfg, model_class)
    hf.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    factor = vision["patch_size"] * 2
    improc = Qwen2VLImageProcessorPil(patch_size=vision["patch_size"], merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 4 * factor ** 2, "longest_edge": 24 * factor ** 2},
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    improc.save_pretrained(folder)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>")
    return hf, improc, hf_tok


@pytest.fixture(scope="module", params=sorted(SHAPES))
def trio(request, tmp_path_factory):
    """(transformers model, (its image processor, tokenizer), the ember LLM) of one shape."""
    folder = tmp_path_factory.mktemp(f"qwen3vl_{request.param}")
    hf, improc, tok = tiny_qwen3_vl(folder, request.param)
    return hf, (improc, tok), ember.load(folder, dtype=torch.float32, device="cpu")


def _messages(images, text="The quick brown fox?"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def _ember_messages(images, text="The quick brown fox?"):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": _data_url(_png(im))}}
                                           for im in images), {"type": "text", "text": text}]}]


def _hf_inputs(hf, proc, images, text="The quick brown fox?"):
    """What Qwen3VLProcessor gives (its class needs torchvision for its video processor, so its
    steps are taken here: the template, each <|image_pad|> repeated once per merged patch)."""
    improc, tok = proc
    prompt = tok.apply_chat_template(_messages(images, text), chat_template=TEMPLATE, add_generation_prompt=True,
                                     tokenize=False)
    px = improc(images, return_tensors="pt")
    pieces = prompt.split("<|image_pad|>")
    counts = (px["image_grid_thw"].prod(-1) // improc.merge_size ** 2).tolist()
    prompt = pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:]))
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == hf.config.image_token_id).long(), **px}


def test_processor_patches_grids_and_prompt_ids_match_transformers(trio):
    hf, proc, llm = trio
    for images in ([IMAGES[0]], IMAGES):
        ref = _hf_inputs(hf, proc, images)
        got = llm.image_processor(images)
        assert got["pixel_values"].dtype == torch.float32
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
        assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
        c = llm.chat_inputs(_ember_messages(images))
        assert c.ids == ref["input_ids"][0].tolist()
        want, _ = hf.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], ref["image_grid_thw"])
        assert torch.equal(c.rope_positions, want[:, 0])


def test_vision_tower_and_deepstack_match_transformers(trio):
    hf, proc, llm = trio
    ref_in = _hf_inputs(hf, proc, IMAGES)
    with torch.no_grad():
        ref = hf.model.visual(ref_in["pixel_values"], grid_thw=ref_in["image_grid_thw"])
        tokens, deepstack = llm.model.visual(ref_in["pixel_values"], ref_in["image_grid_thw"])
    assert len(deepstack) == len(ref.deepstack_features) == len(hf.config.vision_config.deepstack_visual_indexes)
    for want, got in [(ref.pooler_output, tokens), *zip(ref.deepstack_features, deepstack)]:
        assert got.shape == want.shape
        assert (want - got).abs().max().item() <= 1e-4


def test_image_text_logits_match_transformers(trio):
    hf, proc, llm = trio
    for images in ([IMAGES[0]], IMAGES[:2]):
        ref_in = _hf_inputs(hf, proc, images)
        px, grid, ids = ref_in["pixel_values"], ref_in["image_grid_thw"], ref_in["input_ids"]
        with torch.no_grad():
            ref = hf(**ref_in).logits
            got = llm.model(ids, pixel_values=px, image_grid_thw=grid)
            d = (ref - got).abs().max().item()
            assert d <= 1e-4, f"logits differ by {d}"
            # what each part contributes: another image, plain positions, no DeepStack each change them
            other = _hf_inputs(hf, proc, [_image(*im.size[::-1], seed=9) for im in images])
            assert torch.equal(other["image_grid_thw"], grid)
            changed = llm.model(ids, pixel_values=other["pixel_values"], image_grid_thw=grid)
            assert (changed - got).abs().max() > 1e-2
            feats = llm.model.encode_images({"pixel_values": px, "image_grid_thw": grid})
            plain = torch.arange(ids.shape[1]).expand(3, 1, -1)
            assert (llm.model(ids, image_embeds=feats, rope_position_ids=plain) - got).abs().max() > 1e-3
            no_deepstack = torch.cat([feats[:, :1], torch.zeros_like(feats[:, 1:])], dim=1)
            pos, _ = hf.model.get_rope_index(ids, ref_in["mm_token_type_ids"], grid)
            assert (llm.model(ids, image_embeds=feats, rope_position_ids=pos) - got).abs().max() <= 1e-5
            assert (llm.model(ids, image_embeds=no_deepstack, rope_position_ids=pos) - got).abs().max() > 1e-3


def test_padded_batch_of_image_prompts_matches_transformers(trio):
    """Two image prompts of different lengths, left-padded: each row's M-RoPE positions skip its
    padding, as transformers' get_rope_index does."""
    hf, proc, llm = trio
    a, b = _hf_inputs(hf, proc, [IMAGES[0]]), _hf_inputs(hf, proc, [IMAGES[1]], "Hi")
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, x in enumerate((a, b)):
        n = x["input_ids"].shape[1]
        ids[i, T - n:], mask[i, T - n:] = x["input_ids"][0], 1
    px = torch.cat([a["pixel_values"], b["pixel_values"]])
    grid = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, image_grid_thw=grid,
                 mm_token_type_ids=(ids == hf.config.image_token_id).long()).logits
        got = llm.model(ids, attention_mask=mask, pixel_values=px, image_grid_thw=grid)
    keep = mask.bool()
    assert (ref[keep] - got[keep]).abs().max().item() <= 1e-4


def test_chat_with_images_greedy_matches_transformers(trio):
    hf, proc, llm = trio
    images = IMAGES[:2]
    ref_in = _hf_inputs(hf, proc, images)
    n = ref_in["input_ids"].shape[1]
    with torch.no_grad():
        want = hf.generate(**ref_in, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, n:].tolist()
    assert_varied(want, "an image chat")
    calls = []
    hook = llm.model.visual.register_forward_pre_hook(lambda m, args: calls.append(args[1].shape[0]))
    try:
        got = llm.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True)
    finally:
        hook.remove()
    assert got.token_ids == want
    assert calls == [len(images)]  # the tower ran once, over both images
    assert got.usage.prompt_tokens == n
    # the engine's static decode step (CUDA graphs on a GPU; the same static shapes on CPU)
    fast = llm.with_engine(cuda_graphs=True, max_batch=2, max_len=128)
    assert fast.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True).token_ids == want


def test_text_only_prompt_matches_transformers(trio):
    hf, _, llm = trio
    ids = llm.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits
        assert (ref - llm.model(torch.tensor([ids]))).abs().max().item() <= 1e-4
        want = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(ids):].tolist()
    assert llm.generate(ids, 16, ignore_eos=True, temperature=0, details=True).token_ids == want


def test_image_prompt_batches_with_text_prompts(trio):
    """An image chat generated beside a text one (continuous batching, a prefix cache on): what
    each gives alone."""
    _, _, llm = trio
    c = llm.chat_inputs(_ember_messages([IMAGES[0]]))
    text = llm.tokenizer.encode("Once upon a time")
    reqs = [llm.request(c.ids, 12, ignore_eos=True, temperature=0, image_embeds=c.image_embeds,
                        rope_positions=c.rope_positions),
            llm.request(text, 12, ignore_eos=True, temperature=0)]
    alone = [[ev.token_id for ev in llm.events([r])] for r in reqs]
    llm.enable_prefix_cache(1 << 24)
    try:
        for _ in range(2):  # the second round would hit the cache if the image prompt entered it
            out = {r.id: [] for r in reqs}
            for ev in llm.generator(reqs).run(reqs):
                out[ev.request.id].append(ev.token_id)
            assert [out[r.id] for r in reqs] == alone
    finally:
        llm.enable_prefix_cache(0)


@pytest.mark.parametrize("url, match", [
    (_data_url(b"\x89PNG\r\n\x1a\n not really a png"), "corrupt|not an image"),
    (_data_url(_png(_image(8, 8))[:60]), "corrupt or truncated"),
    ("https://example.com/cat.png", "does not download images"),
    (_data_url(_png(_image(1, 300))), "aspect ratio"),
])
def test_bad_images_are_image_errors(trio, url, match):
    _, _, llm = trio
    with pytest.raises(ember.ImageError, match=match):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is it?"}]}], 4)


def test_older_checkpoint_names_load(trio, tmp_path):
    """Checkpoints saved before transformers 5 name the decoder model.*, the tower visual.*; the Hub's
    configs give M-RoPE as rope_scaling without mrope_interleaved (Qwen3-VL interleaves anyway)."""
    from safetensors.torch import load_file, save_file

    hf, proc, llm = trio
    src = llm._loaded.snapshot.root
    renamed = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        renamed[k] = v
    assert any(k.startswith("visual.") for k in renamed) and any(k.startswith("model.layers.") for k in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg["text_config"].pop("rope_parameters")
    cfg["text_config"].update(rope_theta=rope["rope_theta"], rope_scaling={"rope_type": "default",
                                                                         "mrope_section": rope["mrope_section"]})
    cfg["vision_config"].update(model_type="qwen3_vl")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    ref_in = _hf_inputs(hf, proc, [IMAGES[0]])
    args = (ref_in["input_ids"],)
    kw = {"pixel_values": ref_in["pixel_values"], "image_grid_thw": ref_in["image_grid_thw"]}
    with torch.no_grad():
        assert torch.equal(old.model(*args, **kw), llm.model(*args, **kw))


@pytest.mark.parametrize("change, match", [
    ({"text_config": {"rope_parameters": {"mrope_section": [2, -3, 3]}}}, "mrope_section"),
    ({"vision_config": {"out_hidden_size": 48}}, "out_hidden_size"),
    ({"vision_config": {"deepstack_visual_indexes": [0, 5]}}, "deepstack_visual_indexes"),
    ({"vision_config": {"num_position_embeddings": 10}}, "square"),
])
def test_bad_configs_are_config_errors(change, match):
    from ember.registry import lookup

    raw = {"model_type": "qwen3_vl", "image_token_id": 5,
           "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16,
                           "rope_parameters": {"mrope_section": [2, 3, 3]}, **change.get("text_config", {})},
           "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 4, "out_hidden_size": 64,
                             "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
                             **change.get("vision_config", {})}}
    with pytest.raises(ember.ConfigError, match=match):
        lookup(raw).parse_config(raw)


def test_server_chat_with_a_data_url_image(trio):
    assert_serves_image_chat(trio[2], _ember_messages([IMAGES[1]], "Tell me about foxes."))


def test_qwen3_vl_moe_matches_transformers(tmp_path):
    """qwen3_vl_moe: image+text logits and a greedy image chat as transformers', from the expert
    layout transformers 5 saves and from the Hub's (experts transposed)."""
    from safetensors.torch import load_file, save_file

    hf, *proc = tiny_qwen3_vl(tmp_path, moe=True)
    llm = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    assert llm.config.model_type == "qwen3_vl_moe"
    images = IMAGES[:2]
    ref_in = _hf_inputs(hf, proc, images)
    n = ref_in["input_ids"].shape[1]
    args = (ref_in["input_ids"],)
    kw = {"pixel_values": ref_in["pixel_values"], "image_grid_thw": ref_in["image_grid_thw"]}
    with torch.no_grad():
        got = llm.model(*args, **kw)
        assert (hf(**ref_in).logits - got).abs().max().item() <= 1e-4
        want = hf.generate(**ref_in, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, n:].tolist()
    assert_varied(want, "an image chat")
    assert llm.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True).token_ids == want
    hub = tmp_path / "hub"
    hub.mkdir()
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()}
    save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
    (hub / "config.json").write_bytes((tmp_path / "config.json").read_bytes())
    with torch.no_grad():
        assert torch.equal(ember.load(hub, dtype=torch.float32, device="cpu").model(*args, **kw), got)
