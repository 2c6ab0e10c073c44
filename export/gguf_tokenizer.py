"""A GGUF file's `tokenizer.ggml.*` vocabulary -> a `tokenizers.Tokenizer` that encodes as llama.cpp does.

Two vocabulary kinds, as llama.cpp names them:

- `gpt2`: byte-level BPE (tokens, merges, token types). The `pre` name picks llama.cpp's pre-tokenizer: a
  list of regular expressions applied one after another, each splitting the pieces of the one before
  (the table below is llama.cpp's src/llama-vocab.cpp for the families gptedge imports). Some pre-tokenizers
  take a piece that is itself a token without merging (`ignore_merges`, Llama 3's).
- `llama`: SentencePiece BPE (tokens, scores, byte-fallback tokens <0x00>..<0xFF>). llama.cpp merges the
  adjacent pair whose result has the highest score; that is BPE with merges ranked by score, which is how
  transformers' converter builds it too.

Control and user-defined tokens are matched in text before the pre-tokenizer, as added tokens. Anything
else (an unknown model kind or pre-tokenizer, WordPiece, RWKV) is refused in one line naming what is
supported.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from gptedge.export.gguf_file import GGUFError, GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> (regular expressions, applied in order; ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **{name: ((_GPT2,), False) for name in ("default", "gpt-2", "phi-2")},
    **{name: ((_LLAMA3,), True) for name in ("llama3", "llama-v3", "llama-bpe")},
    **{name: ((_QWEN2,), False) for name in ("qwen2", "deepseek-r1-qwen")},
    **{name: ((r"\p{N}", _GPT2), False) for name in ("smollm", "starcoder", "refact")},
}
# Token texts llama.cpp treats as the end of a generation whatever the metadata says (llama-vocab.cpp).
END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                     "<|eom_id|>", "<EOT>")


def _fail(file: GGUFFile, what: str) -> GGUFError:
    return GGUFError(f"{file.path}: {what}")


def _strings(file: GGUFFile, key: str) -> list[str]:
    value = file.metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(file, f"the metadata has no {key} list of strings; it carries no usable vocabulary")
    return value


def _token_types(file: GGUFFile, n: int) -> list[int]:
    types = file.metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return [NORMAL] * n
    types = [int(t) for t in types]
    if len(types) != n:
        raise _fail(file, f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens; the file is damaged")
    return types


def _bpe(file: GGUFFile, tokens: list[str]) -> Tokenizer:
    pre = file.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise _fail(file, f"pre-tokenizer {pre!r} is not supported; gptedge reads {', '.join(sorted(PRE_TOKENIZERS))}")
    patterns, ignore_merges = PRE_TOKENIZERS[pre]
    merges = []
    for line in _strings(file, "tokenizer.ggml.merges"):
        left, sep, right = line.partition(" ")
        if not sep or not left or not right:
            raise _fail(file, f"merge {line!r} is not two tokens separated by a space; the file is damaged")
        merges.append((left, right))
    vocab = {text: i for i, text in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every split of a token into two tokens, ranked by the token's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED, UNUSED)}
    ranked = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _spm(file: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = file.metadata.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise _fail(file, "a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")
    scores = [float(s) for s in scores]
    unk = file.metadata.get("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, _merges_by_score(tokens, scores, types), fuse_unk=True, byte_fallback=True,
                     unk_token=tokens[int(unk)] if isinstance(unk, int) and 0 <= unk < len(tokens) else None)
    tok = Tokenizer(bpe)
    steps = [normalizers.Replace(" ", "\u2581")]
    if file.metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(" ", 1, 0)] if file.metadata.get("tokenizer.ggml.add_space_prefix", True) else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *strip])
    return tok


def build_tokenizer(file: GGUFFile) -> Tokenizer:
    """The file's vocabulary as a Tokenizer; control and user-defined tokens become added tokens."""
    kind = file.metadata.get("tokenizer.ggml.model")
    tokens = _strings(file, "tokenizer.ggml.tokens")
    types = _token_types(file, len(tokens))
    if kind == "gpt2":
        tok = _bpe(file, tokens)
    elif kind == "llama":
        tok = _spm(file, tokens, types)
    else:
        raise _fail(file, f"tokenizer model {kind!r} is not supported; gptedge reads 'gpt2' (byte-level BPE) and "
                          "'llama' (SentencePiece BPE) vocabularies")
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    return tok


def special_tokens(file: GGUFFile, tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """bos / eos / pad / unk ids and texts, add_bos, and every end-of-generation id, as gptedge.json records them."""
    out: dict[str, Any] = {}
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        tid = file.metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < vocab_size:
            out[f"{kind}_id"] = tid
            out[kind] = tok.id_to_token(tid)
    if file.metadata.get("tokenizer.ggml.add_bos_token") and "bos_id" in out:
        out["add_bos"] = True
    stops = [out["eos_id"]] if "eos_id" in out else []
    for key in ("eot_token_id", "eom_token_id"):
        tid = file.metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(tid, int) and 0 <= tid < vocab_size and tid not in stops:
            stops.append(tid)
    for text in END_OF_GENERATION:
        tid = tok.token_to_id(text)
        if tid is not None and tid < vocab_size and tid not in stops:
            stops.append(tid)
    if len(stops) > 1 or (stops and "eos_id" not in out):
        out["stop_ids"] = stops
    return out
