"""Tool calling: checked tools, each family's call format, enforced calls, and the OpenAI client end to end.

The tiny runtime bundle carries gptedge's own template (no tools), so it gets the generic Hermes format; calls
forced by `tool_choice` must be valid against the schema however random the model. Templates in the style of
Qwen3, Llama 3.1 and Mistral (written here) are held to render their tools and parse their own call formats.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from gptedge.errors import UsageError
from gptedge.runtime import tools as T
from gptedge.runtime.chat import ChatTemplate

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": SMALL_INT, "b": SMALL_INT},
                                  "required": ["a", "b"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}

QWEN3 = ("{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
         "For each call return <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
         "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "<|im_start|>assistant\n")
LLAMA31 = ("{% if tools %}Environment: ipython\nUse <|python_tag|> or JSON: {{ tools | tojson }}\n{% endif %}"
           "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: ")
MISTRAL = ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
           "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %} [TOOL_CALLS] ")


@pytest.mark.parametrize("tools, field, message", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools", "object"),
    ([WEATHER, WEATHER], "tools", "appears twice"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools", "letters, digits"),
    ([WEATHER] * 65, "tools", "at most 64"),
    ("get_weather", "tools", "non-empty list"),
])
def test_bad_tools_name_their_field(tools, field: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        T.check_tools(tools)
    assert caught.value.field == field


def test_tool_choice_is_checked_against_the_tools() -> None:
    tools = T.check_tools([WEATHER, ADD])
    assert T.check_choice(None, tools) == "auto" and T.check_choice("required", tools) == "required"
    assert T.check_choice({"type": "function", "function": {"name": "add"}}, tools) == "add"
    with pytest.raises(UsageError, match="not among the tools") as caught:
        T.check_choice({"type": "function", "function": {"name": "nope"}}, tools)
    assert caught.value.field == "tool_choice"
    with pytest.raises(UsageError, match="needs 'tools'"):
        T.check_choice("required", None)


@pytest.mark.parametrize("template, fmt, call", [
    (QWEN3, "hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    (LLAMA31, "llama3", '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
    (MISTRAL, "mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
])
def test_each_family_renders_its_tools_and_its_calls_parse(template: str, fmt: str, call: str) -> None:
    found, native = T.template_format(template)
    assert found.name == fmt and native
    tools = T.check_tools([WEATHER, ADD])
    messages, extra = T.conversation([{"role": "user", "content": "1 + 2?"}], tools, found, native)
    prompt = ChatTemplate(template, {}).render(messages, **extra)
    assert '"get_weather"' in prompt and "1 + 2?" in prompt
    calls = T.parse_calls(call, found, tools)
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert T.parse_calls("The answer is 3.", found, tools) is None
    assert T.parse_calls(call.replace('"add"', '"subtract"'), found, tools) is None  # not a listed function


def test_a_template_without_tools_gets_the_generic_format() -> None:
    from gptedge.runtime.chat import DEFAULT_TEMPLATE

    fmt, native = T.template_format(DEFAULT_TEMPLATE)
    assert fmt is T.HERMES and not native
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    messages, extra = T.conversation(history, T.check_tools([ADD]), fmt, native)
    assert extra == {} and messages[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in messages[2]["content"]
    assert messages[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}


def _admits(factory, grammar: str, text: str, stop_id: int) -> bool:
    """Whether the grammar lets `text` be written token by token and then end."""
    import numpy as np

    constraint = factory.lark(grammar)
    for token in factory._tokenizer.encode(text, add_special_tokens=False).ids + [stop_id]:
        logits = np.zeros(factory._tokenizer.get_vocab_size(), np.float32)
        if constraint.mask(logits)[token] == -np.inf:
            return False
        if token != stop_id:
            constraint.accept(token)
    return True


@pytest.mark.parametrize("fmt, call", [
    (T.HERMES, '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'),
    (T.FORMATS[2], '{"name":"add","parameters":{"a":1,"b":2}}'),
    (T.FORMATS[1], '[TOOL_CALLS][{"name":"add","arguments":{"a":1,"b":2}}]'),
], ids=["hermes", "llama3", "mistral"])
def test_auto_admits_text_or_valid_calls_only(runtime_model, fmt, call: str) -> None:
    """tool_choice "auto": free text, or a call held to the schema once it starts; never a half-valid call."""
    from gptedge.runtime.structured import GrammarFactory

    factory = GrammarFactory(runtime_model.tokenizer, runtime_model.stop_ids)
    stop = runtime_model.stop_ids[0]
    tools = T.check_tools([WEATHER, ADD])
    auto, required = T.call_grammar(tools, fmt, None, True, free=True), T.call_grammar(tools, fmt, None, True)
    assert _admits(factory, auto, "The answer is 3.", stop) and not _admits(factory, required, "The answer is 3.", stop)
    assert _admits(factory, auto, call, stop) and _admits(factory, auto, "\n" + call, stop)
    assert not _admits(factory, auto, call.replace('"add"', '"subtract"'), stop)  # not a listed function
    assert not _admits(factory, auto, call.replace('"b":2', '"b":200'), stop)  # against the schema
    assert not _admits(factory, auto, call[:-1], stop)  # a call it started must be finished


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny random model with room for the tools' descriptions (its tokenizer spends a token on a character
    or two)."""
    from conftest import make_runtime_checkpoint
    from gptedge.export.exporter import export_bundle
    from serve_util import live_server, wait_ready

    root = tmp_path_factory.mktemp("tools")
    bundle = export_bundle(make_runtime_checkpoint(root / "ckpt", block_size=1024), root / "bundle", progress=False)
    with live_server(bundle) as (url, _):
        wait_ready(url)
        yield url


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_enforced_calls_are_valid_streamed_or_not(server: str, choice) -> None:
    client = _client(server)
    args = dict(model="tiny", messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER, ADD],
                tool_choice=choice, temperature=0, max_tokens=300)  # a random model's call ends within it
    reply = client.chat.completions.create(**args)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert isinstance(choice, str) or call.function.name == "get_weather"
    streamed: dict[int, dict] = {}
    finish = None
    for part in client.chat.completions.create(**args, stream=True):
        for c in part.choices:
            finish = c.finish_reason or finish
            for delta in c.delta.tool_calls or []:
                entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function.name:
                    entry["name"] = delta.function.name
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [(s["name"], json.loads(s["arguments"])) for s in streamed.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_auto_answers_text_or_valid_calls(server: str) -> None:
    client = _client(server)
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}],
                                               tools=[WEATHER, ADD], tool_choice="auto", seed=seed, max_tokens=300)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        else:
            assert not choice.message.content.lstrip().startswith("<tool_call>")


def test_bad_tools_are_400_and_the_server_keeps_serving(server: str) -> None:
    import httpx

    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for body, param in [({**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
                         "tools"),
                        ({**base, "tools": [WEATHER, WEATHER]}, "tools"),
                        ({**base, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                         "tool_choice"),
                        ({**base, "tool_choice": "required"}, "tool_choice")]:
        reply = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    ok = httpx.post(server + "/v1/chat/completions", json=base, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_the_python_api_returns_parsed_calls(tmp_path) -> None:
    from conftest import make_runtime_checkpoint
    from gptedge.export.exporter import export_bundle
    from gptedge.runtime import Model

    bundle = export_bundle(make_runtime_checkpoint(tmp_path / "ckpt", block_size=1024), tmp_path / "b", progress=False)
    model = Model.load(bundle, provider="cpu", threads=1)
    messages = [{"role": "user", "content": "Add 2 and 3."}]
    reply = model.chat(messages, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}},
                       temperature=0, max_new_tokens=300)
    assert reply.text is None and [c.name for c in reply.tool_calls] == ["add"] * len(reply.tool_calls)
    for call in reply.tool_calls:
        jsonschema.validate(call.arguments, SCHEMAS["add"])
        assert json.loads(call.to_openai()["function"]["arguments"]) == call.arguments
    plain = model.chat(messages, temperature=0, max_new_tokens=8)
    assert plain.tool_calls is None and isinstance(plain.text, str)
