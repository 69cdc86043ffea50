"""Images in /v1/embeddings (serve/image_inputs.py) for CLIP and SigLIP served with `create_app`,
through the openai client and raw httpx: image content parts (data: URLs, the short form, bare
base64) and texts mixed in one request, each embedding equal to transformers' get_image_features /
get_text_features; bad parts (URLs, bad base64, non-images, a header claiming gigapixels, a
text-only model) answered 400 naming the item."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("PIL")

from test_serve import StubEmbedder, TIMEOUT, running_server  # noqa: E402
from test_vision_parity import _images, _lying_png, _tiny_clip, _tiny_siglip  # noqa: E402


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module", params=["clip", "siglip"])
def served(request, tmp_path_factory):
    import ember
    from ember.serve import create_app

    folder = tmp_path_factory.mktemp(request.param)
    hf, proc = (_tiny_clip if request.param == "clip" else _tiny_siglip)(folder)
    enc = ember.load(folder, dtype=torch.float32, device="cpu")
    app = create_app(None, enc, embedding_model_name=request.param)
    with running_server(app) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as client:
            yield request.param, hf, proc, enc, client, url


def test_images_and_texts_match_transformers(served):
    name, hf, proc, enc, client, _ = served
    images = _images()[:4]  # RGB of odd sizes and an RGBA one
    pngs = [_png(im) for im in images]
    texts = ["a photo of a cat", "a red car"]
    items = [{"type": "image_url", "image_url": {"url": _url(pngs[0])}}, texts[0],
             {"type": "image_url", "image_url": _url(pngs[1])},
             {"type": "image_url", "image_url": {"url": base64.b64encode(pngs[2]).decode()}},
             {"type": "text", "text": texts[1]},
             {"type": "image_url", "image_url": {"url": _url(pngs[3])}}]
    got = client.embeddings.create(model=name, input=items)  # the client passes the parts through as JSON
    vecs = torch.tensor([d.embedding for d in got.data])
    from PIL import Image

    decoded = [Image.open(io.BytesIO(p)) for p in pngs]  # what the server decodes (PNG round trip)
    ids, mask = enc.tokenize(texts)
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=proc(decoded, return_tensors="pt")["pixel_values"]).pooler_output
        ref_txt = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    want = torch.stack([ref_img[0], ref_txt[0], ref_img[1], ref_img[2], ref_txt[1], ref_img[3]])
    assert vecs.shape == want.shape
    assert (vecs - want).abs().max() < 1e-4
    assert got.usage.prompt_tokens == int(mask.sum())  # the texts' tokens; images count none
    b64 = client.embeddings.create(model=name, input=items[:1], encoding_format="base64")
    assert np.allclose(np.frombuffer(base64.b64decode(b64.data[0].embedding), "<f4"), vecs[0].numpy())


def test_bad_image_parts_are_400s_naming_the_item(served):
    import httpx

    name, _, _, _, client, url = served
    ok = {"type": "image_url", "image_url": {"url": _url(_png(_images()[0]))}}
    cases = [({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "fetches no URL"),
             ({"type": "image_url", "image_url": {"url": "/etc/passwd"}}, "reads no file"),
             ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
             ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "expected an image type"),
             ({"type": "image_url", "image_url": {"url": _url(b"not an image at all")}}, "not an image ember reads"),
             ({"type": "image_url", "image_url": {"url": _url(_lying_png(100_000, 100_000))}}, "pixels"),
             ({"type": "image_url"}, "needs 'image_url'"), ({"type": "audio"}, "'text' or 'image_url'"),
             ({"type": "text", "text": ""}, "non-empty")]
    for part, msg in cases:
        r = httpx.post(url + "/v1/embeddings", json={"model": name, "input": ["fine", ok, part]}, timeout=TIMEOUT)
        assert r.status_code == 400, (part, r.text)
        err = r.json()["error"]
        assert msg in err["message"] and "input[2]" in err["message"] and err["param"] == "input", err
    assert len(client.embeddings.create(model=name, input=[ok]).data) == 1  # still serving


def test_text_only_model_refuses_images():
    import httpx

    from ember.serve import create_app

    app = create_app(None, StubEmbedder(None), embedding_model_name="stub")
    with running_server(app) as url:
        part = {"type": "image_url", "image_url": {"url": _url(_png(_images()[0]))}}
        r = httpx.post(url + "/v1/embeddings", json={"model": "stub", "input": ["a", part]}, timeout=TIMEOUT)
        assert r.status_code == 400 and "takes text only" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/embeddings", json={"model": "stub", "input": ["a", "b"]}, timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
