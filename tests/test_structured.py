"""Structured output: every seeded sample of a random-weight model parses and validates against the schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from gptedge.errors import UsageError
from gptedge.runtime import Model
from gptedge.runtime.decoding import Decoding
from gptedge.runtime.generator import stream_tokens
from gptedge.runtime.structured import GrammarFactory

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def constrained(model: Model, factory: GrammarFactory, schema, seed: int) -> str:
    params = model.sampling_params(temperature=1.0, seed=seed, max_new_tokens=100)
    seq = Decoding(model.tokenizer, model.prompt_ids("Answer in JSON:"), params, constraint=factory.json_schema(schema))
    text = "".join(stream_tokens(model.engine, seq))
    assert seq.result.finish_reason == "eos", (seq.result.finish_reason, text)
    return text


def test_twenty_seeded_samples_parse_and_validate(runtime_model: Model) -> None:
    factory = GrammarFactory(runtime_model.tokenizer, runtime_model.stop_ids)
    texts = [constrained(runtime_model, factory, SCHEMA, seed) for seed in range(20)]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 5  # sampling still samples: the grammar only removes what cannot parse


def test_any_json_object_when_no_schema(runtime_model: Model) -> None:
    factory = GrammarFactory(runtime_model.tokenizer, runtime_model.stop_ids)
    closed = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "additionalProperties": False}
    assert json.loads(constrained(runtime_model, factory, closed, 3)) in ({}, {"a": 1}, {"a": 2})
    params = runtime_model.sampling_params(temperature=1.0, seed=0, max_new_tokens=8)
    seq = Decoding(runtime_model.tokenizer, [1], params, constraint=factory.json_schema(None))
    assert "".join(stream_tokens(runtime_model.engine, seq)).startswith("{")  # free-form object, cut by the budget


def test_bad_schemas_and_models_without_eos_are_refused(runtime_model: Model) -> None:
    factory = GrammarFactory(runtime_model.tokenizer, runtime_model.stop_ids)
    with pytest.raises(UsageError, match="schema"):
        factory.json_schema({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(UsageError, match="no end-of-text token"):
        GrammarFactory(runtime_model.tokenizer, ())
