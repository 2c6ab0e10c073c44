"""Tool calling: OpenAI `tools` and `tool_choice`, in the format each family's chat template teaches.

A request's tools are checked (names, JSON-schema objects, counts and sizes), handed to the bundle's own chat
template as transformers' `apply_chat_template(..., tools=...)` hands them, and the model's answer is parsed
back into calls. The call format is read off the template, as data (FORMATS): Qwen2.5 / Qwen3 and Hermes-style
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, Llama 3.1+ JSON (`{"name": ..., "parameters": ...}`),
Mistral `[TOOL_CALLS][{"name": ..., "arguments": ...}]`. A template that knows no tools (SmolLM2, gptedge's own)
gets the Hermes format, described in a system message (GENERIC_PROMPT), as llama-server does for such models.

`tool_choice` "required" or a named function is enforced with llguidance: only a call of a listed function whose
arguments are valid against its schema can be written (`call_grammar`). "auto" leaves the choice to the model,
text or calls, but a call it starts is held to the same grammar, so it cannot name an unknown function or write
arguments its schema refuses.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from gptedge.errors import UsageError

MAX_TOOLS = 64
MAX_TOOLS_BYTES = 64 * 1024  # the tools' JSON, rendered into every prompt
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class Format:
    """How a family's template writes a call: the text around the JSON, and the key holding the arguments."""

    name: str
    marker: str  # text in the template that says it teaches this format
    open: str  # before each call (or before the list of calls)
    close: str
    arguments: str = "arguments"  # the JSON key of the call's arguments
    as_list: bool = False  # the calls are one JSON list after `open`


HERMES = Format("hermes", "<tool_call>", "<tool_call>\n", "\n</tool_call>")
FORMATS = (
    HERMES,
    Format("mistral", "[TOOL_CALLS]", "[TOOL_CALLS]", "", as_list=True),
    Format("llama3", "<|python_tag|>", "", "", arguments="parameters"),
)
GENERIC_PROMPT = (
    "You can call these tools. To call one, answer with nothing but\n<tool_call>\n"
    '{{"name": <the tool\'s name>, "arguments": <its arguments as a JSON object>}}\n</tool_call>\n'
    "(one such block per call). The tools:\n{tools}"
)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def template_format(template_text: str | None) -> tuple[Format, bool]:
    """The call format a chat template teaches, and whether it renders tools itself (else GENERIC_PROMPT)."""
    text = template_text or ""
    for fmt in FORMATS:
        if fmt.marker in text:
            return fmt, True
    return HERMES, "tools" in text and "tool" in text.replace("tools", "")


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools` as a list of {"type": "function", "function": {name, description, parameters}}, checked."""
    if not isinstance(tools, list) or not tools:
        raise UsageError("'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {...}}",
                         field="tools")
    if len(tools) > MAX_TOOLS:
        raise UsageError(f"'tools' holds {len(tools)} tools; at most {MAX_TOOLS}", field="tools")
    if len(json.dumps(tools)) > MAX_TOOLS_BYTES:
        raise UsageError(f"'tools' is larger than {MAX_TOOLS_BYTES // 1024} KB of JSON; describe fewer or smaller "
                         "tools", field="tools")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise UsageError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", field="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or set(name) - NAME_CHARS:
            raise UsageError(f"tools[{i}].function.name must be 1-64 letters, digits, _ - or ., got {name!r}",
                             field="tools")
        if name in seen:
            raise UsageError(f"tools[{i}].function.name {name!r} appears twice; tool names must be unique",
                             field="tools")
        seen.add(name)
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise UsageError(f"tools[{i}].function.parameters must be a JSON schema of an object", field="tools")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise UsageError(f"tools[{i}].function.description must be a string", field="tools")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out


def check_choice(choice: Any, tools: list[dict[str, Any]] | None) -> str | None:
    """`tool_choice` as "none", "auto", "required" or a tool's name; None when no tools were given."""
    if choice is None:
        return "auto" if tools else None
    names = [t["function"]["name"] for t in tools or []]
    if isinstance(choice, str) and choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise UsageError(f"tool_choice {choice!r} needs 'tools'", field="tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise UsageError(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"({', '.join(names) or 'none given'})", field="tool_choice")
        return name
    raise UsageError("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                     "\"function\": {\"name\": ...}}", field="tool_choice")


def generic_system(tools: list[dict[str, Any]]) -> str:
    return GENERIC_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))


def call_schema(tools: list[dict[str, Any]], fmt: Format, only: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call: the name of a listed function (or `only`) and arguments valid against it."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                  fmt.arguments: t["function"]["parameters"]},
                "required": ["name", fmt.arguments], "additionalProperties": False}
               for t in tools if only is None or t["function"]["name"] == only]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON, no wandering in spaces


def call_grammar(tools: list[dict[str, Any]], fmt: Format, only: str | None, parallel: bool,
                 free: bool = False) -> str:
    """A Lark grammar (llguidance) that admits only calls in `fmt`: one, or several when `parallel`.

    `free` ("auto"): the answer may also be text, any text but one that starts (after white space) the way a
    call does; so a call the model starts is always a valid call of a listed function, and text is never cut.
    The white space before a call belongs to its opening lexeme: llguidance's lexer does not go back over the
    bytes of a text lexeme that dies at the opening's last character.
    """
    schema = json.dumps(call_schema(tools, fmt, only))
    first = "OPEN" if free and fmt.open else json.dumps(fmt.open)
    if fmt.as_list:
        calls = f'{first} "[" call ("," call)* "]"' if parallel else f'{first} "[" call "]"'
    else:
        one = f'{json.dumps(fmt.open)} call {json.dumps(fmt.close)}' if fmt.open or fmt.close else "call"
        head = f'{first} call {json.dumps(fmt.close)}' if fmt.open else "call"
        calls = f'{head} ("\\n" {one})*' if parallel else head
    grammar = f"calls: {calls}\ncall: %json {schema}\n"
    if not free:
        return "start: calls\n" + grammar
    if fmt.open:
        start, lexemes = "calls", f"OPEN: /[ \\t\\n]*{_regex(fmt.open)}/\n"
    else:
        start, lexemes = "SPACE? calls", "SPACE: /[ \\t\\n]+/\n"
    opening = _regex(fmt.open.strip() or "{")
    return (f"start: TEXT | {start}\n" + grammar + lexemes
            + f"TEXT: /(.|\\n)+/ & ~/[ \\t\\n]*{opening}(.|\\n)*/\n")


def _regex(text: str) -> str:
    """`text` as a literal inside a Lark /regex/."""
    return "".join("\\" + c if c in "\\/.^$*+?()[]{}|" else {"\n": "\\n", "\t": "\\t"}.get(c, c) for c in text)


def parse_calls(text: str, fmt: Format, tools: list[dict[str, Any]]) -> list[ToolCall] | None:
    """The calls `text` makes in `fmt` (None when it is not a call: plain text). A call of an unknown function,
    or arguments that are not a JSON object, make it plain text too."""
    names = {t["function"]["name"] for t in tools}
    stripped = text.strip()
    found: list[Any] = []
    if fmt.as_list:
        if not stripped.startswith(fmt.open):
            return None
        try:
            found = json.loads(stripped[len(fmt.open):])
        except json.JSONDecodeError:
            return None
        found = found if isinstance(found, list) else [found]
    elif fmt.open:
        rest = stripped
        while rest.startswith(fmt.open.strip()):
            body, sep, rest = rest[len(fmt.open.strip()):].partition(fmt.close.strip())
            if not sep:
                return None
            try:
                found.append(json.loads(body))
            except json.JSONDecodeError:
                return None
            rest = rest.strip()
        if rest or not found:
            return None
    else:
        try:
            found = [json.loads(stripped)]
        except json.JSONDecodeError:
            return None
    calls = []
    for item in found:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get(fmt.arguments, item.get("arguments", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(item["name"], arguments))
    return calls


def conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, fmt: Format,
                 native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra template variables to render: a template that renders tools gets them as
    transformers passes them (`tools=`, calls in the history as they are); one that does not gets the generic
    system message, earlier calls written out in the Hermes format and tool results wrapped to match."""
    if native:
        return messages, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join(f"{HERMES.open}{json.dumps(_call_json(c), ensure_ascii=False)}{HERMES.close}"
                             for c in calls)
            m["content"] = "\n".join(part for part in (m.get("content") or "", text) if part)
        if m.get("role") == "tool":  # a template without tools may know no "tool" role: the result comes as input
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
        m.pop("tool_call_id", None)
        out.append(m)
    if tools:
        system = generic_system(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, {}


def _call_json(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function", {})
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"name": fn.get("name"), "arguments": arguments}


@dataclass
class ToolPlan:
    """A chat's tools: the checked list, how the model writes calls, and the choice it was given."""

    tools: list[dict[str, Any]]
    format: Format
    choice: str  # "auto", "required" or a function's name
    parallel: bool = True

    @property
    def grammar(self) -> str:
        """The Lark grammar that enforces the choice ("auto": text, or calls that are valid)."""
        only = None if self.choice in ("auto", "required") else self.choice
        return call_grammar(self.tools, self.format, only, self.parallel, free=self.choice == "auto")

    def calls(self, text: str) -> list[ToolCall] | None:
        return parse_calls(text, self.format, self.tools)


def plan_tools(template_text: str | None, tools: Any, tool_choice: Any, parallel: bool = True
               ) -> tuple[ToolPlan | None, bool]:
    """Check `tools` / `tool_choice` for a template; (None, native) when no tool may be called."""
    fmt, native = template_format(template_text)
    checked = None if tools is None else check_tools(tools)
    choice = check_choice(tool_choice, checked)
    if checked is None or choice == "none":
        return None, native
    return ToolPlan(checked, fmt, choice, parallel), native

