"""Tool-call parsers for ragserve's engine: model text -> OpenAI tool calls.

Three formats, named as vLLM's ``--tool-call-parser`` names them (the formats are the same;
the code is ours, written for char-by-char streaming):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number,
  with text around them (Hermes 2 Pro, Qwen 2.5, the ChatML template in ``templates/``).
- ``llama3_json``: the whole answer is ``{"name": ..., "parameters": {...}}`` (``arguments``
  is taken too), optionally after ``<|python_tag|>``, several separated by ``;``.
- ``pythonic``: the whole answer is a Python list of calls, ``[f(a=1), g(b="x")]``.

And the two constrained shapes (``tool_choice`` required or named, where the output is
JSON the schema forced, so no markers are needed): :class:`RequiredParser` reads
``[{"name": ..., "parameters": {...}}, ...]``, :class:`NamedParser` reads the arguments
object of one known function.

Every parser has ``extract(text) -> (content or None, [ParsedCall])`` for a whole answer and
``stream()`` for one that arrives in pieces: ``feed(delta) -> StreamDelta``, then ``finish()``.
A stream sends content as soon as it cannot be the start of a call marker, and for each call
first a :class:`CallDelta` with id and name, then argument fragments. Output that does not
parse as the format says is content, never a half call.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

PARSERS = ("hermes", "llama3_json", "pythonic")


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass
class CallDelta:
    """One piece of a streamed call: the first has ``id`` and ``name``, the rest arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)

    def extend(self, other: StreamDelta) -> StreamDelta:
        self.content += other.content
        self.calls += other.calls
        return self


class StreamParser(Protocol):
    #: true once a call has been sent: the finish reason becomes ``tool_calls``
    called: bool

    def feed(self, delta: str) -> StreamDelta: ...

    def finish(self) -> StreamDelta: ...


class ToolParser(Protocol):
    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]: ...

    def stream(self) -> StreamParser: ...


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- JSON scanning of partial text -----------------------------------------------------------

_WS = " \t\r\n"
_SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int, quote: str = '"') -> int | None:
    """Index after the string literal opening at ``text[i]``; None if it does not end yet."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == quote:
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index after the JSON value that starts at ``text[i]``; None while it is incomplete
    (or, for malformed text, never). Strings are skipped whole, so brackets in them count not.

    >>> value_end('{"a": [1, "]"]} tail', 0), value_end('{"a": 1', 0), value_end('12,', 0)
    (15, None, 2)
    """
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c not in "{[":
        m = _SCALAR.match(text, i)
        # a number at the end of the text may still grow
        return m.end() if m and m.end() < len(text) else None
    return _bracket_end(text, i, '"', "{[", "}]")


def _bracket_end(text: str, i: int, quotes: str, opens: str, closes: str) -> int | None:
    """Index after the bracketed value opening at ``text[i]`` (JSON's, or a Python list's);
    string literals in ``quotes`` are skipped whole. None while it is not closed yet."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c in quotes:
            end = _string_end(text, j, c)
            if end is None:
                return None
            j = end
            continue
        if c in opens:
            depth += 1
        elif c in closes:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def members(obj: str) -> dict[str, tuple[int, int | None]]:
    """The top-level members of a (possibly partial) JSON object text that starts with ``{``:
    key -> (start of its value, end of its value or None while incomplete)."""
    out: dict[str, tuple[int, int | None]] = {}
    i = 1
    while True:
        i = skip_ws(obj, i)
        if i >= len(obj) or obj[i] != '"':
            return out
        key_end = _string_end(obj, i)
        if key_end is None:
            return out
        try:
            key = json.loads(obj[i:key_end])
        except ValueError:
            return out
        i = skip_ws(obj, key_end)
        if i >= len(obj) or obj[i] != ":":
            return out
        i = skip_ws(obj, i + 1)
        if i >= len(obj):
            return out
        end = value_end(obj, i)
        out[key] = (i, end)
        if end is None:
            return out
        i = skip_ws(obj, end)
        if i >= len(obj) or obj[i] != ",":
            return out
        i += 1


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (it may become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class JsonCall:
    """One call written as a JSON object ``{"name": ..., <args key>: {...}}``, streamed while
    it arrives: the name once it is whole, then the arguments' text as it grows."""

    def __init__(self, index: int, args_keys: Sequence[str] = ("arguments", "parameters"),
                 name: str | None = None) -> None:
        self.index = index
        self.args_keys = tuple(args_keys)
        self.name: str | None = None
        self.fixed_name = name  # a named tool_choice: the name is known before any text
        self.sent = ""  # argument text sent so far

    def update(self, obj: str) -> list[CallDelta]:
        """Deltas for what ``obj`` (the object's text so far) adds to what was sent."""
        found = members(obj)
        out = []
        if self.name is None:
            name = self.fixed_name
            if name is None and "name" in found and found["name"][1] is not None:
                start, end = found["name"]
                try:
                    value = json.loads(obj[start:end])
                except ValueError:
                    value = None
                name = value if isinstance(value, str) and value else None
            if name is None:
                return out
            self.name = name
            out.append(CallDelta(self.index, id=call_id(), name=name))
        key = next((k for k in self.args_keys if k in found), None)
        if key is not None:
            start, end = found[key]
            args = obj[start:] if end is None else obj[start:end]
            if end is None:
                args = args.rstrip(_WS)  # trailing blanks may belong to the enclosing object
            if len(args) > len(self.sent) and args.startswith(self.sent):
                out.append(CallDelta(self.index, arguments=args[len(self.sent):]))
                self.sent = args
        return out


def _call_from_obj(obj: Any, args_keys: Sequence[str]) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in args_keys if k in obj), None)
    args = obj[key] if key is not None else {}
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class _Content:
    """Content outside calls, with whitespace held back until text follows it: whitespace
    around calls is not content, and a stream must agree with :meth:`extract`."""

    def __init__(self) -> None:
        self.held = ""

    def add(self, text: str) -> str:
        text = self.held + text
        body = text.rstrip(_WS)
        self.held = text[len(body):]
        return body

    def flush(self, called: bool) -> str:
        held, self.held = self.held, ""
        return "" if called else held


def _content_or_none(parts: Sequence[str]) -> str | None:
    """The content beside calls: ``None`` when it is only whitespace (as OpenAI sends it)."""
    text = "".join(parts).rstrip(_WS)
    return text if text.strip(_WS) else None


# -- hermes ---------------------------------------------------------------------------------

class HermesParser:
    START, END = "<tool_call>", "</tool_call>"
    _REGION = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.START not in text:
            return text, []
        calls, outside, pos = [], [], 0
        for m in self._REGION.finditer(text):
            outside.append(text[pos:m.start()])
            pos = m.end()
            try:
                call = _call_from_obj(json.loads(m.group(1)), ("arguments", "parameters"))
            except ValueError:
                call = None
            if call is None:  # one malformed call: the whole answer is content
                return text, []
            calls.append(call)
        outside.append(text[pos:])
        return _content_or_none(outside), calls

    def stream(self) -> StreamParser:
        return _HermesStream()


class _HermesStream:
    def __init__(self) -> None:
        self.buf = ""
        self.in_call = False
        self.call: JsonCall | None = None
        self.calls = 0
        self.called = False
        self.content = _Content()

    def feed(self, delta: str) -> StreamDelta:
        self.buf += delta
        out = StreamDelta()
        while True:
            if not self.in_call:
                k = self.buf.find(HermesParser.START)
                if k == -1:
                    keep = _partial_suffix(self.buf, HermesParser.START)
                    out.content += self.content.add(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                out.content += self.content.add(self.buf[:k])
                self.buf = self.buf[k + len(HermesParser.START):]
                self.in_call, self.call = True, JsonCall(self.calls)
            e = self.buf.find(HermesParser.END)
            body = self.buf if e == -1 else self.buf[:e]
            if e == -1:
                body = body[:len(body) - _partial_suffix(body, HermesParser.END)]
            out.extend(self._update(body))
            if e == -1:
                return out
            out.extend(self._close(self.buf[:e], closed=True))
            self.buf = self.buf[e + len(HermesParser.END):]

    def _update(self, body: str) -> StreamDelta:
        start = skip_ws(body, 0)
        if start == len(body) or body[start] != "{" or self.call is None:
            return StreamDelta()
        deltas = self.call.update(body[start:])
        if deltas and deltas[0].name is not None:
            self.called = True
        return StreamDelta(calls=deltas)

    def _close(self, body: str, closed: bool) -> StreamDelta:
        """The region ended (or the stream did): a call that never got a name is content."""
        call, self.call, self.in_call = self.call, None, False
        if call is not None and call.name is not None:
            self.calls += 1
            return StreamDelta()
        raw = HermesParser.START + body + (HermesParser.END if closed else "")
        return StreamDelta(content=self.content.add(raw))

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self.in_call:
            out.extend(self._close(self.buf, closed=False))
        else:
            out.content += self.content.add(self.buf)
        self.buf = ""
        out.content += self.content.flush(self.called)
        return out


# -- llama3_json ----------------------------------------------------------------------------

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser:
    ARGS = ("parameters", "arguments")

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        i = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, i):
            i = skip_ws(text, i + len(PYTHON_TAG))
        if not text.startswith("{", i):
            return text, []
        decoder, calls = json.JSONDecoder(), []
        while i < len(text):
            try:
                obj, i = decoder.raw_decode(text, i)
            except ValueError:
                return text, []
            call = _call_from_obj(obj, self.ARGS)
            if call is None:
                return text, []
            calls.append(call)
            i = skip_ws(text, i)
            if text.startswith(";", i):
                i = skip_ws(text, i + 1)
        return None, calls

    def stream(self) -> StreamParser:
        return _Llama3Stream()


class _Llama3Stream:
    ARGS = Llama3JsonParser.ARGS

    def __init__(self) -> None:
        self.buf = ""
        self.mode = "start"  # start: undecided; json: calls; text: an answer in words
        self.call: JsonCall | None = None
        self.calls = 0
        self.called = False
        self.content = _Content()

    def feed(self, delta: str) -> StreamDelta:
        self.buf += delta
        out = StreamDelta()
        if self.mode == "start":
            head = self.buf.lstrip(_WS)
            if head.startswith(PYTHON_TAG):
                self.buf, self.mode = head[len(PYTHON_TAG):], "json"
            elif head.startswith("{"):
                self.buf, self.mode = head, "json"
            elif not head or PYTHON_TAG.startswith(head):
                return out
            else:
                self.mode = "text"
        if self.mode == "text":
            out.content += self.content.add(self.buf)
            self.buf = ""
            return out
        while True:
            i = skip_ws(self.buf, 0)
            if i < len(self.buf) and self.buf[i] == ";":
                i = skip_ws(self.buf, i + 1)
            if i == len(self.buf):
                return out
            if self.buf[i] != "{":  # words after the calls: content
                self.mode = "text"
                out.content += self.content.add(self.buf[i:])
                self.buf = ""
                return out
            self.buf = self.buf[i:]
            if self.call is None:
                self.call = JsonCall(self.calls, self.ARGS)
            deltas = self.call.update(self.buf)
            if deltas and deltas[0].name is not None:
                self.called = True
            out.calls += deltas
            end = value_end(self.buf, 0)
            if end is None:
                return out
            if self.call.name is None:  # a JSON answer, not a call: content
                self.mode = "text"
                out.content += self.content.add(self.buf)
                self.buf = ""
                return out
            self.call, self.calls, self.buf = None, self.calls + 1, self.buf[end:]

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self.call is None or self.call.name is None:
            out.content += self.content.add(self.buf)
        self.buf = ""
        out.content += self.content.flush(self.called)
        return out


# -- pythonic -------------------------------------------------------------------------------

_PY_NAMES = {"true": True, "false": False, "null": None}


def _py_value(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _PY_NAMES:
        return _PY_NAMES[node.id]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_py_value(k): _py_value(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_py_value(e) for e in node.elts]
    value = ast.literal_eval(node)
    if not (value is None or isinstance(value, (str, int, float, bool))):
        raise ValueError(f"{type(value).__name__} has no JSON form")
    return value


class PythonicParser:
    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip(_WS)
        if not (body.startswith("[") and body.endswith("]")):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for node in tree.elts:
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and not node.args and all(k.arg for k in node.keywords)):
                    return text, []
                args = {k.arg: _py_value(k.value) for k in node.keywords}
                calls.append(ParsedCall(node.func.id, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError, RecursionError):
            return text, []
        return None, calls

    def stream(self) -> StreamParser:
        return _PythonicStream(self)


class _PythonicStream:
    """Calls are sent when the list closes (a Python call is whole only then), each as its
    header and its whole arguments; anything else is content."""

    def __init__(self, parser: PythonicParser) -> None:
        self.parser = parser
        self.buf = ""
        self.mode = "start"
        self.called = False
        self.content = _Content()

    def feed(self, delta: str) -> StreamDelta:
        self.buf += delta
        out = StreamDelta()
        if self.mode == "start":
            head = self.buf.lstrip(_WS)
            if not head:
                return out
            self.mode = "list" if head.startswith("[") else "text"
            self.buf = head
        if self.mode == "list":
            end = self._list_end()
            if end is None:
                return out
            head, self.buf, self.mode = self.buf[:end], self.buf[end:], "text"
            _, calls = self.parser.extract(head)
            if calls:
                self.called = True
                for i, c in enumerate(calls):
                    out.calls += [CallDelta(i, id=call_id(), name=c.name),
                                  CallDelta(i, arguments=c.arguments)]
            else:
                out.content += self.content.add(head)
        out.content += self.content.add(self.buf)
        self.buf = ""
        return out

    def _list_end(self) -> int | None:
        return _bracket_end(self.buf, 0, "'\"", "([{", ")]}")

    def finish(self) -> StreamDelta:
        out = StreamDelta(content=self.content.add(self.buf))
        self.buf = ""
        out.content += self.content.flush(self.called)
        return out


# -- constrained output (tool_choice required or named) -------------------------------------

class RequiredParser:
    """``tool_choice: "required"``: the schema forced ``[{"name", "parameters"}, ...]``."""

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        try:
            items = json.loads(text)
        except ValueError:
            return text, []
        if not isinstance(items, list) or not items:
            return text, []
        calls = [_call_from_obj(item, ("parameters", "arguments")) for item in items]
        if any(c is None for c in calls):
            return text, []
        return None, calls  # type: ignore[return-value]

    def stream(self) -> StreamParser:
        return _RequiredStream()


class _RequiredStream:
    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0  # where the next element (or separator) starts
        self.opened = False
        self.call: JsonCall | None = None
        self.calls = 0
        self.called = False
        self.done = False

    def feed(self, delta: str) -> StreamDelta:
        self.buf += delta
        out = StreamDelta()
        while not self.done:
            i = skip_ws(self.buf, self.pos)
            if not self.opened:
                if i == len(self.buf) or self.buf[i] != "[":
                    return out
                self.opened, self.pos = True, i + 1
                continue
            if i < len(self.buf) and self.buf[i] == "," and self.call is None:
                i = skip_ws(self.buf, i + 1)
            if i == len(self.buf):
                return out
            if self.buf[i] == "]":
                self.done = True
                return out
            if self.buf[i] != "{":
                return out
            if self.call is None:
                self.call = JsonCall(self.calls, ("parameters", "arguments"))
            deltas = self.call.update(self.buf[i:])
            if deltas and deltas[0].name is not None:
                self.called = True
            out.calls += deltas
            end = value_end(self.buf, i)
            if end is None:
                self.pos = i
                return out
            self.call, self.calls, self.pos = None, self.calls + 1, end
        return out

    def finish(self) -> StreamDelta:
        # the schema made every call whole unless max_tokens cut it: then the finish reason
        # says length, and what was sent is all there is
        return StreamDelta(content="" if self.called else self.buf[self.pos:])


class NamedParser:
    """A named ``tool_choice``: the schema forced the function's arguments object."""

    def __init__(self, name: str) -> None:
        self.name = name

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        try:
            args = json.loads(text)
        except ValueError:
            return text, []
        if not isinstance(args, dict):
            return text, []
        return None, [ParsedCall(self.name, text.strip(_WS))]

    def stream(self) -> StreamParser:
        return _NamedStream(self.name)


class _NamedStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.called = False
        self.started = False  # the first non-blank argument character was sent
        self.content = _Content()  # the arguments, without the blanks around them

    def feed(self, delta: str) -> StreamDelta:
        out = StreamDelta()
        if not self.called:
            self.called = True
            out.calls.append(CallDelta(0, id=call_id(), name=self.name))
        if not self.started:
            delta = delta.lstrip(_WS)
        args = self.content.add(delta)
        if args:
            self.started = True
            out.calls.append(CallDelta(0, arguments=args))
        return out

    def finish(self) -> StreamDelta:
        self.content.flush(True)
        if not self.called:  # an empty answer: the call still has its header
            self.called = True
            return StreamDelta(calls=[CallDelta(0, id=call_id(), name=self.name)])
        return StreamDelta()


def get_parser(name: str) -> ToolParser:
    """Ours, by ``--tool-call-parser`` name."""
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    if name == "pythonic":
        return PythonicParser()
    raise ValueError(f"unknown tool call parser {name!r} (one of {', '.join(PARSERS)})")
