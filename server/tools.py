"""Tool calling: a request's ``tools`` and ``tool_choice`` -> a :class:`ToolPlan`; the model's
text -> OpenAI tool calls. Shared by every endpoint that takes tools (chat completions, the
Responses API), for both engines.

The public API::

    plan = plan_tools(tools, tool_choice, parallel_tool_calls, parser=config.tool_call_parser,
                      auto=config.enable_auto_tool_choice, engine=engine.name,
                      tokenizer=info.tokenizer, served_template=template)
    # None when the request has no tools (and tool_choice is absent or "none"); else a plan,
    # or a 400 naming the field (unknown tool in tool_choice, auto without the flag, ...)
    await plan.check(models.structured, tokenizer)  # compiles each tool's schema: a 400 naming it
    plan.template_tools   # the ``tools=`` for ``tokenizer.apply_chat_template``
    plan.template         # a shipped template to render with instead of the served one, or None
    plan.structured       # the StructuredOutput for required / named choices, or None
    content, calls = plan.parse(text)           # whole answer -> (str | None, [ParsedCall])
    stream = plan.stream()                      # feed(delta) -> StreamDelta; finish(); .called

:func:`read_tools` accepts both shapes of a function tool: chat's
``{"type": "function", "function": {"name", ...}}`` and the Responses API's flat
``{"type": "function", "name", ...}``; ``tool_choice`` likewise (``{"function": {"name"}}``
or ``{"name"}``).

How each choice is served (as vLLM serves it):

- ``none``: tools are shown to the template; the answer is text.
- ``auto`` (the default when tools are given): the model writes calls in its own format and the
  ``--tool-call-parser`` finds them; needs ``--enable-auto-tool-choice``.
- ``required``: the output is constrained to a JSON array of ``{"name", "parameters"}`` (one
  ``anyOf`` branch per tool; one item when ``parallel_tool_calls`` is false).
- named: the output is constrained to that function's ``parameters`` schema.

The parsers: ragserve's own (:mod:`server.tool_parsers`) on ``--engine ragserve``, vLLM's
(:mod:`server.vllm_tools`) on ``--engine vllm``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from scheduler import StructuredKind, StructuredOutput
from server.errors import APIError, bad_request
from server.tool_parsers import (
    PARSERS,
    NamedParser,
    ParsedCall,
    RequiredParser,
    StreamDelta,
    StreamParser,
    ToolParser,
    get_parser,
)

log = logging.getLogger("ragserve")

AUTO_FLAGS = "--enable-auto-tool-choice and --tool-call-parser"
#: the shipped template of each parser whose format has one (server/templates/)
TEMPLATES = {"hermes": "tool_chat_template_hermes.jinja",
             "llama3_json": "tool_chat_template_llama3.1_json.jinja"}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def template_dict(self) -> dict[str, Any]:
        """Chat's shape, which Hugging Face chat templates expect."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.schema()
        return {"type": "function", "function": fn}

    def schema(self) -> dict[str, Any]:
        # no parameters: the arguments are still a JSON object (as vLLM constrains them)
        return self.parameters if self.parameters else {"type": "object", "properties": {}}


def read_tools(tools: Sequence[Any] | None, param: str = "tools") -> list[ToolSpec]:
    """Function tools in either shape, or a 400 naming the one that is wrong."""
    out: list[ToolSpec] = []
    for i, tool in enumerate(tools or ()):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"{where}: only tools of type 'function' are supported", param)
        fn = tool.get("function", tool)
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function must be an object", param)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{where}: a function needs a non-empty name", param)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"{where} ({name}): parameters must be a JSON schema object",
                              param)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise bad_request(f"{where} ({name}): description must be a string", param)
        if any(t.name == name for t in out):
            raise bad_request(f"{where}: function {name!r} is given twice", param)
        out.append(ToolSpec(name, desc, params, fn.get("strict")))
    return out


def choice_name(choice: Any, param: str = "tool_choice") -> str:
    """``none``, ``auto``, ``required``, or the name of a named choice; a 400 otherwise."""
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"{param} must be 'none', 'auto', 'required' or "
                              f"{{'type': 'function', 'function': {{'name': ...}}}}, got "
                              f"{choice!r}", param)
        return choice
    fn = choice.get("function", choice) if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not (
            isinstance(name, str) and name):
        raise bad_request(f"{param} must name a function: {{'type': 'function', "
                          "'function': {'name': ...}}", param)
    return name


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools are served (see the module docstring)."""

    tools: tuple[ToolSpec, ...]
    choice: str  # none, auto, required, named
    named: str | None = None
    parallel: bool = True
    parser: ToolParser | None = None  # None: the answer is text (choice none)
    structured: StructuredOutput | None = None
    template: str | None = None
    template_note: str | None = field(default=None, compare=False)

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.template_dict() for t in self.tools] or None

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.parser is None:
            return text, []
        return self.parser.extract(text)

    def stream(self) -> StreamParser:
        return self.parser.stream() if self.parser is not None else _TextStream()

    async def check(self, checker: Any, tokenizer: Any, param: str = "tools") -> None:
        """Each constrained tool's schema compiled (``server.structured.StructuredChecker``):
        a schema the grammar compiler refuses is a 400 naming its tool."""
        if self.structured is None:
            return
        for i, t in enumerate(self.tools):
            if self.named is not None and t.name != self.named:
                continue
            so = StructuredOutput(StructuredKind.JSON, json.dumps(t.schema(), sort_keys=True))
            try:
                await checker.check(tokenizer, so, param)
            except APIError as e:
                raise bad_request(f"{param}[{i}] ({t.name}): parameters is not a usable JSON "
                                  f"schema: {e.message}", param) from None
        await checker.check(tokenizer, self.structured, param)


class _TextStream:
    called = False

    def feed(self, delta: str) -> StreamDelta:
        return StreamDelta(content=delta)

    def finish(self) -> StreamDelta:
        return StreamDelta()


def required_schema(tools: Sequence[ToolSpec], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for ``tool_choice: "required"``: an array of calls, one ``anyOf`` branch
    per tool, each ``{"name": <that tool>, "parameters": <its schema>}``."""
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [t.name]},
                            "parameters": t.schema()},
             "required": ["name", "parameters"]} for t in tools]},
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


@cache
def shipped_template(parser: str) -> str | None:
    name = TEMPLATES.get(parser)
    if name is None:
        return None
    return resources.files("server").joinpath("templates", name).read_text()


def tool_template(served: str | None, parser: str | None) -> str | None:
    """The shipped template to use for requests with tools: when a parser is set and the
    served template never mentions ``tools`` (it would drop them from the prompt)."""
    if parser is None or (served is not None and "tools" in served):
        return None
    return shipped_template(parser)


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               *, parser: str | None, auto: bool, engine: str = "ragserve",
               tokenizer: Any = None, served_template: str | None = None,
               structured_in_request: bool = False) -> ToolPlan | None:
    """The request's :class:`ToolPlan`, None when it has no tools; a 400 naming the field.
    ``structured_in_request``: the request also asks for a structured output (a 400 with a
    required or named choice, which constrain the output themselves)."""
    specs = read_tools(tools)
    if not specs:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    choice = choice_name("auto" if tool_choice is None else tool_choice)
    parallel = parallel_tool_calls is not False
    names = [t.name for t in specs]
    template = tool_template(served_template, parser)
    note = None
    if template is not None:
        note = (f"the served chat template ignores tools: requests with tools use ragserve's "
                f"{TEMPLATES[parser]} (--tool-call-parser {parser})")  # type: ignore[index]
    common = dict(tools=tuple(specs), parallel=parallel, template=template, template_note=note)
    if choice == "none":
        return ToolPlan(choice="none", **common)  # type: ignore[arg-type]
    if choice != "auto" and structured_in_request:
        raise bad_request(f"tool_choice {choice!r} constrains the output itself: it cannot "
                          "be combined with response_format or structured_outputs",
                          "response_format")
    if choice == "auto":
        if not auto or parser is None:
            raise bad_request(f'"auto" tool choice requires {AUTO_FLAGS} to be set on the '
                              "server (tool_choice 'required' or a named function work "
                              "without them)", "tool_choice")
        return ToolPlan(choice="auto", parser=_parser(parser, engine, tokenizer, specs),
                        **common)  # type: ignore[arg-type]
    if choice == "required":
        so = StructuredOutput(StructuredKind.JSON,
                              json.dumps(required_schema(specs, parallel), sort_keys=True))
        return ToolPlan(choice="required", parser=RequiredParser(), structured=so,
                        **common)  # type: ignore[arg-type]
    if choice not in names:
        raise bad_request(f"tool_choice names function {choice!r}, which is not in tools "
                          f"({', '.join(names)})", "tool_choice")
    spec = specs[names.index(choice)]
    so = StructuredOutput(StructuredKind.JSON, json.dumps(spec.schema(), sort_keys=True))
    return ToolPlan(choice="named", named=choice, parser=NamedParser(choice), structured=so,
                    **common)  # type: ignore[arg-type]


def _parser(name: str, engine: str, tokenizer: Any, specs: Sequence[ToolSpec]) -> ToolParser:
    if name not in PARSERS:
        raise bad_request(f"unknown tool call parser {name!r}", "tool_choice")
    if engine == "vllm":  # vLLM's own parsers, behind the same interface
        from server.vllm_tools import VLLMToolParser

        return VLLMToolParser(name, tokenizer, [t.template_dict() for t in specs])
    return get_parser(name)


def check_tool_history(messages: Sequence[dict[str, Any]]) -> None:
    """A ``tool`` message must answer a call an earlier assistant message made."""
    seen: set[str] = set()
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or ():
            seen.add(call["id"])
        if m["role"] == "tool":
            cid = m.get("tool_call_id")
            if cid is None:
                raise bad_request(f"messages[{i}]: a tool message needs tool_call_id",
                                  "messages")
            if cid not in seen:
                raise bad_request(f"messages[{i}]: tool_call_id {cid!r} matches no tool call "
                                  "of an earlier assistant message", "messages")
