"""The OpenAI API's request bodies -> checked requests (RequestSpec), and results -> its response objects.

Nothing here speaks HTTP: `app.py` reads bodies and writes responses; this module decides what a
body means and how a result looks, so both are tested without a socket. Every rule the runtime
already checks (SamplingParams, prompts, messages, the context) is reused, and its UsageError
becomes a 400 in OpenAI's error shape naming the request field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from gptedge.errors import UsageError
from gptedge.runtime.decoding import GenerationResult, TokenLogprob

MAX_CHOICES = 8  # n
MAX_PROMPTS = 16  # a completions request may hold a list of prompts
MAX_STOPS = 16
MAX_LOGPROBS = {"completion": 5, "chat": 20}
# Arrays and objects a request body may nest: an OpenAI body with a JSON schema in it needs a dozen or two.
# Deeper bodies are refused before anything walks them (the JSON parser and schema compilers recurse).
MAX_JSON_DEPTH = 64
DEFAULT_MAX_TOKENS = {"completion": 16}  # OpenAI's default; chat runs until the end of the context
FINISH = {"eos": "stop", "stop_string": "stop", "length": "length", "context": "length", "cancelled": "stop"}
# request field -> SamplingParams field; numbers are checked by SamplingParams, types here
SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed",
}


class ApiError(Exception):
    """An error response: HTTP status + OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChoiceSpec:
    """One sequence to generate: its prompt ids, sampling params and optional constraint factory."""

    index: int
    prompt_ids: list[int]
    params: Any  # SamplingParams
    length_reason: str
    constraint: Callable[[], Any] | None = None


@dataclass
class RequestSpec:
    """A checked request: what to generate and how to answer."""

    kind: str  # "completion" or "chat"
    model: str
    choices: list[ChoiceSpec]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: not asked; else how many rivals per token
    n: int = 1  # choices per prompt: choice i answers prompt i // n
    cache_prompt: bool = True  # reuse and store prompt prefixes (request field `cache_prompt`, as llama-server)
    tools: Any = None  # gptedge.runtime.tools.ToolPlan of a chat with tools: answers are parsed for calls
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "cmpl-" if self.kind == "completion" else "chatcmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex[:24]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens counted once per distinct prompt (n choices share one prompt)."""
        seen: dict[int, int] = {}
        for c in self.choices:
            seen.setdefault(c.index // self.n, len(c.prompt_ids))
        return sum(seen.values())


# -- reading a body --------------------------------------------------------------------------------------
def too_deep() -> ApiError:
    return bad(f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
               "flatten it", code="too_deep")


def check_depth(body: Any) -> Any:
    """`body` itself, or a 400 when it nests deeper than MAX_JSON_DEPTH (walked without recursion)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise too_deep()
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return body


def _get(body: dict, name: str, types: tuple, default: Any = None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise bad(f"'{name}' must be {what or ' or '.join(t.__name__ for t in types)}, got {type(value).__name__}",
                  name)
    return value


def parse_common(body: Any, kind: str) -> dict[str, Any]:
    """The fields completions and chat share, type-checked; sampling values are checked later by SamplingParams."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = _get(body, "model", (str,), None, "a string naming a served model")
    stream = _get(body, "stream", (bool,), False, "true or false")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    include_usage = _get(options, "include_usage", (bool,), False, "true or false")
    n = _get(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= MAX_CHOICES:
        raise bad(f"'n' must be between 1 and {MAX_CHOICES}, got {n}", "n")
    sampling: dict[str, Any] = {}
    for api, ours in SAMPLING_FIELDS.items():
        value = _get(body, api, (int, float), None, "a number")
        if value is not None:
            sampling[ours] = value
    for name in ("presence_penalty", "frequency_penalty"):
        if name in sampling and not -2.0 <= sampling[name] <= 2.0:
            raise bad(f"'{name}' must be between -2 and 2, got {sampling[name]}", name)
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, max_name, (int,), None, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"'{max_name}' must be >= 1, got {max_tokens}", max_name)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
        stops = tuple(s for s in stop if s)
    else:
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    if _get(body, "ignore_eos", (bool,), False, "true or false"):  # llama-server's and vLLM's extension
        sampling["stop_token_ids"] = ()
    cache_prompt = _get(body, "cache_prompt", (bool,), True, "true or false")  # llama-server's name for it
    return {"model": model, "stream": stream, "include_usage": include_usage, "n": n, "sampling": sampling,
            "max_tokens": max_tokens, "max_name": max_name, "stops": stops, "cache_prompt": cache_prompt}


def parse_logprobs(body: dict, kind: str) -> int | None:
    """Completions: logprobs = k (0..5). Chat: logprobs = true plus top_logprobs = k (0..20)."""
    limit = MAX_LOGPROBS[kind]
    if kind == "completion":
        k = _get(body, "logprobs", (int,), None, "an integer")
        name = "logprobs"
    else:
        if not _get(body, "logprobs", (bool,), False, "true or false"):
            if body.get("top_logprobs") is not None:
                raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        k = _get(body, "top_logprobs", (int,), 0, "an integer")
        name = "top_logprobs"
    if k is not None and not 0 <= k <= limit:
        raise bad(f"'{name}' must be between 0 and {limit}, got {k}", name)
    return k


def parse_response_format(body: dict) -> tuple[bool, dict | None]:
    """(constrained?, schema or None for any object) from response_format."""
    fmt = body.get("response_format")
    if fmt is None:
        return False, None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}", "response_format")
    if fmt["type"] == "text":
        return False, None
    if fmt["type"] == "json_object":
        return True, None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad("'response_format.json_schema' must be an object with a 'schema' object", "response_format")
    return True, spec.get("schema") or {"type": "object"}


def completion_prompts(body: dict) -> list[Any]:
    """'prompt': a string, a list of token ids, or a list of several of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and len(prompt) <= MAX_PROMPTS and all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(i, int) for i in p)) for p in prompt):
        return list(prompt)
    raise bad(f"'prompt' must be a string, a list of token ids, or a list of at most {MAX_PROMPTS} of those", "prompt")


def chat_messages(body: dict) -> list[dict[str, str]]:
    """'messages' with content as a string or a list of text parts (joined); other parts are refused."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {'role': ..., 'content': ...}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content parts must all be {{'type': 'text', 'text': ...}}; "
                          "this server takes text only", "messages")
            content = "".join(p["text"] for p in content)
        if content is None and m.get("role") == "assistant":
            content = ""
        message = {"role": m.get("role"), "content": content}
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise bad(f"messages[{i}].tool_calls must be an assistant's list of "
                          "{'id', 'type': 'function', 'function': {'name', 'arguments'}}", "messages")
            message["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


def parse_tools(body: dict, template):
    """The request's tools and tool_choice, checked (400s naming the field): (ToolPlan or None, native)."""
    from gptedge.runtime.tools import plan_tools

    parallel = _get(body, "parallel_tool_calls", (bool,), True, "true or false")
    try:
        return plan_tools(template.source, body.get("tools"), body.get("tool_choice"), parallel)
    except UsageError as exc:
        raise bad(str(exc), exc.field) from None


def usage_error(exc: UsageError, max_name: str) -> ApiError:
    """A SamplingParams UsageError as a 400 naming the request field the failed check is about (`exc.field`).

    (Context limits are checked by check_request itself, with their own error code.)
    """
    fields = {**{ours: api for api, ours in SAMPLING_FIELDS.items()}, "max_new_tokens": max_name,
              "stop_strings": "stop"}
    return bad(str(exc), fields.get(exc.field or ""))


def check_request(kind: str, body: Any, served) -> RequestSpec:
    """Check a completions (`kind` "completion") or chat body against a served model; a RequestSpec or an ApiError.

    `served` provides `model` (a loaded Model), `capacity` (positions per sequence), `template`
    (chat) and `grammar` (a GrammarFactory, built on first use).
    """
    common = parse_common(body, kind)
    logprobs = parse_logprobs(body, kind)
    constrained, schema = parse_response_format(body)
    model = served.model
    stops = common["stops"]
    tool_plan = None
    if kind == "chat":
        from gptedge.runtime import tools as T
        from gptedge.runtime.chat import check_messages

        messages = chat_messages(body)
        tool_plan, native = parse_tools(body, served.template)
        try:
            check_messages(messages)
            rendered, extra = T.conversation(messages, tool_plan.tools if tool_plan else None,
                                             tool_plan.format if tool_plan else T.HERMES, native)
            prompts = [model.encode(served.template.render(rendered, **extra))]
        except UsageError as exc:
            raise bad(str(exc), "messages") from None
        stops = stops + served.template.stop_strings
    else:
        prompts = completion_prompts(body)
    constraint = None
    if tool_plan is not None and constrained and tool_plan.choice != "auto":
        raise bad("'response_format' and a required tool call cannot both shape the answer", "response_format")
    if tool_plan is not None and not constrained:  # "auto" with a response_format: the format shapes text answers
        grammar = tool_plan.grammar
        try:
            factory = served.grammar()
            factory.lark(grammar)
        except UsageError as exc:
            raise bad(str(exc), "tools") from None
        constraint = lambda: factory.lark(grammar)  # noqa: E731 - one fresh matcher per choice
    if constrained:
        try:
            factory = served.grammar()
            factory.json_schema(schema)  # compile once now, so a bad schema is a 400 before anything runs
        except UsageError as exc:
            raise bad(str(exc), "response_format") from None
        constraint = lambda: factory.json_schema(schema)  # noqa: E731 - one fresh matcher per choice
    choices = []
    for p_index, prompt in enumerate(prompts):
        try:
            ids = model.prompt_ids(prompt)
        except UsageError as exc:
            raise bad(str(exc), "messages" if kind == "chat" else "prompt") from None
        room = served.capacity - len(ids)
        max_tokens = common["max_tokens"]
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS.get(kind, room), room)
            reason = "context" if kind != "completion" else "length"
        else:
            reason = "length"
        if room < 1 or max_tokens > room:
            raise bad(f"this request needs {len(ids)} prompt tokens + {common['max_tokens'] or 1} new ones, more than "
                      f"the {served.capacity} positions a sequence holds here; "
                      f"shorten the prompt or lower {common['max_name']}",
                      "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        for j in range(common["n"]):
            sampling = dict(common["sampling"])
            if "seed" in sampling and common["n"] > 1:
                sampling["seed"] = sampling["seed"] + j  # each choice its own seed, all reproducible
            try:
                params = model.sampling_params(max_new_tokens=max_tokens, stop_strings=stops, **sampling)
            except UsageError as exc:
                raise usage_error(exc, common["max_name"]) from None
            choices.append(ChoiceSpec(p_index * common["n"] + j, ids, params, reason, constraint))
    return RequestSpec(kind, common["model"] or served.name, choices, common["stream"], common["include_usage"],
                       logprobs, n=common["n"], cache_prompt=common["cache_prompt"], tools=tool_plan)


# -- writing results -------------------------------------------------------------------------------------
def envelope(spec: RequestSpec, model: str, choices: list[dict[str, Any]], *, chunk: bool = False,
             **extra: Any) -> dict[str, Any]:
    """OpenAI's response object around `choices` (a streamed chunk's when `chunk`), answered by served model `model`;
    `extra` adds fields (usage)."""
    if spec.kind == "chat":
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": spec.id, "object": kind, "created": spec.created, "model": model, "system_fingerprint": "gptedge",
            "choices": choices, **extra}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_object(kind: str, entries: list[TokenLogprob], text_of: Callable[[int], str],
                    bytes_of: Callable[[int, str], bytes], offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs for `entries`: chat's {"content": [...]} or completions' parallel lists."""
    if kind == "chat":
        def item(token: int, lp: float) -> dict[str, Any]:
            text = text_of(token)
            return {"token": text, "logprob": lp, "bytes": list(bytes_of(token, text))}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                            for e in entries]}
    tokens = [text_of(e.token) for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text_of(i): lp for i, lp in e.top} for e in entries], "text_offset": offsets}


def finish_reason(result: GenerationResult) -> str:
    return FINISH[result.finish_reason]


def assistant_message(spec: RequestSpec, text: str) -> tuple[dict[str, Any], bool]:
    """The chat answer as OpenAI's message: its tool calls when it makes any (True), else its text."""
    if spec.tools is not None:
        calls = spec.tools.calls(text)
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in calls]}, True
    return {"role": "assistant", "content": text}, False
