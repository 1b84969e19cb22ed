"""ragserve's tool-call parsers (server/tool_parsers.py): whole answers and the same answers
streamed one character at a time must give the same calls and content; malformed output is
content, never a half call."""

from __future__ import annotations

import json

import pytest

from server.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    NamedParser,
    ParsedCall,
    PythonicParser,
    RequiredParser,
    StreamDelta,
    get_parser,
    value_end,
)

WEATHER = ParsedCall("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))
TIME = ParsedCall("get_time", json.dumps({"tz": "Europe/Paris"}))


def streamed(parser, text: str, step: int = 1) -> tuple[str, list[ParsedCall], list]:
    """Feed ``text`` ``step`` characters at a time: (content, calls, raw deltas)."""
    s = parser.stream()
    deltas: list[StreamDelta] = []
    for i in range(0, len(text), step):
        deltas.append(s.feed(text[i:i + step]))
    deltas.append(s.finish())
    content = "".join(d.content for d in deltas)
    calls: dict[int, list] = {}
    for d in deltas:
        for c in d.calls:
            if c.id is not None:
                assert c.index not in calls, "a call's header is sent once"
                assert c.id.startswith("call_") and c.name and c.arguments == ""
                calls[c.index] = [c.name, ""]
            else:
                assert c.index in calls, "arguments come after the header"
                calls[c.index][1] += c.arguments
    assert s.called == bool(calls)
    assert sorted(calls) == list(range(len(calls)))
    return content, [ParsedCall(n, a) for n, a in (calls[i] for i in sorted(calls))], deltas


def same_json(a: list[ParsedCall], b: list[ParsedCall]) -> bool:
    return [(c.name, json.loads(c.arguments)) for c in a] == [
        (c.name, json.loads(c.arguments)) for c in b]


def check(parser, text: str, content: str | None, calls: list[ParsedCall]) -> None:
    got_content, got_calls = parser.extract(text)
    assert got_content == content
    assert same_json(got_calls, calls)
    for step in (1, 3, len(text) or 1):
        s_content, s_calls, _ = streamed(parser, text, step)
        assert s_content == (content or "")
        assert same_json(s_calls, calls)


# -- hermes ---------------------------------------------------------------------------------

HERMES_ONE = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
              '"unit": "celsius"}}\n</tool_call>')


def test_hermes_one_call_no_content():
    check(HermesParser(), HERMES_ONE, None, [WEATHER])
    check(HermesParser(), "\n" + HERMES_ONE + "\n", None, [WEATHER])


def test_hermes_text_then_two_calls():
    text = ("Let me check.\n" + HERMES_ONE + "\n<tool_call>\n"
            '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>')
    check(HermesParser(), text, "Let me check.", [WEATHER, TIME])


def test_hermes_plain_answer_and_lookalikes_are_content():
    check(HermesParser(), "The weather is fine.", "The weather is fine.", [])
    check(HermesParser(), "a < b and <tool is not a call", "a < b and <tool is not a call", [])


def test_hermes_streams_content_before_a_possible_marker_only():
    s = HermesParser().stream()
    assert s.feed("Hi <tool").content == "Hi"  # the blank and '<tool' may begin a call
    assert s.feed("box>").content == " <toolbox>"
    d = s.feed('<tool_call>{"name": "f", "arguments": {"x": ')
    assert [(c.name, c.arguments) for c in d.calls] == [("f", ""), (None, '{"x":')]
    d = s.feed("1}}</tool_call>")
    assert [c.arguments for c in d.calls] == [" 1}"]


def test_hermes_arguments_keep_braces_inside_strings():
    args = {"code": "if (a) { return '}'; }", "nested": {"k": [1, {"z": "]"}]}}
    text = "<tool_call>" + json.dumps({"name": "run", "arguments": args}) + "</tool_call>"
    check(HermesParser(), text, None, [ParsedCall("run", json.dumps(args))])


@pytest.mark.parametrize("bad", [
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>{"arguments": {"x": 1}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
])
def test_hermes_malformed_is_content(bad: str):
    assert HermesParser().extract(bad) == (bad, [])


def test_hermes_malformed_streamed_without_a_name_is_content():
    bad = "<tool_call>\nnot json\n</tool_call>"
    content, calls, _ = streamed(HermesParser(), bad)
    assert content == bad and calls == []


def test_hermes_cut_mid_call_is_content():
    cut = HERMES_ONE[:40]
    assert HermesParser().extract(cut) == (cut, [])


# -- llama3_json ----------------------------------------------------------------------------

def test_llama3_json_calls():
    one = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
    check(Llama3JsonParser(), one, None, [WEATHER])
    check(Llama3JsonParser(), "<|python_tag|>" + one, None, [WEATHER])
    two = one + '; {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'
    check(Llama3JsonParser(), two, None, [WEATHER, TIME])


def test_llama3_json_words_and_other_json_are_content():
    check(Llama3JsonParser(), "Paris is sunny.", "Paris is sunny.", [])
    check(Llama3JsonParser(), '{"answer": 42}', '{"answer": 42}', [])
    text = 'Sure: {"name": "f", "parameters": {}}'
    check(Llama3JsonParser(), text, text, [])


def test_llama3_json_streams_arguments_as_they_grow():
    s = Llama3JsonParser().stream()
    assert not s.feed("<|python")
    d = s.feed('_tag|>{"name": "f", "parameters": {"q": "a')
    assert [(c.name, c.arguments) for c in d.calls] == [("f", ""), (None, '{"q": "a')]
    assert [c.arguments for c in s.feed('b"}}').calls] == ['b"}']


# -- pythonic -------------------------------------------------------------------------------

def test_pythonic_calls():
    text = '[get_weather(city="Paris", unit="celsius"), get_time(tz="Europe/Paris")]'
    check(PythonicParser(), text, None, [WEATHER, TIME])
    check(PythonicParser(), "[f(flag=true, n=null, xs=[1, 2], d={'a': 1})]", None,
          [ParsedCall("f", json.dumps({"flag": True, "n": None, "xs": [1, 2], "d": {"a": 1}}))])


@pytest.mark.parametrize("text", ["The answer is [1, 2].", "[1, 2]", "[f(1)]", "[]",
                                  "[f(x=open('a'))]", "[f(x=1]"])
def test_pythonic_other_text_is_content(text: str):
    check(PythonicParser(), text, text, [])


# -- constrained shapes ---------------------------------------------------------------------

def test_required_array():
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, '
            '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}]')
    check(RequiredParser(), text, None, [WEATHER, TIME])
    assert RequiredParser().extract("[]") == ("[]", [])
    assert RequiredParser().extract('[{"name": "f", "parameters"') == (
        '[{"name": "f", "parameters"', [])


def test_named_arguments_object():
    args = '{"city": "Paris", "unit": "celsius"}'
    check(NamedParser("get_weather"), args, None, [WEATHER])
    check(NamedParser("get_weather"), " \n" + args + "\n", None, [WEATHER])
    assert NamedParser("f").extract('{"city": ') == ('{"city": ', [])


def test_get_parser_names():
    assert isinstance(get_parser("hermes"), HermesParser)
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_parser("nope")


def test_value_end_on_partial_json():
    assert value_end('"a\\"b" x', 0) == 6
    assert value_end("[1, [2", 0) is None
    assert value_end("true}", 0) == 4
