"""The small endpoints apps expect beside generation: embeddings, tokenize / detokenize, metrics.

- `/v1/embeddings` (OpenAI's shape): `input` as a string, a list of strings, a list of token ids or a list of
  such lists; `encoding_format` "float" or "base64" (little-endian float32, as OpenAI's client decodes it);
  `dimensions` for a shorter vector; usage counts the tokens embedded. Served by embedding bundles only.
- `/tokenize` and `/detokenize` (llama-server's request and response shapes): `{"content", "add_special",
  "with_pieces"}` -> `{"tokens": [...]}`; `{"tokens"}` -> `{"content"}`. An optional `model` picks the model.
- `/metrics`: Prometheus text: requests by endpoint and status, prompt and generated tokens, time to first
  token and decode rate histograms, and per model the queue depth, running sequences and KV memory in use.
"""

from __future__ import annotations

import base64
import bisect
import threading
from collections import defaultdict
from typing import Any

import numpy as np

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime.decoding import GenerationResult
from gptedge.runtime.serve import api

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)  # decode tokens per second


# -- embeddings ---------------------------------------------------------------------------------------------
def embedding_inputs(body: Any) -> list[str] | list[list[int]]:
    """`input` as a list of strings or a list of token-id lists; ApiError 400 naming the field otherwise."""
    if not isinstance(body, dict):
        raise api.bad("the request body must be a JSON object", None)
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [value]
    if not isinstance(value, list) or not value:
        raise api.bad("'input' must be a string, a list of strings, a list of token ids, or a list of such lists",
                      "input")
    if len(value) > MAX_INPUTS:
        raise api.bad(f"'input' holds {len(value)} items; at most {MAX_INPUTS} per request", "input")
    if all(isinstance(v, str) for v in value):
        return value
    if all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
           for v in value):
        return value
    raise api.bad("'input' mixes kinds; send strings only or token-id lists only", "input")


def embeddings_response(body: dict[str, Any], name: str, model: Any) -> dict[str, Any]:
    """The answer of a checked /v1/embeddings request (runs the model: call it off the event loop)."""
    inputs = embedding_inputs(body)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise api.bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    try:
        ids = model.token_ids(inputs, truncate=False)
        vectors = model.embed(ids, dimensions=dimensions)
    except ContextLengthError as exc:
        raise api.bad(str(exc), "input", "context_length_exceeded") from None
    except UsageError as exc:
        raise api.bad(str(exc), exc.field or "input") from None
    data = [{"object": "embedding", "index": i,
             "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if encoding == "base64"
                           else [float(x) for x in v])} for i, v in enumerate(vectors)]
    tokens = sum(len(t) for t in ids)
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# -- tokenize / detokenize ----------------------------------------------------------------------------------
def tokenize_response(body: Any, model: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise api.bad("'content' must be a string", "content")
    for key in ("add_special", "with_pieces"):
        if not isinstance(body.get(key, False), bool):
            raise api.bad(f"'{key}' must be true or false", key)
    ids = model.tokenizer.encode(body["content"], add_special_tokens=body.get("add_special", False)).ids
    if not body.get("with_pieces", False):
        return {"tokens": ids}
    pieces = []
    for token in ids:
        text = model.tokenizer.decode([token], skip_special_tokens=False)
        pieces.append({"id": token, "piece": text})
    return {"tokens": pieces}


def detokenize_response(body: Any, model: Any) -> dict[str, Any]:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    vocab = model.spec.architecture.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in tokens):
        raise api.bad(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return {"content": model.tokenizer.decode(tokens, skip_special_tokens=False)}


# -- metrics ------------------------------------------------------------------------------------------------
class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        for j in range(i, len(self.buckets)):
            self.counts[j] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}', f"{name}_sum{{{labels}}} {self.sum:.6f}",
                      f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
    """Counters the server updates (from its event loop and the batchers' threads), in Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generated_tokens: dict[str, int] = defaultdict(int)
        self.ttft: dict[str, Histogram] = defaultdict(lambda: Histogram(TTFT_BUCKETS))
        self.rate: dict[str, Histogram] = defaultdict(lambda: Histogram(RATE_BUCKETS))

    def request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1

    def sequence(self, model: str, result: GenerationResult) -> None:
        t = result.timings
        with self._lock:
            self.prompt_tokens[model] += result.prompt_tokens
            self.generated_tokens[model] += len(result.token_ids)
            if result.token_ids:
                self.ttft[model].observe(t.ttft_s)
            if not np.isnan(t.decode_tokens_per_s):
                self.rate[model].observe(t.decode_tokens_per_s)

    def embedded(self, model: str, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens[model] += tokens

    def render(self, models: dict[str, Any]) -> str:
        lines = ["# HELP gptedge_requests_total HTTP requests answered, by path and status.",
                 "# TYPE gptedge_requests_total counter"]
        with self._lock:
            lines += [f'gptedge_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self.requests.items())]
            for metric, values, help_ in (
                    ("gptedge_prompt_tokens_total", self.prompt_tokens, "Prompt (and embedded) tokens processed."),
                    ("gptedge_generated_tokens_total", self.generated_tokens, "Tokens generated.")):
                lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} counter"]
                lines += [f'{metric}{{model="{m}"}} {n}' for m, n in sorted(values.items())]
            for metric, hists, help_ in (
                    ("gptedge_time_to_first_token_seconds", self.ttft, "Request start to first token."),
                    ("gptedge_decode_tokens_per_second", self.rate, "Decode rate of each finished sequence.")):
                lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} histogram"]
                for m, h in sorted(hists.items()):
                    lines += h.lines(metric, f'model="{m}"')
        gauges = (("gptedge_queue_waiting", "Requests waiting for a free KV row.", lambda s: s.batcher.waiting),
                  ("gptedge_sequences_running", "Sequences holding a KV row.", lambda s: s.batcher.active),
                  ("gptedge_kv_bytes_in_use", "KV cache bytes of the running sequences' stored positions.",
                   lambda s: s.kv_bytes_in_use()),
                  ("gptedge_prompt_cache_bytes", "Bytes held by stored prompt prefixes.",
                   lambda s: s.model.prefix_store.nbytes if s.model.prefix_store is not None else 0))
        for metric, help_, read in gauges:
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} gauge"]
            lines += [f'{metric}{{model="{name}"}} {read(s)}' for name, s in models.items() if s.batcher is not None]
        return "\n".join(lines) + "\n"
