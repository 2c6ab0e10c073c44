"""Chat: messages -> the prompt text a model was trained on, rendered from the bundle's Jinja template.

A bundle exported from Hugging Face carries the model's own chat template; a gptedge-trained model is
exported with `DEFAULT_TEMPLATE`, a plain "User: / Assistant:" transcript (bundles written before
templates existed get the same one). Templates are rendered the way transformers renders them
(`apply_chat_template`): a sandboxed, immutable Jinja environment with trim_blocks / lstrip_blocks,
loop controls, `raise_exception`, `strftime_now` and a `tojson` filter that keeps non-ASCII text, with
the tokenizer's bos / eos / pad strings as variables. The sandbox matters: a template is data from
the model's author and must not reach Python objects or the file system.

`gptedge chat` and `gptedge serve` both use this module; it needs the `chat` extra (jinja2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from gptedge.errors import UsageError

# The transcript gptedge's own models see in chat: a system line, then "User: ..." / "Assistant: ..." turns.
# The generation prompt ends without a space: the answer's first token usually carries it (" Hello").
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# The default transcript has no end-of-turn token: the next "User:" line ends an answer.
DEFAULT_STOP_STRINGS = ("\nUser:",)
ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplateError(UsageError):
    """The template refused the conversation (raise_exception) or could not be rendered."""


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UsageError("chat templates need jinja2: pip install 'gptedge[chat]' (or 'gptedge[serve]')") from None
    return jinja2, ImmutableSandboxedEnvironment


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused this conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclass
class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to."""

    source: str
    special: Mapping[str, str]  # bos_token, eos_token, pad_token -> their text
    stop_strings: tuple[str, ...] = ()  # extra stops the format needs (the default transcript's next "User:")

    def __post_init__(self) -> None:
        jinja2, Sandbox = _jinja()
        env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise UsageError(f"the bundle's chat template is not valid Jinja ({exc}); "
                             "re-export it or pass another") from None
        self._errors = (jinja2.TemplateError,)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), ending with the assistant's cue."""
        check_messages(messages)
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **{**self.special, **extra})
        except ChatTemplateError:
            raise
        except self._errors as exc:
            raise ChatTemplateError(f"the chat template failed on this conversation: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a template reading a field the messages lack
            raise ChatTemplateError("the chat template failed on this conversation "
                                    f"({type(exc).__name__}: {exc})") from None


def check_messages(messages: Any) -> None:
    """A non-empty list of {"role": one of ROLES, "content": str}, or a UsageError naming the first bad one."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UsageError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise UsageError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"messages[{i}].content must be a string")


def template_for(model, source: str | None = None) -> ChatTemplate:
    """The chat template of a loaded Model: `source`, else the bundle's, else gptedge's default transcript."""
    special = {f"{k}_token": v for k, v in ((k, model.spec.special_tokens.get(k)) for k in ("bos", "eos", "pad", "unk"))
               if isinstance(v, str)}
    text = source or model.spec.chat_template or DEFAULT_TEMPLATE
    return ChatTemplate(text, special, DEFAULT_STOP_STRINGS if text == DEFAULT_TEMPLATE else ())


def fit_messages(model, template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
                 max_new_tokens: int) -> list[int]:
    """Token ids of the conversation's rendering that fit the context with room for `max_new_tokens`.

    System messages stay; the oldest other messages go first. If the latest message alone is too
    long, the oldest tokens of the rendering go (the assistant cue at the end is kept).
    """
    budget = model.context_length - max_new_tokens
    if budget < 1:
        raise UsageError(f"max_new_tokens must be below the context ({model.context_length}) "
                         "to leave room for the conversation")
    system = [m for m in messages if m.get("role") == "system"]
    rest = [m for m in messages if m.get("role") != "system"]
    while True:
        ids = model.encode(template.render(system + rest))
        if len(ids) <= budget:
            return ids
        if len(rest) <= 1:
            return ids[-budget:]
        rest = rest[1:]
