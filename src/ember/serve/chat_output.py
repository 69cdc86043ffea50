"""A chat choice's output as OpenAI shapes it: reasoning, content and tool calls, whole or as deltas.

`ChatOutput` is given the generated text piece by piece. Streaming, it answers the deltas to send:
`{"reasoning_content": ...}` while inside a think block, `{"content": ...}` for the answer, and, once
the text turns into tool calls, `{"tool_calls": [...]}` deltas the way OpenAI streams them (the first
delta of a call carries its index, id, type and name with empty arguments; the next carries the
arguments). Text that may be the start of a tag or of a call is held back until it is known; a call
is sent when the output ends (its JSON is then complete and parsed as the non-streamed message is,
so the deltas assemble to exactly the non-streamed calls).
"""
from __future__ import annotations

from .reasoning import ReasoningSplitter, split_reasoning
from .tools import BARE_STARTS, ToolFormat, bare_call


class ChatOutput:
    def __init__(self, fmt: ToolFormat | None = None, in_think: bool = False, names=()):
        """fmt: the tool-call format to parse (None: no tools); in_think: the prompt opened a think block;
        names: the declared tools (an answer that is nothing but a JSON call to one of them is a call
        too, as small models write them)."""
        self.fmt = fmt
        self.names = set(names)
        self.in_think = in_think
        self.reasoning = ReasoningSplitter(in_think)
        self.pending = ""  # content held back: a possible call start, or a call being written
        self.in_call = False
        self.sent = False  # content has been sent (a bare JSON call can only be the whole answer)
        self.calls: list[dict] = []
        self.index = 0

    # ---- whole ----------------------------------------------------------------------------------
    def message(self, text: str) -> dict:
        reasoning, content = split_reasoning(text, self.in_think)
        calls = []
        if self.fmt is not None:
            content, calls = self._parse(content)
        self.calls = calls
        msg = {"role": "assistant", "content": content if (content or not calls) else None, "refusal": None}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        return msg

    # ---- streamed -------------------------------------------------------------------------------
    def feed(self, text: str) -> list[dict]:
        return self._deltas(self.reasoning.feed(text), end=False)

    def end(self) -> list[dict]:
        return self._deltas(self.reasoning.end(), end=True)

    def _deltas(self, parts, end: bool) -> list[dict]:
        out = []
        for kind, piece in parts:
            if kind == "reasoning":
                out.append({"reasoning_content": piece})
            else:
                out += self._content(piece)
        if end and self.pending:
            out += self._finish()
        return out

    def _content(self, piece: str) -> list[dict]:
        if self.fmt is None:
            return [{"content": piece}] if piece else []
        self.pending += piece
        if self.in_call:
            return []
        if self.names and not self.sent:  # the answer may be a bare JSON call: undecided until seen
            s = self.pending.lstrip()
            if s.startswith(BARE_STARTS):
                self.in_call = True
                return []
            if not s or any(x.startswith(s) for x in BARE_STARTS):
                return []
        i = self.fmt.starts_call(self.pending)
        if i is not None:
            head, self.pending, self.in_call = self.pending[:i], self.pending[i:], True
        else:
            keep = self.fmt.may_start_call(self.pending)
            head = self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
        self.sent = self.sent or bool(head)
        return [{"content": head}] if head else []

    def _parse(self, text: str) -> tuple[str, list[dict]]:
        content, calls = self.fmt.parse(text)
        if not calls and self.names:
            call = bare_call(text, self.names)
            if call is not None:
                return "", [call]
        return content, calls

    def _finish(self) -> list[dict]:
        text, self.pending = self.pending, ""
        content, calls = self._parse(text) if self.in_call else (text, [])
        out = [{"content": content}] if content else []
        for call in calls:
            fn = call["function"]
            out.append({"tool_calls": [{"index": self.index, "id": call["id"], "type": "function",
                                        "function": {"name": fn["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": self.index, "function": {"arguments": fn["arguments"]}}]})
            self.index += 1
        self.calls += calls
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the model called tools (and was not cut short)."""
        return "tool_calls" if self.calls and reason == "stop" else reason


class ChatPlan:
    """How one chat request is rendered, constrained and parsed (built off the event loop: rendering
    and compiling a grammar take milliseconds)."""

    def __init__(self, llm, body: dict, messages: list[dict], allow_remote_images: bool = False):
        from ..errors import EmberError, GrammarError, ImageError
        from .protocol import ApiError
        from .reasoning import prompt_opens_think
        from .tools import detect, parse_agent, template_inputs, tool_grammar

        tok = llm.tokenizer
        agent = parse_agent(body)
        try:
            source = tok.template("tool_use" if agent.tools and agent.choice != "none" else None)
        except EmberError:
            source = None
        fmt, native = detect(source)
        msgs, tools = template_inputs(messages, body.get("messages") or [], agent, fmt, native)
        try:  # image parts: data: URLs only (a client names no file on this machine)
            c = llm.chat_inputs(msgs, tools=tools, allow_local_images=False, allow_remote_images=allow_remote_images,
                                **agent.template_kwargs)
            self.prompt, self.ids, self.image_embeds, self.rope_positions = c.prompt, c.ids, c.image_embeds, c.rope_positions
        except ImageError as e:
            raise ApiError(400, f"Invalid image: {e}", param="messages", code="invalid_image") from None
        except EmberError as e:
            raise ApiError(400, f"Could not apply the chat template: {e}", param="messages",
                           code="invalid_value") from None
        self.fmt = fmt if agent.tools and agent.choice != "none" else None
        self.tools = agent.tools if self.fmt is not None else []
        self.in_think = prompt_opens_think(self.prompt)
        self.reasoning = self.in_think or "</think>" in (source or "")
        spec, param = tool_grammar(agent, fmt, tok), "tool_choice"
        self.grammar = None
        try:
            if spec is not None:
                self.grammar = llm.grammar(grammar=spec)
            elif agent.response_format is not None:
                param = "response_format"
                self.grammar = llm.grammar(response_format=agent.response_format)
        except GrammarError as e:
            raise ApiError(400, f"Invalid '{param}': {e}", param="tools" if param == "tool_choice" else param,
                           code="invalid_schema") from None

    @property
    def parses(self) -> bool:
        """Whether the output needs ChatOutput (tool calls or reasoning), not plain content."""
        return self.fmt is not None or self.reasoning

    def output(self) -> ChatOutput:
        return ChatOutput(self.fmt, self.in_think, [t["name"] for t in self.tools])
