"""POST /v1/audio/transcriptions (and /v1/audio/translations), in OpenAI's shape, when the server
serves a Whisper model.

    multipart/form-data fields:
      file                      the audio file (WAV; FLAC/MP3/OGG with soundfile installed), required
      model                     the served model's name, required (as OpenAI's API)
      language                  ISO-639-1 code ("en", "de"); default: detected on multilingual models
      response_format           json (default) | text | verbose_json | srt | vtt
      temperature               0 (default): greedy with fallback through 0.2, 0.4 ... 1.0 when a 30 s window
                                compresses too well (> 1.35, transformers' token measure) or its mean
                                log-probability is below -1; above 0: sampled at that temperature
      timestamp_granularities[] segment and/or word (verbose_json only): segment (the default) gives `segments`,
                                word gives `words` (the checkpoint's alignment heads' cross-attention aligned
                                by DTW, as transformers' return_timestamps="word"; a checkpoint without
                                alignment_heads in generation_config.json is a 400)
      prompt                    refused unless empty (no conditioning on earlier text)

    json          {"text": "..."}
    text          the text, text/plain
    verbose_json  {"task", "language", "duration", "text", "segments": [{"id", "seek", "start", "end",
                   "text", "tokens", "temperature", "avg_logprob", "compression_ratio"}],
                   "words": [{"word", "start", "end"}] (with timestamp_granularities[]=word; segments then
                   only when segment is asked for too)}
    srt / vtt     subtitles, a cue per segment

The body is read up to the server's --max-body-mb; audio longer than MAX_AUDIO_SECONDS, unreadable,
empty or corrupt is a 400 naming the problem. Requests are transcribed one at a time on one thread.
"""
from __future__ import annotations

import asyncio
import math
import uuid
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from ..errors import EmberError
from .protocol import ApiError

MAX_AUDIO_SECONDS = 3600  # an hour: 58 M samples, 230 MB of float32 before features
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # OpenAI's and transformers' ladder
COMPRESSION_RATIO_THRESHOLD = 1.35  # transformers' recommended value (zlib over token ids)
LOGPROB_THRESHOLD = -1.0
GRANULARITIES = ("segment", "word")
FIELDS = {"file", "model", "language", "response_format", "temperature", "timestamp_granularities[]", "prompt"}


OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "model"], "properties": {
        "file": {"type": "string", "format": "binary"}, "model": {"type": "string"}, "language": {"type": "string"},
        "response_format": {"type": "string", "enum": list(FORMATS)},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": list(GRANULARITIES)}},
        "prompt": {"type": "string", "maxLength": 0}}}}}}}


def _stamp(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments) -> str:
    return "".join(f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(segments, 1))


def vtt(segments) -> str:
    return "WEBVTT\n\n" + "".join(f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in segments)


def _field(form, name: str) -> str | None:
    vals = form.getlist(name)
    if len(vals) > 1:
        raise ApiError(400, f"'{name}' was given {len(vals)} times.", param=name, code="invalid_value")
    if not vals:
        return None
    if not isinstance(vals[0], str):
        raise ApiError(400, f"'{name}' must be a form field, not a file.", param=name, code="invalid_value")
    return vals[0]


def _options(form) -> dict:
    unknown = sorted(set(form.keys()) - FIELDS)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0][:60]}", param=unknown[0][:60],
                       code="unknown_parameter")
    fmt = _field(form, "response_format") or "json"
    if fmt not in FORMATS:
        raise ApiError(400, f"Invalid value for 'response_format': {fmt[:40]!r}; one of {', '.join(FORMATS)}.",
                       param="response_format", code="invalid_value")
    grans = form.getlist("timestamp_granularities[]")
    bad = [g for g in grans if g not in GRANULARITIES]
    if bad:
        raise ApiError(400, f"Invalid value for 'timestamp_granularities[]': {str(bad[0])[:40]!r}; "
                       f"each one of {', '.join(GRANULARITIES)}.", param="timestamp_granularities[]",
                       code="invalid_value")
    words = "word" in grans
    if words and fmt != "verbose_json":
        raise ApiError(400, "timestamp_granularities[]=word needs response_format 'verbose_json'.",
                       param="timestamp_granularities[]", code="invalid_value")
    temp = _field(form, "temperature")
    t = 0.0
    if temp is not None:
        try:
            t = float(temp)
        except ValueError:
            t = math.nan
        if not 0 <= t <= 1:
            raise ApiError(400, f"Invalid value for 'temperature': {temp[:40]!r}; a number in [0, 1].",
                           param="temperature", code="invalid_value")
    if _field(form, "prompt"):
        raise ApiError(400, "'prompt' is not supported: ember does not condition on earlier text.", param="prompt",
                       code="unsupported_parameter")
    kw = dict(temperature=FALLBACK, compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
              logprob_threshold=LOGPROB_THRESHOLD, seed=0) if t == 0 else dict(temperature=t)
    return dict(fmt=fmt, language=_field(form, "language") or None, segments=not grans or "segment" in grans,
                timestamps=fmt in ("verbose_json", "srt", "vtt"), word_timestamps=words, **kw)


def _segment(i: int, s) -> dict:
    return {"id": i, "seek": s.window, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
            "tokens": s.tokens, "temperature": s.temperature, "avg_logprob": s.avg_logprob,
            "compression_ratio": s.compression_ratio}


def register(app, st, body_bytes) -> None:
    """Add the endpoints to `app` (st: the app's state, with `.transcriber`; body_bytes: its bounded
    body reader)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="ember-asr")
    st.asr_pool = pool

    async def handle(request: Request, task: str):
        from starlette.formparsers import MultiPartException, MultiPartParser

        from ..audio import load_audio

        if st.transcriber is None:
            raise ApiError(404, "This server has no speech-to-text (Whisper) model.", param="model",
                           code="model_not_found")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "Send the audio as multipart/form-data with a 'file' field (as OpenAI's API).",
                           code="invalid_content_type")
        data = await body_bytes(request)

        async def stream():
            yield data

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=2, max_fields=32,
                                         max_part_size=64 << 10).parse()
        except MultiPartException as e:
            raise ApiError(400, f"Invalid multipart body: {str(e)[:200]}", code="invalid_value") from None
        files = form.getlist("file")
        if len(files) != 1 or isinstance(files[0], str):
            raise ApiError(400, "Missing required parameter: 'file' (one audio file).", param="file",
                           code="missing_required_parameter")
        name = _field(form, "model")
        if name is None:
            raise ApiError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
        st.resolve({"model": name}, "transcribe")
        opts = _options(form)
        fmt, with_segments = opts.pop("fmt"), opts.pop("segments")
        upload = files[0]
        raw = await upload.read()
        where = f"file {str(upload.filename or 'audio')[:80]!r}"
        asr = st.transcriber

        def work():
            samples = load_audio(raw, where, max_seconds=MAX_AUDIO_SECONDS)
            return asr.transcription(samples, task=task, **opts)

        try:
            out = await asyncio.get_running_loop().run_in_executor(pool, work)
        except EmberError as e:
            param = ("language" if "language" in str(e) else "timestamp_granularities[]" if "alignment" in str(e)
                     else "file")
            raise ApiError(400, str(e), param=param, code="invalid_value") from None
        headers = {"x-request-id": f"asr-{uuid.uuid4().hex[:24]}"}
        if fmt == "text":
            return PlainTextResponse(out.text + "\n", headers=headers)
        if fmt == "srt":
            return PlainTextResponse(srt(out.segments), headers=headers)
        if fmt == "vtt":
            return PlainTextResponse(vtt(out.segments), media_type="text/vtt", headers=headers)
        body = {"text": out.text}
        if fmt == "verbose_json":
            body = {"task": task, "language": out.language or "en", "duration": round(out.duration, 3), "text": out.text}
            if with_segments:
                body["segments"] = [_segment(i, s) for i, s in enumerate(out.segments)]
            if opts["word_timestamps"]:
                body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in out.words]
        return JSONResponse(body, headers=headers)

    @app.post("/v1/audio/transcriptions", summary="Transcribe audio (OpenAI's shape; multipart/form-data)",
              openapi_extra=OPENAPI)
    async def transcriptions(request: Request):
        return await handle(request, "transcribe")

    @app.post("/v1/audio/translations", summary="Translate audio into English text (OpenAI's shape)",
              openapi_extra=OPENAPI)
    async def translations(request: Request):
        return await handle(request, "translate")
