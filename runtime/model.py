"""`Model`: the embeddable API. Load a bundle once, then generate, stream, batch, score.

    from gptedge.runtime import Model
    model = Model.load("bundle/")                      # provider="auto": CUDA, then DirectML, then CPU
    print(model.generate("def add(a, b):", temperature=0, max_new_tokens=32).text)
    for piece in model.stream("Once upon", temperature=0.8, seed=1):
        print(piece, end="", flush=True)

One loaded model serves concurrent generations from many threads: each call gets its own KV cache
(from a pool of buffers sized to the request), and the session is shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
from tokenizers import Tokenizer

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime import optimum
from gptedge.runtime.bundle import MODEL_NAME, TOKENIZER_NAME, BundleSpec, check_graph
from gptedge.runtime.decoding import Decoding, GenerationResult
from gptedge.runtime.draft import check_tokenizer, step_cost_ratio, stream_draft
from gptedge.runtime.engine import Engine
from gptedge.runtime.generator import check_prompt_ids, generate_rows, stream_tokens
from gptedge.runtime.loading import load_tokenizer, make_engine, read_verified_spec
from gptedge.runtime.onnx_scan import scan_graph
from gptedge.runtime.prefix import PrefixStore
from gptedge.runtime.providers import (
    PROVIDERS,
    SessionInfo,
    cache_key,
    choose_provider,
    create_session,
    spin_default,
)
from gptedge.runtime.sampling import SamplingParams, ranked_top_k, softmax
from gptedge.runtime.speculative import stream_speculative

log = logging.getLogger("gptedge.runtime")

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}
TRUNCATE_MODES = (None, "left")
# RAM for recent prompts' keys and values: a 1,000-token system prompt of SmolLM2-135M's shape is ~46 MB in fp32
DEFAULT_PREFIX_CACHE_MB = 256


class Stream:
    """Iterator over the text pieces of one generation; `result` holds the GenerationResult once it ends.

    Closing it (`close()`, leaving a `with` block, or dropping it) cancels the generation and frees
    its KV buffers.
    """

    def __init__(self, pieces: Iterator[str], seq: Decoding) -> None:
        self._pieces = pieces
        self._seq = seq

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def result(self) -> GenerationResult | None:
        return self._seq.result


@dataclass
class ChatReply:
    """One assistant turn: its text, or (text None) the tool calls it makes; `result` is the generation."""

    text: str | None
    tool_calls: list[Any] | None  # gptedge.runtime.tools.ToolCall (name, arguments, id; .to_openai())
    result: GenerationResult


class Model:
    """A loaded bundle (or Optimum decoder folder) and everything needed to run it."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, spec: BundleSpec, folder: Path, info: SessionInfo,
                 load_s: float, prefix_store: PrefixStore | None = None) -> None:
        self.engine = engine
        # Recent prompts' keys and values, so a prompt sharing a prefix with one before prefills only the rest
        # (gptedge.runtime.prefix; None: off, or a cache on a device that cannot be read out)
        self.prefix_store = prefix_store
        self.tokenizer = tokenizer
        self.spec = spec
        self.folder = folder
        self.session_info = info
        self.load_seconds = load_s
        self._drafts: weakref.WeakSet[Model] = weakref.WeakSet()  # drafts whose tokenizer matched this one

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        provider: str = "auto",
        threads: int | None = None,
        verify: bool = True,
        cache: bool = True,
        spin: bool | None = None,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    ) -> "Model":
        """Load a bundle folder written by `gptedge export` / `gptedge quantize`,
        or a Hugging Face Optimum decoder folder.

        provider: "auto" (CUDA, then DirectML, then CPU, among those onnxruntime offers and that can run
          the bundle), "cpu", "cuda" or "dml". An unavailable provider, or one that cannot run the bundle,
          falls back to CPU with a RuntimeWarning saying why. Notably an fp32 bundle (target cpu) asked to
          run on CUDA runs on CPU instead: CUDA's GroupQueryAttention is fp16-only; export with
          `--target cuda` for the GPU. An fp16 (cuda) bundle runs on CPU, slower, with a warning.
        threads: CPU intra-op threads (default: 1 for a model under 16 MB, else the physical cores;
            providers.default_threads says why).
        verify: check every file's sha256 against gptedge.json (the model's safety scan always runs).
          A successful check is remembered in the user cache with each file's size, mtime, ctime and
          inode, so an unchanged bundle is not re-hashed on every load; any change re-hashes it.
        cache: reuse (or write) the optimized graph in $GPTEDGE_CACHE or ~/.cache/gptedge, so later
          loads skip graph optimization.
        spin: True lets onnxruntime's threads spin until the next step (fastest on cores nothing else needs,
          much slower on shared ones: for servers and benchmarks), False puts them to sleep at once; None
          ($GPTEDGE_SPIN, else a spin of a few microseconds between operators: most of the speed, none of the
          cost next to other work; runtime/providers.py BRIEF_SPIN_US).
        prefix_cache_mb: RAM for the keys and values of recent prompts (gptedge.runtime.prefix): a prompt that
          starts like an earlier one (a system prompt, a conversation's history) prefills only what is new, with
          exactly the output of a cold run. 0 turns it off.
        Raises BundleError (missing, tampered, unsafe, unknown format), UsageError (bad argument),
        ProviderError (the provider cannot run the graph).
        """
        start = time.perf_counter()
        if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) or not (
                prefix_cache_mb >= 0):
            raise UsageError(f"prefix_cache_mb must be a number of megabytes >= 0, got {prefix_cache_mb!r}")
        if spin is not None and not isinstance(spin, bool):
            raise UsageError(f"spin must be True, False or None, got {spin!r}")
        spin = spin_default() if spin is None else spin
        if provider not in PROVIDERS:  # before hashing a gigabyte of weights
            raise UsageError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise UsageError(f"Model.load needs the path of a bundle folder, got {path!r}")
        folder = Path(path)
        if optimum.is_optimum_folder(folder):
            engine, tokenizer, spec, info = optimum.load(folder, provider, threads, spin)
            return cls(engine, tokenizer, spec, folder, info, time.perf_counter() - start)
        spec = read_verified_spec(folder, verify)
        if spec.task == "embedding":  # vectors, not text: gptedge.runtime.embedder
            from gptedge.runtime.embedder import EmbeddingModel

            return EmbeddingModel.from_spec(folder, spec, provider, threads, cache, start)  # type: ignore[return-value]
        choice = choose_provider(provider, spec)
        model_path = folder / MODEL_NAME
        scan = scan_graph(model_path)  # before onnxruntime reads a byte of it
        # gptedge.json is not covered by its own checksums:
        # its sizes must describe this graph before anything is sized by them.
        check_graph(spec, scan.inputs, scan.outputs,
                    scan.gathered_by(spec.io.position_ids) if spec.io.position_ids else [], scan.types)
        tokenizer = load_tokenizer(folder / TOKENIZER_NAME, spec.architecture.vocab_size)
        key = cache_key(spec, folder, choice.name) if cache else None
        session, info = create_session(model_path, choice, threads, key, spin)
        engine = make_engine(session, spec, info.choice)
        store = PrefixStore(int(prefix_cache_mb * 2**20)) if prefix_cache_mb and engine.kv_device_is_host else None
        return cls(engine, tokenizer, spec, folder, info, time.perf_counter() - start, store)

    # -- stored prompts ----------------------------------------------------------------------------------
    def save_prompt_cache(self, path: str | os.PathLike[str]) -> int:
        """Write the stored prompts' keys and values (see `Model.load`'s prefix_cache_mb) to `path`, so that a
        later process that loads this same bundle starts with them (`load_prompt_cache`); returns the count."""
        return self._store_for_files().save_file(path, self._identity())

    def load_prompt_cache(self, path: str | os.PathLike[str]) -> int:
        """Add the prompts `save_prompt_cache` wrote; a file written for another bundle is refused."""
        a, engine = self.spec.architecture, self.engine
        layout = (len(engine.past_names), a.n_kv_head, a.head_dim, np.dtype(engine.kv_dtype))
        return self._store_for_files().load_file(path, self._identity(), layout)

    def _store_for_files(self) -> PrefixStore:
        if self.prefix_store is None:
            raise UsageError("this model keeps no prompt cache (prefix_cache_mb=0, or its KV lives on a device)")
        return self.prefix_store

    def _identity(self) -> str:
        """The bundle's files (their sha256) and KV type: what the stored keys and values depend on."""
        facts = {"files": self.spec.files, "kv": self.spec.kv_cache.dtype, "dtype": self.spec.dtype}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    # -- basics ----------------------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        """The provider that really runs the model ("cpu", "cuda" or "dml")."""
        return self.session_info.choice.name

    @property
    def context_length(self) -> int:
        return self.spec.architecture.context_length

    @property
    def eos_id(self) -> int | None:
        return self.spec.special_tokens.get("eos_id")

    @property
    def pad_id(self) -> int:
        """The token that fills a batch's shorter rows (never attended to): the bundle's pad id, else eos, else 0."""
        return self.spec.pad_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every token that ends a generation by default: the bundle's stop ids (Llama 3 has three), else its eos."""
        ids = self.spec.special_tokens.get("stop_ids") or ([] if self.eos_id is None else [self.eos_id])
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        if not isinstance(text, str):
            raise UsageError(f"expected text (str), got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: undecodable bytes in argv, broken UTF-16 from a GUI
            raise UsageError(f"the text is not valid Unicode (an unpaired surrogate at position {exc.start}); "
                             "pass UTF-8 text") from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are skipped by default, as in generated text."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise UsageError(f"token ids {[i for i in ids if i < 0][:5]} are outside the vocabulary; ids are >= 0")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt as validated token ids: a non-empty string, or a non-empty list of ids in the vocabulary.

        A text prompt starts with the bos token when the model asks for it (`add_bos`, as GGUF files declare:
        llama.cpp's prompts do the same); chat templates write their own. Token ids are taken as given.
        """
        if isinstance(prompt, str):
            if not prompt:
                raise UsageError("the prompt is empty; pass some text (or token ids)")
            special = self.spec.special_tokens
            bos = [special["bos_id"]] if special.get("add_bos") and "bos_id" in special else []
            return check_prompt_ids(bos + self.encode(prompt), self.spec.architecture.vocab_size)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence | np.ndarray):
            raise UsageError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        return check_prompt_ids(list(prompt), self.spec.architecture.vocab_size)

    def sampling_params(self, params: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
        """SamplingParams from the bundle's generation defaults, then `params`, then keyword overrides.

        Stop token ids default to the bundle's stop ids (its eos). Unknown keywords raise UsageError.
        """
        unknown = sorted(set(overrides) - _PARAM_NAMES)
        if unknown:
            raise UsageError(f"unknown sampling option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(_PARAM_NAMES))}")
        if params is not None and not isinstance(params, SamplingParams):
            raise UsageError(f"params must be a SamplingParams, got {type(params).__name__}")
        base: dict[str, Any] = {k: v for k, v in self.spec.generation_defaults.items() if k in _PARAM_NAMES}
        if self.stop_ids:
            base.setdefault("stop_token_ids", self.stop_ids)
        if params is not None:
            base.update({f.name: getattr(params, f.name) for f in fields(SamplingParams)})
        base.update(overrides)
        return SamplingParams(**base)

    def _fit_context(self, ids: list[int], params: SamplingParams, explicit_max: bool,
                     truncate: str | None) -> tuple[list[int], SamplingParams, str]:
        """Fit prompt + max_new_tokens into the context: error, left-truncate, or (default budget) shorten."""
        if truncate not in TRUNCATE_MODES:
            raise UsageError(f"truncate must be None or 'left', got {truncate!r}", field="truncate")
        context, n, m = self.context_length, len(ids), params.max_new_tokens
        if n + m <= context:
            return ids, params, "length"
        if truncate == "left":
            if m >= context:
                raise ContextLengthError(f"max_new_tokens ({m}) must be below the context ({context}) "
                                         "to leave room for a prompt")
            return ids[n - (context - m):], params, "length"
        if not explicit_max and n < context:
            return ids, replace(params, max_new_tokens=context - n), "context"
        raise ContextLengthError(
            f"the prompt ({n} tokens) + max_new_tokens ({m}) exceed the model's context of {context} tokens; "
            "shorten the prompt, lower max_new_tokens, or pass truncate='left' to keep the most recent tokens",
            field="truncate")

    def _prepare(self, prompt, params, truncate, overrides) -> tuple[list[int], SamplingParams, str]:
        p = self.sampling_params(params, **overrides)
        explicit = params is not None or "max_new_tokens" in overrides
        return self._fit_context(self.prompt_ids(prompt), p, explicit, truncate)

    # -- generation ------------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        truncate: str | None = None,
        cancel=None,
        on_token: Callable[[int], None] | None = None,
        speculative: Speculative = None,
        cache_prompt: bool = True,
        constraint: Any = None,
        **sampling: Any,
    ) -> Stream:
        """Yield text pieces as they are generated; they never split a UTF-8 character.

        Joined, the pieces equal `generate(...)`'s text for the same arguments and seed.
        `sampling` takes SamplingParams fields (temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, max_new_tokens, stop_token_ids, stop_strings, seed).
        `truncate="left"` keeps the most recent prompt tokens when prompt + max_new_tokens exceed the
        context (otherwise ContextLengthError). `cancel`: a CancelToken or threading.Event.
        `on_token(id)`: called with each sampled id as it is chosen (per-token timing, token-level UIs).
        `speculative` verifies several proposed tokens per engine step, keeping the output exact (greedy: the
        same tokens; sampling: the same distribution, though not the same text for a seed as without it):
        "lookup" proposes what followed earlier occurrences of the last few tokens in the prompt and output
        (free; faster when the output copies from the input); a loaded `Model` with the same tokenizer is a
        draft model that proposes (faster when it is much smaller and often agrees; decoding falls back to
        plain steps while it does not pay). See gptedge.runtime.speculative and gptedge.runtime.draft;
        `result.timings.proposed` / `accepted` say how it went.
        `cache_prompt=False`: neither reuse a stored prompt prefix nor store this prompt (the model's
        prefix_store, see `Model.load`). `constraint`: a LogitsConstraint that masks each step's logits
        (gptedge.runtime.structured: a JSON schema or a grammar), as `chat` uses for enforced tool calls.
        """
        _check_cancel(cancel)
        ids, p, reason = self._prepare(prompt, params, truncate, sampling)
        seq = Decoding(self.tokenizer, ids, p, length_reason=reason, constraint=constraint)
        loop = self._decode_loop(speculative, seq)
        store = self.prefix_store if cache_prompt else None
        return Stream(loop(cancel=cancel, on_token=on_token, store=store), seq)

    def _decode_loop(self, speculative: Speculative, seq: Decoding) -> Callable[..., Iterator[str]]:
        """The loop `speculative` asks for, over `seq`; a draft's tokenizer is checked here, its context when the
        loop is made (both before anything runs)."""
        if speculative is None:
            return partial(stream_tokens, self.engine, seq)
        if isinstance(speculative, str) and speculative == "lookup":
            return partial(stream_speculative, self.engine, seq)
        if isinstance(speculative, Model):
            if speculative not in self._drafts:
                check_tokenizer(self, speculative)
                self._drafts.add(speculative)
            cost = step_cost_ratio(self.spec.architecture, speculative.spec.architecture)
            return partial(stream_draft, self.engine, seq, speculative.engine, cost=cost)
        shown = repr(speculative) if isinstance(speculative, str) else f"a {type(speculative).__name__}"
        raise UsageError(f"speculative must be None, 'lookup' or a loaded draft Model (Model.load(...)), got {shown}")

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        truncate: str | None = None,
        cancel=None,
        speculative: Speculative = None,
        cache_prompt: bool = True,
        constraint: Any = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Generate a completion of `prompt` (same arguments as `stream`)."""
        stream = self.stream(prompt, params, truncate=truncate, cancel=cancel, speculative=speculative,
                             cache_prompt=cache_prompt, constraint=constraint, **sampling)
        for _ in stream:
            pass
        return stream.result  # type: ignore[return-value]

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        template: str | None = None,
        **sampling: Any,
    ) -> ChatReply:
        """One assistant turn for `messages` ([{"role", "content"}], OpenAI's shape, tool calls and results too):
        its text, or the tool calls it makes.

        tools: OpenAI tool specs ({"type": "function", "function": {name, description, parameters}}), rendered
          through the bundle's chat template (or `template`) as transformers renders them, in the call format the
          template teaches (gptedge.runtime.tools). tool_choice: "auto" (default with tools), "none",
          "required" or {"type": "function", "function": {"name": ...}}; the last two are enforced (only a
          listed function with schema-valid arguments can be written), which needs llguidance (the serve extra).
        """
        from gptedge.runtime.chat import template_for
        from gptedge.runtime.tools import conversation, plan_tools

        chat_template = template_for(self, template)
        tool_plan, native = plan_tools(chat_template.source, None if tools is None else list(tools), tool_choice,
                                       parallel_tool_calls)
        rendered, extra = conversation(list(messages), tool_plan.tools if tool_plan else None,
                                       tool_plan.format if tool_plan else None, native)
        ids = self.encode(chat_template.render(rendered, **extra))
        constraint = None
        if tool_plan is not None:
            from gptedge.runtime.structured import GrammarFactory

            constraint = GrammarFactory(self.tokenizer, self.stop_ids).lark(tool_plan.grammar)
        result = self.generate(ids, params, constraint=constraint,
                               stop_strings=tuple(sampling.pop("stop_strings", ())) + chat_template.stop_strings,
                               **sampling)
        calls = tool_plan.calls(result.text) if tool_plan is not None else None
        return ChatReply(None if calls else result.text, calls, result)

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
        *,
        truncate: str | None = None,
        cancel=None,
        **sampling: Any,
    ) -> list[GenerationResult]:
        """Generate for several prompts of any lengths in one batch (one prefill, one step for all rows).

        Row i gives the same result as `generate(prompts[i], ...)` alone (the same seed per row).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise UsageError("generate_batch needs a non-empty list of prompts")
        _check_cancel(cancel)
        p = self.sampling_params(params, **sampling)
        explicit = params is not None or "max_new_tokens" in sampling
        fitted = [self._fit_context(self.prompt_ids(x), p, explicit, truncate) for x in prompts]
        seqs = [Decoding(self.tokenizer, ids, q, length_reason=reason) for ids, q, reason in fitted]
        return generate_rows(self.engine, seqs, cancel=cancel, pad_id=self.pad_id)

    # -- scoring ---------------------------------------------------------------------------------------
    def next_tokens(self, prompt: str | Sequence[int], k: int = 10) -> list[tuple[str, int, float]]:
        """The k most likely next tokens after `prompt`: [(token text, token id, probability)], most likely first."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UsageError(f"k must be an integer >= 1, got {k!r}")
        ids = self.prompt_ids(prompt)
        if len(ids) > self.context_length:
            ids = ids[-self.context_length:]  # only the last `context` tokens can condition the next one
        cache = self.engine.new_cache(1, len(ids))
        try:
            logits = self.engine.prefill(cache, np.asarray(ids, np.int64)[None, :])[0]
            probs = softmax(logits)
        finally:
            cache.release()
        return [(self.decode([int(i)], skip_special_tokens=False), int(i), float(probs[i]))
                for i in ranked_top_k(probs, k)]

    def perplexity(self, text: str | Sequence[int], window: int | None = None, stride: int | None = None) -> float:
        """Perplexity of `text` (or token ids) under the model.

        Texts longer than the context are scored with a sliding window (`window` tokens, default the
        context; advancing by `stride`, default window // 2), each token once, with the most context.
        """
        from gptedge.runtime.evaluate import perplexity

        return perplexity(self.engine, self.prompt_ids(text), window=window, stride=stride).ppl

    def close(self) -> None:
        """Drop pooled KV buffers (the session itself goes away with the object)."""
        self.engine.clear_pool()

    def __repr__(self) -> str:
        a = self.spec.architecture
        return (f"Model({str(self.folder)!r}, provider={self.provider!r}, dtype={self.spec.dtype!r}, "
                f"n_layer={a.n_layer}, n_embd={a.n_embd}, context={a.context_length}, vocab={a.vocab_size})")


Speculative = Union[str, Model, None]  # "lookup", a draft Model, or None (plain decoding)


def _check_cancel(cancel) -> None:
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise UsageError("cancel must be a CancelToken or threading.Event (anything with is_set()), "
                         f"got {type(cancel).__name__}")

