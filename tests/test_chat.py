"""Chat templates: rendered as transformers renders them, sandboxed, fitted to the context."""

from __future__ import annotations

import sys

import pytest

from gptedge.errors import UsageError
from gptedge.runtime.chat import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError, fit_messages, template_for

# A ChatML template in the style of Qwen's, using loop controls, raise_exception and the bos/eos variables.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}"
    "{% if loop.index0 > 20 %}{% break %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    "{{ messages | tojson if false }}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse. Ünïcödé 你好"},
    {"role": "user", "content": "  Hi there  "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "And now?"},
]


def test_template_renders_like_transformers(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    ours = ChatTemplate(CHATML, {"bos_token": "<s>", "eos_token": "</s>"})
    for messages in (CONVERSATION, CONVERSATION[1:]):
        for prompt in (True, False):
            expected = hf.apply_chat_template(messages, chat_template=CHATML, tokenize=False,
                                              add_generation_prompt=prompt)
            assert ours.render(messages, add_generation_prompt=prompt) == expected
    json_template = "{{ messages | tojson }}"
    expected = hf.apply_chat_template(CONVERSATION, chat_template=json_template, tokenize=False)
    assert ChatTemplate(json_template, {}).render(CONVERSATION, add_generation_prompt=False) == expected


def test_default_template_is_the_user_assistant_transcript() -> None:
    text = ChatTemplate(DEFAULT_TEMPLATE, {}).render(CONVERSATION)
    assert text == "You are terse. Ünïcödé 你好\nUser:   Hi there  \nAssistant: Hello.\nUser: And now?\nAssistant:"


def test_template_errors_are_typed_and_say_why() -> None:
    with pytest.raises(ChatTemplateError, match="tools are not supported"):
        ChatTemplate(CHATML, {}).render([{"role": "tool", "content": "x"}])
    with pytest.raises(UsageError, match="not valid Jinja"):
        ChatTemplate("{% for %}", {})
    with pytest.raises(UsageError, match=r"messages\[1\].role must be one of"):
        ChatTemplate(CHATML, {}).render([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(UsageError, match="content must be a string"):
        ChatTemplate(CHATML, {}).render([{"role": "user", "content": 3}])
    with pytest.raises(UsageError, match="non-empty list"):
        ChatTemplate(CHATML, {}).render([])


@pytest.mark.parametrize("hostile", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'user'}) %}",
])
def test_template_runs_in_an_immutable_sandbox(hostile: str) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate(hostile, {}).render([{"role": "user", "content": "hi"}])


def test_missing_jinja_is_a_clear_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(UsageError, match=r"pip install 'gptedge\[chat\]'"):
        ChatTemplate(DEFAULT_TEMPLATE, {})


def test_exported_gptedge_bundle_carries_the_default_template(runtime_model) -> None:
    assert runtime_model.spec.chat_template == DEFAULT_TEMPLATE
    template = template_for(runtime_model)
    assert template.stop_strings == ("\nUser:",)
    assert template_for(runtime_model, CHATML).stop_strings == ()


def test_fit_messages_keeps_system_and_the_latest_turns(runtime_model) -> None:
    template = template_for(runtime_model)
    messages = [{"role": "system", "content": "System text."}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i}"} for i in range(40)]
    ids = fit_messages(runtime_model, template, messages, 28)
    assert len(ids) <= runtime_model.context_length - 28
    text = runtime_model.decode(ids)
    assert text.startswith("System text.\n") and text.endswith(
        "User: message number 38\nAssistant: message number 39\nAssistant:")
    assert "message number 0\n" not in text
    long = [{"role": "user", "content": "tell me more " * 200}]
    ids = fit_messages(runtime_model, template, long, 28)
    assert len(ids) == runtime_model.context_length - 28 and runtime_model.decode(ids).endswith("more \nAssistant:")
    with pytest.raises(UsageError, match="below the context"):
        fit_messages(runtime_model, template, long, runtime_model.context_length)
