"""Embedding bundles at run time: texts in, one vector each out (`gptedge export --embeddings`).

`Model.load` returns an `EmbeddingModel` for a bundle whose gptedge.json says `"task": "embedding"`. Texts are
tokenized as the model's own tokenizer does with its special tokens (what sentence-transformers feeds), sorted by
length into batches so little padding is computed, right-padded with an attention mask, and returned in the
order given. A text longer than the context is an error unless `truncate` is set.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime.bundle import EMBEDDING_OUTPUT, MODEL_NAME, TOKENIZER_NAME, BundleSpec, check_graph
from gptedge.runtime.providers import SessionInfo

MAX_BATCH = 256


class EmbeddingModel:
    """A loaded embedding bundle."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, spec: BundleSpec, folder: Path,
                 info: SessionInfo, load_s: float) -> None:
        self.session, self.tokenizer, self.spec, self.folder = session, tokenizer, spec, folder
        self.session_info, self.load_seconds = info, load_s

    @classmethod
    def from_spec(cls, folder: Path, spec: BundleSpec, provider: str, threads: int | None, cache: bool,
                  started: float) -> "EmbeddingModel":
        """Load after Model.load has read and verified gptedge.json (its checks are the same for every task)."""
        from gptedge.runtime.loading import load_tokenizer
        from gptedge.runtime.onnx_scan import scan_graph
        from gptedge.runtime.providers import cache_key, choose_provider, create_session

        choice = choose_provider(provider, spec)
        scan = scan_graph(folder / MODEL_NAME)
        check_graph(spec, scan.inputs, scan.outputs, [], scan.types)
        tokenizer = load_tokenizer(folder / TOKENIZER_NAME, spec.architecture.vocab_size)
        key = cache_key(spec, folder, choice.name) if cache else None
        session, info = create_session(folder / MODEL_NAME, choice, threads, key)
        return cls(session, tokenizer, spec, folder, info, time.perf_counter() - started)

    # -- facts ------------------------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        return self.session_info.choice.name

    @property
    def context_length(self) -> int:
        return self.spec.architecture.context_length

    @property
    def dimensions(self) -> int:
        return self.spec.architecture.n_embd

    @property
    def prompts(self) -> dict[str, str]:
        """Named prefixes the model was trained with (e.g. {"query": "Instruct: ...\\nQuery: "})."""
        return dict((self.spec.embedding or {}).get("prompts") or {})

    def encode(self, text: str) -> list[int]:
        """Token ids as the model embeds them (the tokenizer's special tokens included)."""
        if not isinstance(text, str):
            raise UsageError("a text to embed must be a string", field="input")
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # -- vectors ------------------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str] | Sequence[Sequence[int]], *, batch_size: int = 32, truncate: bool = False,
              prompt: str | None = None, dimensions: int | None = None) -> np.ndarray:
        """Vectors [N, D] float32 for `texts` (strings, or lists of token ids), in order.

        prompt: the name of one of the model's `prompts` (or None) put before each text. dimensions: keep the
        first `dimensions` entries (renormalised when the model normalises), for models trained to allow it.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
            raise UsageError(f"batch_size must be an integer in [1, {MAX_BATCH}], got {batch_size!r}",
                             field="batch_size")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                       or not 1 <= dimensions <= self.dimensions):
            raise UsageError(f"dimensions must be an integer in [1, {self.dimensions}], got {dimensions!r}",
                             field="dimensions")
        ids = self.token_ids(texts, truncate=truncate, prompt=prompt)
        out = np.empty((len(ids), self.dimensions), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = np.full((len(rows), width), self.spec.pad_id, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for r, i in enumerate(rows):
                batch[r, : len(ids[i])], mask[r, : len(ids[i])] = ids[i], 1
            out[rows] = self.session.run([EMBEDDING_OUTPUT], {"input_ids": batch, "attention_mask": mask})[0]
        if dimensions is not None and dimensions < self.dimensions:
            out = out[:, :dimensions]
            if (self.spec.embedding or {}).get("normalize"):
                out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def token_ids(self, texts: Sequence[str] | Sequence[Sequence[int]], *, truncate: bool = False,
                  prompt: str | None = None) -> list[list[int]]:
        """The ids each text is embedded as (prompt prefix and special tokens included, checked against the
        context and the vocabulary)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise UsageError("texts must be a non-empty list of strings (or of token-id lists)", field="input")
        prefix = self._prefix(prompt)
        return [self._ids(t, prefix, truncate, i) for i, t in enumerate(texts)]

    def _prefix(self, prompt: str | None) -> str:
        if prompt is None:
            return ""
        if prompt not in self.prompts:
            known = ", ".join(self.prompts) or "none"
            raise UsageError(f"prompt {prompt!r} is not one of this model's prompts ({known})", field="prompt")
        return self.prompts[prompt]

    def _ids(self, text: str | Sequence[int], prefix: str, truncate: bool, index: int) -> list[int]:
        if isinstance(text, str):
            ids = self.encode(prefix + text)
        elif isinstance(text, Sequence) and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                for t in text):
            ids = [int(t) for t in text]
            if any(not 0 <= t < self.spec.architecture.vocab_size for t in ids):
                raise UsageError(f"input {index} holds token ids outside the vocabulary", field="input")
        else:
            raise UsageError(f"input {index} must be a string or a list of token ids", field="input")
        if not ids:
            raise UsageError(f"input {index} is empty", field="input")
        if len(ids) > self.context_length:
            if not truncate:
                raise ContextLengthError(f"input {index} is {len(ids)} tokens, more than the model's context of "
                                         f"{self.context_length}; shorten it or ask for truncation", field="input")
            ids = ids[: self.context_length]
        return ids
