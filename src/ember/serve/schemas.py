"""The request bodies as pydantic models, so that /openapi.json (and /docs) document every field.

The handlers still read bodies with protocol.py's parsers, whose OpenAI-style errors name the
offending parameter ("Invalid 'temperature': ..."); these models state the same contract (types,
bounds, defaults) for clients and tools. `document(app)` puts them into the app's OpenAPI document
as each endpoint's request body, with OpenAI's error shape as the error responses. Unknown fields
are allowed (and ignored), as the server ignores them. `tools`, `tool_choice`, `response_format`
and `chat_template_kwargs` are documented in OpenAI's shapes.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .protocol import MAX_EMBED_INPUTS, MAX_LOGIT_BIAS, MAX_N, MAX_STOP_CHARS, MAX_STOPS, MAX_TOP_LOGPROBS


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- pieces ------------------------------------------------------------------------------------
class TextPart(_Body):
    type: Literal["text", "input_text"] = "text"
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="The arguments as a JSON string.")


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="'developer' is read as 'system'.")
    content: Optional[Union[str, list[Union[TextPart, str]]]] = Field(
        None, description="Text, or an array of text parts (joined with newlines).")
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, description="An assistant message's tool calls.")
    tool_call_id: Optional[str] = Field(None, description="A tool message: the call it answers.")


class FunctionDef(_Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="A JSON Schema of the arguments.")
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema", description="The JSON Schema.")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[JsonSchemaFormat] = Field(None, description="With type 'json_schema'.")


class StreamOptions(_Body):
    include_usage: Optional[bool] = Field(False, description="A last chunk with the usage (stream only).")


# ---- generation --------------------------------------------------------------------------------
Stop = Optional[Union[str, list[str]]]


class _Sampling(_Body):
    model: Optional[str] = Field(None, description="The served model's name (default: the server's model).")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="Default: the model's "
                                         "generation_config.json, else 1. 0: greedy.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, description="Extension (vLLM): -1 or 0 is off.")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="Extension (vLLM).")
    repetition_penalty: Optional[float] = Field(None, gt=0.0, description="Extension (vLLM, transformers' rule).")
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias in [-100, 100], added to "
        "its logit.")
    seed: Optional[int] = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    n: Optional[int] = Field(1, ge=1, le=MAX_N, description="Choices per prompt (at most the server's --max-batch).")
    best_of: Optional[int] = Field(1, ge=1, le=1, description="Only 1.")
    stop: Stop = Field(None, description=f"Up to {MAX_STOPS} stop strings of up to {MAX_STOP_CHARS} characters.")
    stop_token_ids: Optional[list[int]] = Field(None, description="Extension (vLLM).")
    ignore_eos: Optional[bool] = Field(False, description="Extension (vLLM): generate past the end-of-sequence token.")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = Field(None, description="Only with stream: true.")
    user: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0, description="Default: up to the end of the context.")
    max_completion_tokens: Optional[int] = Field(None, ge=0, description="Overrides max_tokens.")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Needs logprobs: true.")
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    chat_template_kwargs: Optional[dict[str, Any]] = Field(
        None, description="Extra variables for the chat template (e.g. enable_thinking).")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="Text, texts, token ids, or arrays of token ids.")
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Optional[bool] = Field(False, description="Prefix the prompt to the completion (not with logprobs).")
    suffix: Optional[str] = Field(None, description="Not supported (only empty).")


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    model: Optional[str] = None
    input: Union[str, list[str]] = Field(description=f"A text or up to {MAX_EMBED_INPUTS} texts (not empty).")
    encoding_format: Optional[Literal["float", "base64"]] = "float"
    dimensions: Optional[int] = Field(None, ge=1, description="Only the model's own dimension.")
    user: Optional[str] = None


class TokenizeCompletionRequest(_Body):
    """POST /tokenize, with a prompt (vLLM's shape)."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: Optional[bool] = True
    return_token_strs: Optional[bool] = False


class TokenizeChatRequest(_Body):
    """POST /tokenize, with chat messages (rendered by the model's chat template; vLLM's shape)."""

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = Field(False, description="Not supported (only false).")
    add_special_tokens: Optional[bool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: Optional[bool] = False


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's shape)."""

    model: Optional[str] = None
    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


BODIES = {
    "/v1/chat/completions": (ChatCompletionRequest,),
    "/v1/completions": (CompletionRequest,),
    "/v1/embeddings": (EmbeddingRequest,),
    "/tokenize": (TokenizeCompletionRequest, TokenizeChatRequest),
    "/detokenize": (DetokenizeRequest,),
}
ERRORS = {"400": "Invalid request", "401": "Missing or wrong API key", "404": "Unknown model",
          "413": "Body or prompt too long", "429": "Too many requests waiting (see Retry-After)"}
REF = "#/components/schemas/{model}"


def _ref(model) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def document(app) -> None:
    """Give `app`'s POST endpoints their request bodies and error responses in /openapi.json."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.routing import APIRoute
    from pydantic.json_schema import models_json_schema

    error = {"content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path in BODIES and "POST" in route.methods:
            models = BODIES[route.path]
            schema = _ref(models[0]) if len(models) == 1 else {"anyOf": [_ref(m) for m in models]}
            route.openapi_extra = {
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                "responses": {code: {"description": why, **error} for code, why in ERRORS.items()},
            }

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            models = [m for ms in BODIES.values() for m in ms] + [ErrorResponse]
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
