"""/tokenize and /detokenize, in vLLM's shapes.

    POST /tokenize   {"prompt": "text", "add_special_tokens": true}                 (completion form)
    POST /tokenize   {"messages": [...], "add_generation_prompt": true, ...}        (chat form; with an
                     image+text model, image_url parts count the image's tokens as the chat does)
        -> {"count": n, "max_model_len": L, "tokens": [ids], "token_strs": [..] or null}
    POST /detokenize {"tokens": [ids]}  -> {"prompt": "text"}
"""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import EmberError, ImageError
from ..image_chat import has_images
from .protocol import ApiError, _bad_type, get_bool, parse_messages, unicode_error

MAX_DETOKENIZE = 1 << 20  # token ids per /detokenize call


def _template_kwargs(body: dict) -> dict:
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict):
        raise _bad_type("chat_template_kwargs", "an object", kw)
    return kw


def register(app, st, body_of) -> None:
    """Add the two endpoints to `app` (st: the app's state; body_of: its bounded JSON body reader)."""
    @app.post("/tokenize", summary="Tokenize a prompt or chat messages (vLLM's shape)")
    async def tokenize(request: Request):
        body = await body_of(request)
        if st.llm is None or st.tok is None:
            raise ApiError(404, "This server has no generation model with a tokenizer.", param="model",
                           code="model_not_found")
        st.resolve(body, "generate")
        want_strs = get_bool(body, "return_token_strs", False)
        if "messages" in body and body.get("messages") is not None:
            images = getattr(st.llm, "takes_images", False)
            messages = parse_messages(body, images)
            add_gen = get_bool(body, "add_generation_prompt", True)
            if get_bool(body, "continue_final_message", False):
                raise ApiError(400, "'continue_final_message' is not supported by ember serve.",
                               param="continue_final_message", code="unsupported_parameter")
            add_special = get_bool(body, "add_special_tokens", False)
            kw = _template_kwargs(body)

            def work():
                if images and has_images(messages):  # each image's placeholder expanded, as the chat sees it
                    if not add_gen:
                        raise ApiError(400, "add_generation_prompt=false with images is not supported.",
                                       param="add_generation_prompt", code="unsupported_parameter")
                    try:
                        return st.llm.chat_prompt(messages, allow_local_images=False,
                                                  allow_remote_images=st.allow_remote_images, **kw)[1]
                    except ImageError as e:
                        raise ApiError(400, f"Invalid image: {e}", param="messages", code="invalid_image") from None
                text = st.tok.apply_chat_template(messages, add_gen, **kw)
                return st.tok.encode(text, add_special_tokens=add_special)
            param = "messages"
        else:
            prompt = body.get("prompt")
            if prompt is None:
                raise ApiError(400, "Missing required parameter: 'prompt' (or 'messages').", param="prompt",
                               code="missing_required_parameter")
            if not isinstance(prompt, str):
                raise _bad_type("prompt", "a string", prompt)
            bad = unicode_error(prompt)
            if bad:
                raise ApiError(400, f"Invalid 'prompt': {bad}.", param="prompt", code="invalid_value")
            add_special = get_bool(body, "add_special_tokens", True)

            def work():
                return st.tok.encode(prompt, add_special_tokens=add_special)
            param = "prompt"
        try:
            ids = await run_in_threadpool(work)
        except EmberError as e:
            raise ApiError(400, f"Could not tokenize the {param}: {e}", param=param, code="invalid_value") from None
        strs = [st.tok.id_to_token(i) for i in ids] if want_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": st.scheduler.max_len, "tokens": ids, "token_strs": strs})

    @app.post("/detokenize", summary="Turn token ids back into text (vLLM's shape)")
    async def detokenize(request: Request):
        body = await body_of(request)
        if st.llm is None or st.tok is None:
            raise ApiError(404, "This server has no generation model with a tokenizer.", param="model",
                           code="model_not_found")
        st.resolve(body, "generate")
        ids = body.get("tokens")
        if ids is None:
            raise ApiError(400, "Missing required parameter: 'tokens'.", param="tokens",
                           code="missing_required_parameter")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise _bad_type("tokens", "an array of token ids (integers)", ids)
        if len(ids) > MAX_DETOKENIZE:
            raise ApiError(400, f"Invalid 'tokens': at most {MAX_DETOKENIZE} token ids, got {len(ids)}.",
                           param="tokens", code="invalid_value")
        vocab = getattr(st.scheduler.generator, "vocab", None) or st.llm.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"Invalid 'tokens': token ids must be integers in [0, {vocab}), but got "
                           f"{str(bad)[:40]}.", param="tokens", code="invalid_value")
        try:
            text = await run_in_threadpool(st.tok.decode, ids, False)
        except EmberError as e:
            raise ApiError(400, f"Could not detokenize: {e}", param="tokens", code="invalid_value") from None
        return JSONResponse({"prompt": text})
