"""Image+text chat (llava, gemma3) against transformers on tiny random checkpoints: the processors'
pixel tensors and prompt ids (transformers' processor with the same chat template), logits of
image+text prompts, greedy continuations; images through the server's /v1/chat/completions with the
official openai client; bad images refused with ImageErrors (bounded: header sizes checked first)."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import ember  # noqa: E402
from parity import assert_varied, tiny_hf_model  # noqa: E402
from tinymodels import build_tokenizer  # noqa: E402

SPECIALS = ["<image>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# llava-1.5-hf's template (without its {% generation %} marks): the images first, then the text
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Gemma 3's template, cut down to its content handling: each image part is <start_of_image>
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}{{ '<start_of_turn>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def _image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _tokenizer(folder):
    tk = build_tokenizer()
    tk.add_special_tokens(SPECIALS)
    tk.save(str(folder / "tokenizer.json"))
    return tk


def _write_tokenizer_config(folder, template, **extra):
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template,
        **extra}))


def _hf_tokenizer(folder, **extra):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", **extra)


def tiny_llava(folder, strategy="default", feature_layer=-2):
    """(transformers model, its processor) of a tiny LLaVA (Llama decoder, CLIP tower) saved in folder."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tk = _tokenizer(folder)
    image = tk.token_to_id("<image>")
    cfg = LlavaConfig(text_config=dict(model_type="llama", vocab_size=tk.get_vocab_size(), **TEXT,
                                       eos_token_id=tk.token_to_id("<|im_end|>"), bos_token_id=None),
                      vision_config=dict(model_type="clip_vision_model", **VISION), image_token_index=image,
                      vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer)
    hf = tiny_hf_model(cfg, LlavaForConditionalGeneration)
    hf.save_pretrained(folder)
    _write_tokenizer_config(folder, LLAVA_TEMPLATE)
    improc = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    improc.save_pretrained(folder)
    proc = LlavaProcessor(image_processor=improc, tokenizer=_hf_tokenizer(folder), patch_size=8,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)
    return hf, proc


def tiny_gemma3(folder, sliding_window=8, layer_types=("sliding_attention", "full_attention")):
    """(transformers model, its processor) of a tiny Gemma 3 (SigLIP tower, 4 tokens per image)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tk = _tokenizer(folder)
    ids = {k: tk.token_to_id(v) for k, v in GEMMA3_TOKENS.items()}
    cfg = Gemma3Config(text_config=dict(vocab_size=tk.get_vocab_size(), **TEXT, sliding_window=sliding_window,
                                        layer_types=list(layer_types),
                                        eos_token_id=tk.token_to_id("<|im_end|>"), bos_token_id=None, pad_token_id=0),
                       vision_config=dict(**VISION, vision_use_head=False), mm_tokens_per_image=4,
                       image_token_index=ids["image_token"], boi_token_index=ids["boi_token"],
                       eoi_token_index=ids["eoi_token"])
    hf = tiny_hf_model(cfg, Gemma3ForConditionalGeneration)
    with torch.no_grad():  # transformers initialises the projection to zeros: images would change nothing
        w = hf.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    hf.save_pretrained(folder)
    _write_tokenizer_config(folder, GEMMA3_TEMPLATE)
    improc = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    improc.save_pretrained(folder)
    proc = Gemma3Processor(image_processor=improc, tokenizer=_hf_tokenizer(folder, extra_special_tokens=GEMMA3_TOKENS),
                           image_seq_length=4, chat_template=GEMMA3_TEMPLATE)
    return hf, proc


MODELS = {"llava": tiny_llava, "gemma3": tiny_gemma3}


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """(transformers model, its processor, the ember LLM) of one family."""
    folder = tmp_path_factory.mktemp(request.param)
    hf, proc = MODELS[request.param](folder)
    return hf, proc, ember.load(folder, dtype=torch.float32, device="cpu")


def _messages(images, text="The quick brown fox?"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def _hf_inputs(proc, images, text="The quick brown fox?"):
    return proc.apply_chat_template(_messages(images, text), add_generation_prompt=True, tokenize=True,
                                    return_dict=True, return_tensors="pt")


def _ember_messages(images, text="The quick brown fox?"):
    """The same chat as OpenAI content parts (data: URLs)."""
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": _data_url(_png(im))}}
                                           for im in images), {"type": "text", "text": text}]}]


IMAGES = [_image(37, 53, 0), _image(64, 20, 1), _image(13, 17, 2, "L")]


def test_pixels_and_prompt_ids_match_transformers_processor(pair):
    hf, proc, llm = pair
    for images in ([IMAGES[0]], IMAGES):
        ref = _hf_inputs(proc, images)
        got = llm.image_processor(images)
        assert got.dtype == torch.float32 and torch.equal(got, ref["pixel_values"])
        _, ids, embeds = llm.chat_prompt(_ember_messages(images))
        assert ids == ref["input_ids"][0].tolist()
        assert embeds.shape == (len(images) * llm.model.tokens_per_image, hf.config.text_config.hidden_size)


def test_image_text_logits_match_transformers(pair):
    hf, proc, llm = pair
    for images in ([IMAGES[0]], IMAGES[:2]):
        ref_in = _hf_inputs(proc, images)
        with torch.no_grad():
            ref = hf(**ref_in).logits
            got = llm.model(ref_in["input_ids"], pixel_values=ref_in["pixel_values"])
        d = (ref - got).abs().max().item()
        assert d <= 1e-4, f"logits differ by {d}"
        # the image matters: another image gives other logits
        other = _hf_inputs(proc, [IMAGES[2]] * len(images))["pixel_values"]
        with torch.no_grad():
            assert (llm.model(ref_in["input_ids"], pixel_values=other) - got).abs().max() > 1e-2


def test_chat_with_images_greedy_matches_transformers(pair):
    hf, proc, llm = pair
    images = IMAGES[:2]
    ref_in = _hf_inputs(proc, images)
    n = len(ref_in["input_ids"][0])
    with torch.no_grad():
        want = hf.generate(**ref_in, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, n:].tolist()
    assert_varied(want, "an image chat")
    calls = []
    hook = llm.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        got = llm.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True)
    finally:
        hook.remove()
    assert got.token_ids == want
    assert calls == [len(images)]  # the tower and projector ran once, over both images
    assert got.usage.prompt_tokens == n
    # PIL images, paths and bytes in transformers' {"type": "image"} form give the same
    again = llm.chat(_messages([images[0], _png(images[1])]), 16, ignore_eos=True, temperature=0, details=True)
    assert again.token_ids == want
    # the engine's static decode step (CUDA graphs on a GPU; the same static shapes on CPU)
    fast = llm.with_engine(cuda_graphs=True, max_batch=2, max_len=128)
    assert fast.chat(_ember_messages(images), 16, ignore_eos=True, temperature=0, details=True).token_ids == want


def test_image_prompts_batch_with_text_prompts(pair):
    """An image chat generated beside text-only ones (continuous batching) gives what it gives alone,
    and the prefix cache never serves an image prompt's keys to another image."""
    _, _, llm = pair
    text = [llm.tokenizer.encode("The capital of France is"), llm.tokenizer.encode("Once upon a time")]
    reqs = []
    for img in IMAGES[:2]:
        _, ids, embeds = llm.chat_prompt(_ember_messages([img]))
        reqs.append(llm.request(ids, 12, ignore_eos=True, temperature=0, image_embeds=embeds))
    alone = []
    for r in reqs:
        alone.append([ev.token_id for ev in llm.events([r])])
    llm.enable_prefix_cache(1 << 24)
    try:
        for _ in range(2):  # the second round would hit the cache if image prompts entered it
            mixed = reqs + [llm.request(t, 12, ignore_eos=True, temperature=0) for t in text]
            out = {r.id: [] for r in mixed}
            for ev in llm.generator(mixed).run(mixed):
                out[ev.request.id].append(ev.token_id)
            assert [out[r.id] for r in reqs] == alone
    finally:
        llm.enable_prefix_cache(0)
    assert alone[0] != alone[1]


def test_llava_full_strategy_and_layer_list(tmp_path):
    """vision_feature_select_strategy "full" (the class token kept) and a list of feature layers."""
    hf, _ = tiny_llava(tmp_path, strategy="full", feature_layer=[-1, 0])
    llm = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    assert llm.model.tokens_per_image == 17
    pixels = llm.image_processor([IMAGES[0]])
    ids = torch.tensor([[5, 6] + [hf.config.image_token_index] * 17 + [7, 8, 9]])
    with torch.no_grad():
        d = (hf(input_ids=ids, pixel_values=pixels).logits - llm.model(ids, pixel_values=pixels)).abs().max().item()
    assert d <= 1e-4


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (its CRC fixed): a decompression bomb's header."""
    data = bytearray(_png(_image(4, 4)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("url, match", [
    (_data_url(b"\x89PNG\r\n\x1a\n not really a png"), "corrupt|not an image"),
    (_data_url(_png(_image(8, 8))[:60]), "corrupt or truncated"),
    (_data_url(_png_claiming(100_000, 100_000)), "decompression bomb"),
    (_data_url(_png_claiming(10_000, 9_000)), "claims more than"),
    (_data_url(b"hello", "text/plain"), "not an image"),
    ("data:image/png;base64,@@@@", "base64 is malformed"),
    ("https://example.com/cat.png", "does not download images"),
    ("ftp://example.com/cat.png", "unsupported URL scheme"),
    ("/no/such/file.png", "cannot read"),
])
def test_bad_images_are_image_errors(pair, url, match):
    _, _, llm = pair
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ember.ImageError, match=match):
        llm.chat(_ember_messages([]) + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                 4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20, f"refusing the image took {peak:,} bytes"


def test_data_url_size_checked_before_decoding(pair, monkeypatch):
    import ember.image_chat

    _, _, llm = pair
    monkeypatch.setattr(ember.image_chat, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ember.ImageError, match="more than the 1,000 bytes"):
        llm.chat_prompt(_ember_messages([_image(64, 64)]))


@pytest.mark.parametrize("change, match", [
    ({"vision_feature_layer": 7}, "vision_feature_layer"),
    ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
    ({"text_config": {"model_type": "bert"}}, "not a text decoder"),
    ({"text_config": {"model_type": "llama", "hidden_size": -1}}, "text_config"),
    ({"vision_config": {"image_size": 30, "patch_size": 8}}, "multiple of patch_size"),
])
def test_bad_llava_configs_are_config_errors(change, match):
    from ember.registry import lookup

    raw = {"model_type": "llava", "image_token_index": 5, "text_config": {"model_type": "llama", **TEXT},
           "vision_config": VISION, **change}
    with pytest.raises(ember.ConfigError, match=match):
        lookup(raw).parse_config(raw)


def test_bad_gemma3_vision_config_is_a_config_error():
    from ember.registry import lookup

    raw = {"model_type": "gemma3", "mm_tokens_per_image": 3, "text_config": TEXT, "vision_config": VISION}
    with pytest.raises(ember.ConfigError, match="mm_tokens_per_image"):
        lookup(raw).parse_config(raw)


def test_text_only_model_refuses_images(tiny_chat):
    llm = ember.load(tiny_chat, dtype=torch.float32, device="cpu")
    assert not llm.takes_images
    with pytest.raises(ember.GenerationError, match="takes text only"):
        llm.chat(_ember_messages([IMAGES[0]]), 4)


def test_too_many_images(pair):
    _, _, llm = pair
    with pytest.raises(ember.ImageError, match="more than 16 images"):
        llm.chat_prompt(_ember_messages([IMAGES[2]] * 17))


def assert_serves_image_chat(llm, messages) -> None:
    """`llm` behind `ember serve`'s app answers `messages` (with images) through the official openai
    client as llm.chat does (text and prompt tokens), and a corrupt image is a 400 invalid_image."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_serve import running_server

    from ember.serve import create_app

    want = llm.chat(messages, 12, ignore_eos=True, temperature=0, details=True)
    with running_server(create_app(llm, model_name="vlm", max_batch=2)) as url, \
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        r = client.chat.completions.create(model="vlm", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == want.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="vlm", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(b"garbage")}}]}])
        assert e.value.code == "invalid_image"


# ---- the server ---------------------------------------------------------------------------------
def test_server_chat_with_a_data_url_image(pair, tiny_chat):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_serve import running_server

    from ember.serve import create_app

    _, _, llm = pair
    messages = _ember_messages([IMAGES[0]], "Tell me about foxes.")
    want = llm.chat(messages, 12, ignore_eos=True, temperature=0, details=True)
    app = create_app(llm, model_name="vlm", max_batch=2)
    with running_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                                   timeout=60) as client:
        r = client.chat.completions.create(model="vlm", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == want.usage.prompt_tokens
        chunks = client.chat.completions.create(model="vlm", messages=messages, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True}, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        import httpx

        tok = httpx.post(url + "/tokenize", json={"model": "vlm", "messages": messages}, timeout=60).json()
        assert tok["count"] == want.usage.prompt_tokens  # the image's tokens counted as the chat counts them
        bad = httpx.post(url + "/tokenize", json={"model": "vlm", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(b"garbage")}}]}]}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
        for bad, code in ((_data_url(b"garbage"), "invalid_image"), ("/etc/passwd", "invalid_image"),
                          ("https://example.com/x.png", "invalid_image")):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="vlm", max_tokens=2, messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}])
            assert e.value.code == code and e.value.status_code == 400
    text_llm = ember.load(tiny_chat, dtype=torch.float32, device="cpu")
    with running_server(create_app(text_llm, model_name="tiny")) as url, \
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert e.value.code == "unsupported_content" and "takes no images" in e.value.message


# ---- the command line ---------------------------------------------------------------------------
def test_cli_run_and_chat_with_images(tmp_path, capsys):
    """`ember run MODEL PROMPT --image PATH` answers as llm.chat with that image part; in `ember chat`,
    `/image PATH` attaches an image to the next message, and an unreadable one is reported while the
    chat goes on."""
    from ember import cli

    folder = tmp_path / "llava"
    folder.mkdir()
    tiny_llava(folder)
    llm = ember.load(folder, dtype=torch.float32, device="cpu")
    path = tmp_path / "fox.png"
    IMAGES[0].save(path)
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                        {"type": "text", "text": "What is it?"}]}
    want = llm.chat([user], 8, temperature=0, ignore_eos=True)
    assert want != llm.chat([{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}], 8,
                            temperature=0, ignore_eos=True)  # the image changes the answer
    opts = ["-n", "8", "-t", "0", "--dtype", "float32", "--device", "cpu"]
    assert cli.main(["run", str(folder), "What", "is", "it?", "--image", str(path), *opts]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert cli.main(["run", str(folder), "What is it?", "--image", str(tmp_path / "missing.png"), *opts]) == 1
    assert "ember: error:" in capsys.readouterr().err

    import io
    import sys

    turns = f"/image {tmp_path / 'missing.png'}\nWhat is it?\n/image {path}\nWhat is it?\n"
    old = sys.stdin
    sys.stdin = io.StringIO(turns)
    try:
        assert cli.main(["chat", str(folder), *opts]) == 0
    finally:
        sys.stdin = old
    out = capsys.readouterr()
    assert "missing.png" in out.err and out.out == want + "\n"  # the bad turn is dropped; the next is answered
