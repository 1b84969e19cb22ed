"""vLLM's own tool-call parsers (``vllm.tool_parsers``) behind ragserve's parser interface
(:mod:`server.tool_parsers`), for ``--engine vllm``: the calls a vLLM server would find in a
text are the calls ragserve finds when vLLM's engine serves. vLLM is imported only here and
only when a parser is built (ragserve's own venv has no vLLM).
"""

from __future__ import annotations

from typing import Any

from server.tool_parsers import CallDelta, ParsedCall, StreamDelta


class VLLMToolParser:
    """``extract`` and ``stream`` over one of vLLM's parsers, by its ``--tool-call-parser``
    name; ``tools`` in chat's shape."""

    def __init__(self, name: str, tokenizer: Any, tools: list[dict[str, Any]]) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

        self.cls = ToolParserManager.get_tool_parser(name)
        self.tokenizer = tokenizer
        # vLLM's parsers take the request they parse for (tools, tool_choice)
        self.request = ChatCompletionRequest(
            model="ragserve", messages=[{"role": "user", "content": ""}], tools=tools,
            tool_choice="auto")

    def _new(self) -> Any:
        return self.cls(self.tokenizer, self.request.tools)

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        info = self._new().extract_tool_calls(text, self.request)
        if not info.tools_called or not info.tool_calls:
            return text, []
        return info.content or None, [ParsedCall(c.function.name, c.function.arguments)
                                      for c in info.tool_calls]

    def stream(self) -> _VLLMStream:
        return _VLLMStream(self._new(), self.request)


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


class _VLLMStream:
    def __init__(self, parser: Any, request: Any) -> None:
        self.parser = parser
        self.request = request
        self.text = ""
        self.called = False
        self.last_index = -1

    def feed(self, delta: str) -> StreamDelta:
        previous, self.text = self.text, self.text + delta
        msg = self.parser.extract_tool_calls_streaming(previous, self.text, delta, [], [], [],
                                                       self.request)
        out = StreamDelta()
        if msg is None:
            return out
        out.content = msg.content or ""
        for tc in msg.tool_calls or ():
            fn = _field(tc, "function") or {}
            name, args = _field(fn, "name"), _field(fn, "arguments") or ""
            if name is not None:
                self.called = True
                out.calls.append(CallDelta(tc.index, id=tc.id, name=name))
            if args:
                out.calls.append(CallDelta(tc.index, arguments=args))
            self.last_index = max(self.last_index, tc.index)
        return out

    def finish(self) -> StreamDelta:
        # vLLM's serving sends what its parser had parsed but not streamed when the output ends
        rest = self.parser.get_remaining_unstreamed_args() if self.called else ""
        if rest:
            return StreamDelta(calls=[CallDelta(self.last_index, arguments=rest)])
        return StreamDelta()
