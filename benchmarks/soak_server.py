"""Soak test for `ember serve`: many concurrent streaming clients on loopback for minutes, with random
lengths, random disconnects and a sprinkling of bad and hostile requests: malformed bodies, echo with
out-of-range token ids, lone surrogates (generation and embeddings), too many or too long stop
strings, n past the batch, legal-but-heavy stop strings (16 x 1024 characters), abandoned
2,048-text embedding requests and slowloris connections (headers a byte at a time). A share of the
chat clients' requests (--agent-rate) are agent traffic, streamed or not: forced tool calls
(`tool_choice` "required" or a named function) and `response_format` json_schema outputs.

Pass criteria (exit status 1 otherwise):
  * 0 errors on good requests (every good request gets a complete, well-formed answer, streamed or not);
  * every agent request's output is valid: a forced tool call names an offered (or the named) function
    and its arguments parse and validate (`jsonschema`) against that function's parameters; a
    json_schema output parses and validates against its schema (streamed ones are assembled first);
    one cut short (finish_reason "length": escaped characters can outgrow the token budget, the tiny
    model's context is 512 tokens) is counted as truncated, not validated;
  * every bad request gets a 4xx with an OpenAI-style error body (never a 5xx or a dropped connection);
  * every slowloris connection is answered with a 408 (or reset) and closed within --read-timeout + 15 s;
  * 0 leaked slots: once the clients stop, /health and /metrics (ember_num_requests_running and
    _waiting) report 0;
  * memory flat: the server's RSS is sampled through the run; start (after warm-up), end, max and the
    trend (MB/min, least squares) are reported. The trend is informative (a soak of a few minutes on
    a shared machine is noisy); `--max-growth-mb` makes growth past warm-up a failure.

By default it starts the server itself (a subprocess on 127.0.0.1) with the tiny random chat model
(tests/tinymodels.py); `--model` takes any model ember loads (`smollm2`: the SmolLM2-135M-Instruct
test fixture). Traffic stays on 127.0.0.1; every loop is bounded by `--duration` (and each request
by a timeout).

    python benchmarks/soak_server.py                               # 64 clients, 5 minutes, tiny model
    python benchmarks/soak_server.py --duration 30                 # a smoke run
    python benchmarks/soak_server.py --model smollm2 --clients 32 --duration 600 --json soak.json
    python benchmarks/soak_server.py --model default --clients 16 --duration 60 --agent-rate 0.3

With the tiny model the server also gets a tiny random BERT (tests/tinyencoders.py) as its embedding
model (`--no-embeddings` to leave it out; with --url, --embedding-model-name names the server's) and a
tiny random Whisper (5 s windows, made here with transformers) on /v1/audio/transcriptions
(`--no-transcriptions` to leave it out; with --url, --transcription-model-name names the server's):
good uploads (1-12 s WAVs in every response_format) must be answered 200, bad audio (corrupt,
empty, a header claiming more than the server's hour) with a 4xx.

`--images` (with the tiny model) serves image+text models instead: a tiny random LLaVA as the chat
model (a share of its chat requests carry one or two data: URL images, PNG or JPEG of random sizes)
and a tiny random CLIP as the embedding model (requests mix images and texts); bad media (corrupt
data, a PNG header claiming gigapixels, a remote URL, 17 images, a text part where an image belongs)
must get a 4xx.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server  # noqa: E402
from bench_server import TOPICS, resolve_model  # noqa: E402

CHAT, COMP, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
ASR = "/v1/audio/transcriptions"
ROOT = Path(__file__).resolve().parents[1]


def tiny_embedding_model() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import tinyencoders

    d = tinyencoders.tiny_bert(Path(tempfile.mkdtemp(prefix="ember-soak-bert-")) / "tiny-bert")
    return str(tinyencoders.add_sentence_transformers(d, normalize=True))


def tiny_whisper_model() -> str:
    """A tiny random Whisper folder (5 s windows, all 251 timestamp tokens, a word-level tokenizer)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    d = Path(tempfile.mkdtemp(prefix="ember-soak-whisper-")) / "tiny-whisper"
    cfg = WhisperConfig(vocab_size=358, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                        max_source_positions=250, max_target_positions=64, decoder_start_token_id=101,
                        eos_token_id=100, pad_token_id=100, bos_token_id=100)
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(cfg).eval()
    hf.generation_config = GenerationConfig(
        decoder_start_token_id=101, eos_token_id=100, pad_token_id=100, bos_token_id=100, no_timestamps_token_id=106,
        is_multilingual=True, lang_to_id={"<|en|>": 102, "<|de|>": 103}, task_to_id={"translate": 104, "transcribe": 105},
        max_initial_timestamp_index=50, max_length=64)
    hf.save_pretrained(d)
    WhisperFeatureExtractor(feature_size=80, chunk_length=5).save_pretrained(d)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
                           "<|transcribe|>", "<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(251)])
    tk.save(str(d / "tokenizer.json"))
    return str(d)


def tiny_vlm_model() -> str:
    """A tiny random LLaVA (Llama decoder, CLIP tower, 32x32 images) as tests/test_image_chat.py makes it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_image_chat import tiny_llava

    d = Path(tempfile.mkdtemp(prefix="ember-soak-llava-")) / "tiny-llava"
    d.mkdir()
    tiny_llava(d)
    return str(d)


def tiny_clip_model() -> str:
    """A tiny random CLIP (image and text towers) as tests/test_vision_parity.py makes it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_vision_parity import _tiny_clip

    d = Path(tempfile.mkdtemp(prefix="ember-soak-clip-")) / "tiny-clip"
    d.mkdir()
    _tiny_clip(d)
    return str(d)


def image_url(rng: random.Random) -> str:
    """A data: URL of a random image (8-96 pixels a side, PNG or JPEG, RGB or grey)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    h, w = rng.randint(8, 96), rng.randint(8, 96)
    img = Image.fromarray(np.random.default_rng(rng.randint(0, 10**6)).integers(0, 256, (h, w, 3), dtype=np.uint8))
    if rng.random() < 0.2:
        img = img.convert("L")
    fmt = rng.choice(["PNG", "JPEG"])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def png_claiming(width: int, height: int) -> str:
    """A data: URL of a PNG whose header claims width x height (and holds no such pixels)."""
    import base64
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return "data:image/png;base64," + base64.b64encode(png + b"\x00" * 64).decode()


def wav_bytes(samples, rate: int = 16000) -> bytes:
    import io
    import wave

    import numpy as np

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def multipart(fields: dict, audio: bytes, filename: str = "a.wav") -> tuple[bytes, str]:
    """(body, content-type) of a multipart/form-data upload."""
    boundary = "ember-soak-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + audio + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_server(model: str, args, log: Path):
    """bench_server's launcher, with this run's body limit, read timeout and embedding model passed on."""
    popen = bench_server.subprocess.Popen

    def with_body_limit(cmd, *a, **kw):
        extra = ["--max-body-mb", str(args.max_body_mb), "--read-timeout", str(args.read_timeout)]
        if args.embedding_model_name:
            extra += ["--embedding-model", args.embedding_model_name]
        if args.transcription_model_name:
            extra += ["--transcription-model", args.transcription_model_name]
        return popen([*cmd, *extra], *a, **kw)

    bench_server.subprocess.Popen = with_body_limit
    try:
        return bench_server.start_server(model, args.max_batch, args.max_len, log, args.threads)
    finally:
        bench_server.subprocess.Popen = popen


def bad_requests(model: str, max_body: int, embedding_model: str | None = None,
                 max_batch: int = 8, transcription_model: str | None = None, images: bool = False) -> list[tuple]:
    """(name, path, raw body[, content type]): requests that must be refused with a 4xx (the last one is
    the big body)."""
    ok = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    emb = []
    if images:
        import base64

        def with_images(*urls):
            return json.dumps({**ok, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]
            }).encode()

        def embed_image(url):
            return json.dumps({"model": embedding_model, "input": [
                "a text", {"type": "image_url", "image_url": {"url": url}}]}).encode()

        junk = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really" * 20).decode()
        emb += [("image-corrupt", CHAT, with_images(junk)),
                ("image-claims-gigapixels", CHAT, with_images(png_claiming(60_000, 60_000))),
                ("image-remote-url", CHAT, with_images("https://example.com/cat.png")),
                ("image-local-path", CHAT, with_images("/etc/passwd")),
                ("image-bad-base64", CHAT, with_images("data:image/png;base64,@@@@")),
                ("images-17", CHAT, with_images(*[png_claiming(8, 8)] * 17)),
                ("image-part-without-url", CHAT, json.dumps({**ok, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {}}]}]}).encode()),
                ("embed-image-corrupt", EMB, embed_image(junk)),
                ("embed-image-claims-gigapixels", EMB, embed_image(png_claiming(60_000, 60_000))),
                ("embed-image-remote-url", EMB, embed_image("https://example.com/cat.png"))]
    if embedding_model:
        emb += [("surrogate-embed", EMB, b'{"model": %s, "input": ["ok", "a\\ud800b"]}' % json.dumps(embedding_model).encode()),
               ("embed-too-many", EMB, json.dumps({"model": embedding_model, "input": ["a"] * 2049}).encode())]

    if transcription_model:
        import numpy as np

        f = {"model": transcription_model}
        emb += [("audio-corrupt", ASR, *multipart(f, b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)),
                ("audio-empty", ASR, *multipart(f, b"")),
                ("audio-noise", ASR, *multipart(f, bytes(range(256)) * 64)),
                ("audio-claims-hours", ASR, *multipart(f, wav_bytes(np.zeros(4000, np.float32), rate=1))),
                ("audio-bad-format", ASR, *multipart({**f, "response_format": "docx"}, wav_bytes(np.zeros(800)))),
                ("audio-as-json", ASR, json.dumps(f).encode())]

    def j(obj) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("invalid-json", CHAT, b'{"model": "x", "messages": ['),
        ("not-an-object", CHAT, b"[1, 2, 3]"),
        ("non-utf8", CHAT, b'{"model": "\xff\xfe"}'),
        ("deep-json", CHAT, b"[" * 50_000 + b"]" * 50_000),
        ("int-digits", COMP, b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
        ("unknown-model", CHAT, j({**ok, "model": "nope"})),
        ("bad-temperature", CHAT, j({**ok, "temperature": 7})),
        ("nan-top-p", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}'
         % model.encode()),
        ("bad-role", CHAT, j({**ok, "messages": [{"role": "wizard", "content": "x"}]})),
        ("no-messages", CHAT, j({"model": model})),
        ("n-huge", CHAT, j({**ok, "n": 10**9})),
        ("stops-1e5", CHAT, j({**ok, "stop": ["x"] * 100_000})),
        ("negative-max-tokens", COMP, j({"model": model, "prompt": "x", "max_tokens": -1})),
        ("bad-token-id", COMP, j({"model": model, "prompt": [10**12]})),
        ("huge-prompt", COMP, j({"model": model, "prompt": "fox " * 500_000})),
        ("surrogate", COMP, b'{"model": "%s", "prompt": "a\\ud800b"}' % model.encode()),
        ("empty-prompt", COMP, j({"model": model, "prompt": ""})),
        ("echo-id-neg", COMP, j({"model": model, "prompt": [5, -1], "echo": True})),
        ("echo-id-1e30", COMP, j({"model": model, "prompt": [10**30], "echo": True})),
        ("echo-id-2^64", COMP, j({"model": model, "prompt": [[5], [2**64]], "echo": True})),
        ("stop-too-long", CHAT, j({**ok, "stop": ["s" * 20_000] * 16})),
        ("stops-17", CHAT, j({**ok, "stop": [f"s{i}" for i in range(17)]})),
        ("n-past-batch", CHAT, j({**ok, "n": max(128, max_batch + 1)})),
        *emb,
        ("body-too-large", COMP, b'{"model": "m", "prompt": "' + b"a" * (max_body + 1) + b'"}'),
    ]


class Stats:
    def __init__(self):
        self.good = self.good_errors = self.disconnects = self.bad = self.bad_unexpected = 0
        self.hostile: dict[str, int] = {}  # hostile-but-legal traffic sent, by kind
        self.slow_failures = 0
        self.tokens = 0
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.error_samples: list[str] = []
        self.bad_by_kind: dict[str, dict[int, int]] = {}
        self.agent: dict[str, int] = {}  # agent requests sent, by kind
        self.agent_valid = self.agent_invalid = self.agent_truncated = 0

    def error(self, what: str) -> None:
        self.good_errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(what[:300])


async def good_request(http: httpx.AsyncClient, rng: random.Random, args, st: Stats) -> None:
    chat = rng.random() < 0.5
    n_tok = rng.randint(1, args.max_tokens)
    topic = rng.choice(TOPICS)
    words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(0, 40)))
    if chat:
        path = CHAT
        content: str | list = f"Tell me about {topic}. {words}"
        if args.images:  # LLaVA's template reads content parts; a third of the requests carry images
            content = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": image_url(rng)}}
                for _ in range(rng.choice([0, 0, 0, 0, 1, 2]))]
        body = {"model": args.model_name, "messages": [{"role": "user", "content": content}],
                "max_tokens": n_tok, "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 10**6)}
    else:
        path = COMP
        body = {"model": args.model_name, "prompt": f"A story about {topic}: {words}", "max_tokens": n_tok,
                "temperature": rng.choice([0, 0.8])}
    stream = rng.random() < 0.85
    disconnect = stream and rng.random() < args.disconnect_rate
    cancel_early = not disconnect and rng.random() < args.disconnect_rate / 4
    t0 = time.perf_counter()
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    try:
        if cancel_early:  # the client gives up before (or while) the answer starts
            try:
                await asyncio.wait_for(http.post(path, json=body), timeout=rng.uniform(0.001, 0.2))
                st.good += 1
            except asyncio.TimeoutError:
                st.disconnects += 1
            return
        if not stream:
            r = await http.post(path, json=body)
            if r.status_code != 200:
                st.error(f"{path} {r.status_code} {r.text[:200]}")
                return
            out = r.json()
            ch = out["choices"][0]
            if ch.get("finish_reason") not in ("stop", "length") or out["usage"]["completion_tokens"] > n_tok:
                st.error(f"bad response {json.dumps(out)[:200]}")
                return
            st.good += 1
            st.tokens += out["usage"]["completion_tokens"]
            st.latency.append(time.perf_counter() - t0)
            return
        keep = rng.randint(1, 6) if disconnect else None
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                st.error(f"{path} {r.status_code} {(await r.aread())[:200]!r}")
                return
            n_data, finish, usage, done, first = 0, None, None, False, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                obj = json.loads(payload)
                if "error" in obj:
                    st.error(f"error event {payload[:200]}")
                    return
                if first is None:
                    first = time.perf_counter() - t0
                n_data += 1
                for c in obj.get("choices") or []:
                    finish = c.get("finish_reason") or finish
                if obj.get("usage"):
                    usage = obj["usage"]
                if keep is not None and n_data >= keep:
                    st.disconnects += 1  # leaving the block closes the connection mid-stream
                    return
        if not done or finish not in ("stop", "length") or usage is None or usage["completion_tokens"] > n_tok:
            st.error(f"incomplete stream: done={done} finish={finish} usage={usage}")
            return
        st.good += 1
        st.tokens += usage["completion_tokens"]
        st.latency.append(time.perf_counter() - t0)
        if first is not None:
            st.ttft.append(first)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        st.error(f"{type(e).__name__}: {e}")


# ---- agent traffic: forced tool calls and json_schema outputs (issue 16) --------------------------
# Every string is bounded, so a valid output always fits in AGENT_MAX_TOKENS.
AGENT_MAX_TOKENS = 200
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 24},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}},
     "required": ["name", "age", "color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "ok": {"type": "boolean"},
        "where": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                  "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["score", "ok", "where"], "additionalProperties": False},
]


AGENT_KINDS = ["tool-required", "tool-named", "json-schema"]


def agent_body(rng: random.Random, model_name: str, kinds=AGENT_KINDS) -> tuple[str, dict]:
    """(kind, body): a forced tool call (required / named) or a json_schema output."""
    kind = rng.choice(kinds)
    topic = rng.choice(TOPICS)
    body = {"model": model_name, "max_tokens": AGENT_MAX_TOKENS, "temperature": rng.choice([0, 0.7, 1.0]),
            "seed": rng.randint(0, 10**6)}
    if kind == "json-schema":
        i = rng.randrange(len(SCHEMAS))
        body["messages"] = [{"role": "user", "content": f"Describe {topic} as JSON."}]
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}
    else:
        body["messages"] = [{"role": "user", "content": f"What is the weather in the city of {topic}? Or add 2 and 3."}]
        body["tools"] = TOOLS
        body["tool_choice"] = "required" if kind == "tool-required" else \
            {"type": "function", "function": {"name": rng.choice(TOOLS)["function"]["name"]}}
    return kind, body


def check_agent(body: dict, message: dict, finish: str | None) -> str | None:
    """None if the answer is valid for the request, else what is wrong."""
    try:
        if "response_format" in body:
            if finish != "stop":
                return f"json_schema: finish_reason {finish}"
            jsonschema.validate(json.loads(message.get("content") or ""),
                                body["response_format"]["json_schema"]["schema"])
            return None
        calls = message.get("tool_calls") or []
        if finish != "tool_calls" or not calls:
            return f"forced tool call: finish_reason {finish}, {len(calls)} calls, content {message.get('content')!r:.80}"
        params = {t["function"]["name"]: t["function"]["parameters"] for t in body["tools"]}
        named = body["tool_choice"]["function"]["name"] if isinstance(body["tool_choice"], dict) else None
        for call in calls:
            name = call["function"]["name"]
            if name not in params or (named and name != named):
                return f"tool call to {name!r} (offered {sorted(params)}, named {named})"
            if not call.get("id"):
                return "tool call without an id"
            jsonschema.validate(json.loads(call["function"]["arguments"]), params[name])
        return None
    except (ValueError, jsonschema.ValidationError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {getattr(e, 'message', str(e))[:200]}"


async def agent_request(http: httpx.AsyncClient, rng: random.Random, args, st: "Stats") -> None:
    kind, body = agent_body(rng, args.model_name, args.agent_kinds)
    stream = rng.random() < 0.5
    key = f"{kind}-{'stream' if stream else 'plain'}"
    st.agent[key] = st.agent.get(key, 0) + 1
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await http.post(CHAT, json=body)
            if r.status_code != 200:
                st.error(f"agent {key}: {r.status_code} {r.text[:200]}")
                return
            out = r.json()
            ch = out["choices"][0]
            message, finish, tokens = ch["message"], ch.get("finish_reason"), out["usage"]["completion_tokens"]
        else:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            content, calls, finish, usage, done = [], {}, None, None, False
            async with http.stream("POST", CHAT, json=body) as r:
                if r.status_code != 200:
                    st.error(f"agent {key}: {r.status_code} {(await r.aread())[:200]!r}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line[6:] == "[DONE]":
                        done = True
                        break
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        st.error(f"agent {key}: error event {line[6:206]}")
                        return
                    for c in obj.get("choices") or []:
                        finish = c.get("finish_reason") or finish
                        delta = c.get("delta") or {}
                        content.append(delta.get("content") or "")
                        for tc in delta.get("tool_calls") or []:  # OpenAI's chunks: id and name first, then arguments
                            call = calls.setdefault(tc["index"], {"id": None, "function": {"name": "", "arguments": ""}})
                            call["id"] = tc.get("id") or call["id"]
                            fn = tc.get("function") or {}
                            call["function"]["name"] += fn.get("name") or ""
                            call["function"]["arguments"] += fn.get("arguments") or ""
                    usage = obj.get("usage") or usage
            if not done or usage is None:
                st.error(f"agent {key}: incomplete stream: done={done} usage={usage}")
                return
            message = {"content": "".join(content), "tool_calls": [calls[i] for i in sorted(calls)]}
            tokens = usage["completion_tokens"]
        if finish == "length":  # cut short (max_tokens or the context): a legal answer, nothing to validate
            st.good += 1
            st.agent_truncated += 1
            st.tokens += tokens
            return
        wrong = check_agent(body, message, finish)
        if wrong:
            st.agent_invalid += 1
            st.error(f"agent {key}: {wrong}")
            return
        st.good += 1
        st.agent_valid += 1
        st.tokens += tokens
        st.latency.append(time.perf_counter() - t0)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        st.error(f"agent {key}: {type(e).__name__}: {e}")


async def bad_request(http: httpx.AsyncClient, rng: random.Random, bads, st: Stats) -> None:
    # the oversized body is rare (it sends 8+ MiB over loopback)
    name, path, raw, *ctype = rng.choice(bads[:-1]) if rng.random() > 0.05 else bads[-1]
    st.bad += 1
    kind = st.bad_by_kind.setdefault(name, {})
    try:
        r = await http.post(path, content=raw, headers={"content-type": ctype[0] if ctype else "application/json"})
        kind[r.status_code] = kind.get(r.status_code, 0) + 1
        err = r.json().get("error") if 400 <= r.status_code < 500 else None
        if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
            st.bad_unexpected += 1
            if len(st.error_samples) < 20:
                st.error_samples.append(f"bad request {name}: {r.status_code} {r.text[:200]}")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        kind[-1] = kind.get(-1, 0) + 1
        st.bad_unexpected += 1
        if len(st.error_samples) < 20:
            st.error_samples.append(f"bad request {name}: {type(e).__name__}: {e}")


async def slowloris(url: str, args, st: Stats) -> None:
    """Headers a byte every 0.5 s: the server must answer 408 and close within --read-timeout (+ slack)."""
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError as e:
        st.slow_failures += 1
        st.error_samples.append(f"slowloris: connect: {e}")
        return

    async def drip():
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            for _ in range(10_000):
                await asyncio.sleep(0.5)
                writer.write(b"a")
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            return

    task = asyncio.create_task(drip())
    try:
        data = await asyncio.wait_for(reader.read(), args.read_timeout + 15)
        ok = data.startswith(b"HTTP/1.1 408")
    except ConnectionResetError:  # closed with dripped bytes unread: the kernel resets instead of a clean close
        ok, data = True, b""
    except (asyncio.TimeoutError, OSError) as e:
        ok, data = False, repr(e).encode()
    finally:
        task.cancel()
        writer.close()
    if not ok:
        st.slow_failures += 1
        if len(st.error_samples) < 20:
            st.error_samples.append(f"slowloris: {data[:120]!r} after {time.monotonic() - t0:.1f}s")


async def hostile_request(http: httpx.AsyncClient, url: str, rng: random.Random, args, st: Stats) -> None:
    """Legal but costly, or abusive traffic (outcomes checked: good ones must succeed)."""
    kinds = ["long-stops", "n-batch", "slowloris"] + (["abandoned-embed"] if args.embedding_model_name else [])
    kind = rng.choice(kinds)
    st.hostile[kind] = st.hostile.get(kind, 0) + 1
    if kind == "slowloris":
        return await slowloris(url, args, st)
    if kind == "abandoned-embed":  # 2,048 texts, and the client leaves at once
        try:
            await http.post(EMB, json={"model": args.embedding_model_name,
                                       "input": [f"{rng.choice(TOPICS)} {i}" for i in range(2048)]},
                            timeout=httpx.Timeout(args.request_timeout, read=0.2))
            st.good += 1
        except httpx.ReadTimeout:
            st.disconnects += 1
        return
    body = {"model": args.model_name, "messages": [{"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}"}],
            "max_tokens": rng.randint(1, args.max_tokens), "temperature": 0.7}
    if kind == "long-stops":  # the most a request may ask: 16 stop strings of 1,024 characters
        body["stop"] = ["".join(rng.choice("ab ") for _ in range(1024)) for _ in range(16)]
    else:  # every slot for one call: others must still get theirs
        body["n"] = args.max_batch
    try:
        r = await http.post(CHAT, json=body)
        if r.status_code != 200 or len(r.json()["choices"]) != body.get("n", 1):
            st.error(f"hostile {kind}: {r.status_code} {r.text[:200]}")
        else:
            st.good += 1
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        st.error(f"hostile {kind}: {type(e).__name__}: {e}")


async def good_embedding(http: httpx.AsyncClient, rng: random.Random, args, st: Stats) -> None:
    texts: list = [f"{rng.choice(TOPICS)} {rng.choice(TOPICS)}" for _ in range(rng.randint(1, 8))]
    if args.images:  # CLIP: images and texts in one request
        texts += [{"type": "image_url", "image_url": {"url": image_url(rng)}} for _ in range(rng.randint(0, 3))]
    try:
        r = await http.post(EMB, json={"model": args.embedding_model_name, "input": texts, "encoding_format": "float"})
        if r.status_code != 200 or len(r.json()["data"]) != len(texts):
            st.error(f"embeddings {r.status_code} {r.text[:200]}")
        else:
            st.good += 1
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        st.error(f"embeddings {type(e).__name__}: {e}")


async def good_transcription(http: httpx.AsyncClient, rng: random.Random, args, st: Stats) -> None:
    import numpy as np

    seconds = rng.uniform(1, 12)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t))
    fmt = rng.choice(["json", "text", "verbose_json", "srt", "vtt"])
    body, ctype = multipart({"model": args.transcription_model_name, "response_format": fmt,
                             "language": rng.choice(["en", "de"])}, wav_bytes(x))
    try:
        r = await http.post(ASR, content=body, headers={"content-type": ctype})
        ok = r.status_code == 200 and (fmt not in ("json", "verbose_json") or "text" in r.json())
        if not ok:
            st.error(f"transcription {r.status_code} {r.text[:200]}")
        else:
            st.good += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        st.error(f"transcription {type(e).__name__}: {e}")


async def client(cid: int, url: str, args, deadline: float, bads, st: Stats) -> None:
    rng = random.Random(args.seed * 1000 + cid)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
        while time.monotonic() < deadline:
            x = rng.random()
            if x < args.bad_rate:
                await bad_request(http, rng, bads, st)
            elif x < args.bad_rate + args.hostile_rate:
                await hostile_request(http, url, rng, args, st)
            elif args.embedding_model_name and x < args.bad_rate + args.hostile_rate + 0.05:
                await good_embedding(http, rng, args, st)
            elif args.transcription_model_name and x < args.bad_rate + args.hostile_rate + 0.08:
                await good_transcription(http, rng, args, st)
            elif rng.random() < args.agent_rate:
                await agent_request(http, rng, args, st)
            else:
                await good_request(http, rng, args, st)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sampler(url: str, pid: int | None, every: float, deadline: float, samples: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            try:
                h = (await http.get("/health")).json()
            except (httpx.HTTPError, ValueError):
                h = {}
            samples.append((time.monotonic() - t0, rss_mb(pid), h.get("running"), h.get("waiting")))
            await asyncio.sleep(every)


def gauges(text: str) -> dict:
    """ember_num_requests_running / _waiting from /metrics (Prometheus text)."""
    out = {}
    for line in text.splitlines():
        for name in ("running", "waiting"):
            if line.startswith(f"ember_num_requests_{name} "):
                out[name] = float(line.split()[1])
    return out


async def settle(url: str, timeout: float) -> tuple[dict, dict | None]:
    """/health and /metrics once the clients are gone: running and waiting must drop to 0 (the
    metrics are None when the server has no /metrics)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        end = time.monotonic() + timeout
        h, m = {}, None
        while time.monotonic() < end:
            h = (await http.get("/health")).json()
            r = await http.get("/metrics")
            m = gauges(r.text) if r.status_code == 200 else None
            if h.get("running") == 0 and h.get("waiting") == 0 and (m is None or not any(m.values())):
                break
            await asyncio.sleep(0.2)
        return h, m


def trend(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, MB per minute."""
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(url: str, pid: int | None, args) -> dict:
    bads = bad_requests(args.model_name, args.max_body_mb * (1 << 20), args.embedding_model_name, args.max_batch,
                        args.transcription_model_name, args.images)
    st = Stats()
    samples: list = []
    t0 = time.monotonic()
    deadline = t0 + args.duration
    tasks = [asyncio.create_task(client(i, url, args, deadline, bads, st)) for i in range(args.clients)]
    samp = asyncio.create_task(sampler(url, pid, args.sample_every, deadline + args.request_timeout, samples))
    # clients finish the request in flight after the deadline (each bounded by --request-timeout)
    done, pending = await asyncio.wait(tasks, timeout=args.duration + args.request_timeout + 30)
    for t in pending:
        t.cancel()
    samp.cancel()
    wall = time.monotonic() - t0
    health, metrics = await settle(url, 60)
    rss_end = rss_mb(pid)
    warm = [(t, r) for t, r, _, _ in samples if r is not None and t >= args.warmup]
    rss_all = [r for _, r, _, _ in samples if r is not None]
    return {
        "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1), "model": args.model,
        "good_requests": st.good, "good_errors": st.good_errors, "disconnects": st.disconnects,
        "bad_requests": st.bad, "bad_unexpected": st.bad_unexpected,
        "bad_by_kind": {k: {str(c): n for c, n in v.items()} for k, v in sorted(st.bad_by_kind.items())},
        "hostile_by_kind": dict(sorted(st.hostile.items())), "slowloris_not_closed": st.slow_failures,
        "completion_tokens": st.tokens, "tokens_per_s": round(st.tokens / wall, 1),
        "latency_p50_s": pct(st.latency, 0.5), "latency_p99_s": pct(st.latency, 0.99),
        "ttft_p50_s": pct(st.ttft, 0.5), "ttft_p99_s": pct(st.ttft, 0.99),
        "agent_by_kind": dict(sorted(st.agent.items())), "agent_valid": st.agent_valid,
        "agent_invalid": st.agent_invalid, "agent_truncated": st.agent_truncated,
        "health_after": health, "metrics_after": metrics,
        "leaked_slots": max((health.get("running") or 0) + (health.get("waiting") or 0),
                            int(sum((metrics or {}).values()))),
        "rss_start_mb": round(warm[0][1], 1) if warm else None, "rss_end_mb": round(rss_end, 1) if rss_end else None,
        "rss_max_mb": round(max(rss_all), 1) if rss_all else None,
        "rss_trend_mb_per_min": round(trend(warm), 2),
        "rss_samples_mb": [round(r, 1) for _, r, _, _ in samples[:: max(1, len(samples) // 30)] if r is not None],
        "max_running_seen": max((s[2] or 0 for s in samples), default=None),
        "max_waiting_seen": max((s[3] or 0 for s in samples), default=None),
        "error_samples": st.error_samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default), smollm2, default (ember's default model: "
                                                    "SmolLM2-135M-Instruct Q4_1 GGUF), or anything ember.load takes")
    ap.add_argument("--url", default=None, help="a running server (then RSS is read from --pid, if given)")
    ap.add_argument("--pid", type=int, default=None, help="the --url server's process id, for RSS samples")
    ap.add_argument("--model-name", default="soak", help="the served model name (with --url: the server's)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=48, help="good requests ask for 1..N tokens")
    ap.add_argument("--bad-rate", type=float, default=0.05, help="share of requests that are bad")
    ap.add_argument("--hostile-rate", type=float, default=0.05,
                    help="share of requests that are legal but hostile (long stops, n = batch, abandoned embeddings, "
                         "slowloris)")
    ap.add_argument("--read-timeout", type=float, default=5.0, help="the server's --read-timeout (slowloris bound)")
    ap.add_argument("--embedding-model-name", default=None, help="with --url: the server's embedding model, if any")
    ap.add_argument("--no-embeddings", action="store_true", help="start the server without an embedding model")
    ap.add_argument("--transcription-model-name", default=None,
                    help="with --url: the server's speech-to-text model, if any")
    ap.add_argument("--no-transcriptions", action="store_true", help="start the server without a Whisper model")
    ap.add_argument("--images", action="store_true",
                    help="with the tiny model: serve a tiny LLaVA and a tiny CLIP, and send images to both")
    ap.add_argument("--agent-rate", type=float, default=0.3,
                    help="share of good requests that are agent traffic (forced tool calls, json_schema; with the "
                         "tiny model json_schema only); 0: none")
    ap.add_argument("--disconnect-rate", type=float, default=0.1, help="share of streams dropped mid-way")
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--sample-every", type=float, default=2.0, help="RSS / health sampling period (s)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before RSS counts (default 10%% of the run)")
    ap.add_argument("--max-body-mb", type=float, default=8, help="the server's body limit (to test past it)")
    ap.add_argument("--max-growth-mb", type=float, default=None, help="fail if RSS grows more past warm-up")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args()
    if args.warmup is None:
        args.warmup = max(5.0, 0.1 * args.duration)
    # the tiny model's 512-token context cannot hold the tools' definitions (its tokens are short)
    args.agent_kinds = ["json-schema"] if args.model == "tiny" and not args.url else AGENT_KINDS
    proc = None
    if args.url:
        url, pid = args.url, args.pid
        if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise SystemExit("soak_server.py only talks to loopback servers")
    else:
        log = Path(tempfile.mkdtemp(prefix="ember-soak-")) / "server.log"
        if args.images and args.model != "tiny":
            raise SystemExit("--images goes with the tiny model (it serves a tiny LLaVA and a tiny CLIP)")
        model = tiny_vlm_model() if args.images else resolve_model(args.model)
        if not args.no_embeddings and args.model == "tiny":
            args.embedding_model_name = tiny_clip_model() if args.images else tiny_embedding_model()
        if not args.no_transcriptions and args.model == "tiny":
            args.transcription_model_name = tiny_whisper_model()
        proc, url = start_server(model, args, log)
        pid = proc.pid
        args.model_name = "bench"
        print(f"server pid {pid} at {url} (log {log})", file=sys.stderr)
    try:
        summary = asyncio.run(run(url, pid, args))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except Exception:  # noqa: BLE001
                proc.kill()
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    failed = []
    if summary["good_errors"]:
        failed.append(f"{summary['good_errors']} errors on good requests")
    if summary["bad_unexpected"]:
        failed.append(f"{summary['bad_unexpected']} bad requests not answered with an OpenAI-style 4xx")
    if summary["slowloris_not_closed"]:
        failed.append(f"{summary['slowloris_not_closed']} slowloris connections not answered 408 and closed")
    if summary["agent_invalid"]:
        failed.append(f"{summary['agent_invalid']} agent answers invalid for their schema or tool_choice")
    if summary["leaked_slots"]:
        failed.append(f"{summary['leaked_slots']} leaked slots ({summary['health_after']}, {summary['metrics_after']})")
    if args.max_growth_mb is not None and summary["rss_start_mb"] and summary["rss_end_mb"] and \
            summary["rss_end_mb"] - summary["rss_start_mb"] > args.max_growth_mb:
        failed.append(f"RSS grew {summary['rss_end_mb'] - summary['rss_start_mb']:.1f} MB past warm-up")
    print("PASS" if not failed else "FAIL: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
