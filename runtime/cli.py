"""`gptedge generate | chat | next | eval | info | bench`: the runtime's commands.

Top-level imports stay light (argparse, json, pathlib): numpy/onnxruntime are imported inside `run`,
so `gptedge generate --help` is instant. Every failure is a gptedge error the dispatcher prints as
one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gptedge.errors import GptEdgeError, UsageError
from gptedge.text import normalize_newlines, read_text_file

SPIN_HELP = ("--spin: onnxruntime's threads spin until the next step (fastest on cores nothing else uses, much slower "
             "on shared ones); --no-spin: they sleep at once (default: $GPTEDGE_SPIN=1/0, else a spin of a few "
             "microseconds between operators)")

_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "max_new_tokens", "seed")


# -- arguments -----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("bundle", type=Path,
                        help="bundle folder written by `gptedge export` / `gptedge quantize` "
                             "(or an Optimum decoder folder)")
    if command in ("generate", "next"):
        parser.add_argument("prompt",
                            help="prompt text (\\n and \\t mean a newline and a tab, as in --stop); "
                                 "'-' reads it from standard input as it is")
    if command == "eval":
        parser.add_argument("file", type=Path, help="UTF-8 text file to measure perplexity on")
        parser.add_argument("--window", type=int, default=None,
                            help="tokens of context per window (default: the model's context)")
        parser.add_argument("--stride", type=int, default=None,
                            help="how far the sliding window advances (default: window/2)")
    if command == "next":
        parser.add_argument("--top", type=int, default=10, help="how many candidate tokens to list")
    if command == "embed":
        parser.add_argument("text", nargs="*", help="texts to embed (none: one text per line of standard input)")
        parser.add_argument("--prompt", default=None, metavar="NAME",
                            help="put the model's prompt NAME before each text (e.g. query; `gptedge info` lists them)")
        parser.add_argument("--dimensions", type=int, default=None, metavar="N",
                            help="keep the first N entries of each vector (renormalised), for models trained so")
        parser.add_argument("--batch-size", type=int, default=32, help="texts per graph run")
        parser.add_argument("--truncate", action="store_true",
                            help="cut texts longer than the context instead of failing")
    if command in ("generate", "chat"):
        _add_sampling(parser)
        g = parser.add_argument_group("speculative decoding (exact: greedy gives the same text, sampling the same "
                                      "distribution)")
        g.add_argument("--lookup", action="store_true",
                       help="propose tokens that followed earlier occurrences of the last few in the prompt and "
                            "output, and verify several per step: faster when the output copies from the prompt")
        g.add_argument("--draft", type=Path, default=None, metavar="BUNDLE",
                       help="a smaller bundle with the same tokenizer proposes tokens, verified several per step "
                            "(loaded with the same --provider and --threads)")
    if command == "generate":
        parser.add_argument("--stats", action="store_true",
                            help="print time to first token and decode tokens/s to stderr afterwards")
        parser.add_argument("--truncate-left", action="store_true",
                            help="when prompt + max-new-tokens exceed the context, "
                                 "keep the most recent prompt tokens instead of failing")
    if command == "chat":
        parser.add_argument("--system", default="",
                            help="text placed before the conversation (kept when history is truncated)")
        parser.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                            help="Jinja chat template to use instead of the bundle's (default: the bundle's, "
                                 "else a User:/Assistant: transcript)")
    if command == "info":
        parser.add_argument("--json", action="store_true",
                            help="print gptedge.json (with file sizes) as JSON instead of a summary")
        parser.add_argument("--no-verify", action="store_true", help="skip re-computing the files' sha256 checksums")
    if command == "bench":
        parser.add_argument("--prompt-tokens", type=int, default=128,
                            help="prompt length N for the time-to-first-token measurement")
        parser.add_argument("--new-tokens", type=int, default=128, help="tokens M decoded per decode measurement")
        parser.add_argument("--late-position", type=int, default=None,
                            help="position where the late decode measurement starts "
                                 "(default: min(900, context - new-tokens))")
        parser.add_argument("--runs", type=int, default=3, help="repetitions per measurement; the median is reported")
        parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                            help="also write the results to this JSON file")
    if command != "info":
        parser.add_argument("--provider", default="auto",
                            help="execution provider: auto, cpu, cuda or dml "
                                 "(unavailable ones fall back to CPU with a warning)")
        parser.add_argument("--threads", type=int, default=None,
                            help="CPU threads per operator (default: 1 for models under 16 MB, else physical cores)")
        parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                            help=SPIN_HELP)


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (defaults: the bundle's generation defaults, else the library's)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; < 1 sharper, > 1 more random (library default 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only (0 = off)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: smallest set with this total probability, in (0, 1]")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min-p x the top token's probability, in [0, 1)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 makes tokens already seen less likely (1 = off)")
    g.add_argument("--presence-penalty", type=float, default=None,
                   help="subtracted once from every seen token's logit (0 = off)")
    g.add_argument("--frequency-penalty", type=float, default=None,
                   help="subtracted per occurrence of a seen token (0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate (library default 128)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable; not printed; "
                        "\\n and \\t mean a newline and a tab)")
    g.add_argument("--seed", type=int, default=None, help="random seed; the same seed repeats the same output")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {k: getattr(args, k) for k in _SAMPLING if getattr(args, k) is not None}
    if args.stop is not None:
        kwargs["stop_strings"] = tuple(_unescape(s) for s in args.stop)
    return kwargs


def _unescape(text: str) -> str:
    r"""Let `\n` and `\t` in a prompt or `--stop '\n\n'` mean a newline and a tab, as users type them in a shell."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


# The argument an error is about (UsageError.field, set where the check is made) -> this command's option for it
OPTIONS = {"truncate": "--truncate-left", "max_new_tokens": "--max-new-tokens", "top_p": "--top-p",
           "top_k": "--top-k", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
           "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty",
           "stop_strings": "--stop", "threads": "--threads", "seed": "--seed", "temperature": "--temperature",
           "dimensions": "--dimensions", "batch_size": "--batch-size", "prompt": "--prompt"}


def cli_message(exc: UsageError) -> str:
    """The error's message and, when it is about an option of this command, the option to change."""
    option = OPTIONS.get(exc.field or "")
    return f"{exc} (option {option})" if option else str(exc)


# -- dispatch -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, command: str) -> int:
    import warnings

    with warnings.catch_warnings():  # provider fallbacks etc. as one "warning: ..." line, not a source location
        warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}", file=sys.stderr)
        try:
            return {"generate": _generate, "chat": _chat, "next": _next, "eval": _eval, "info": _info,
                    "bench": _bench, "embed": _embed}[command](args)
        except UsageError as exc:
            raise type(exc)(cli_message(exc), field=exc.field) from None


def _load(args: argparse.Namespace, bundle: Path | None = None, embedding: bool = False):
    """The bundle as a Model (or, for `embed`, an EmbeddingModel); the other kind is a one-line error."""
    from gptedge.runtime.embedder import EmbeddingModel
    from gptedge.runtime.model import Model

    model = Model.load(args.bundle if bundle is None else bundle, provider=args.provider, threads=args.threads,
                       spin=args.spin)
    if isinstance(model, EmbeddingModel) != embedding:
        raise UsageError("this is an embedding bundle: use gptedge embed" if not embedding else
                         "this bundle generates text; export an embedding model with --embeddings for gptedge embed")
    return model


def _speculative(args: argparse.Namespace):
    """What --lookup / --draft ask for, as `Model.stream`'s `speculative` (the draft loaded like the model)."""
    if args.lookup and args.draft is not None:
        raise UsageError("--lookup and --draft exclude each other; choose one way to propose tokens")
    if args.draft is not None:
        return _load(args, args.draft)
    return "lookup" if args.lookup else None


def _prompt(text: str) -> str:
    if text == "-":
        try:
            text = normalize_newlines(sys.stdin.read())  # UTF-8 whatever the locale (gptedge.text)
        except UnicodeDecodeError as exc:
            raise UsageError(f"standard input is not UTF-8 text ({exc}); save the prompt as UTF-8") from None
    else:
        text = _unescape(text)
    if not text:
        raise UsageError("the prompt is empty; pass some text (or '-' to read it from standard input)")
    return text


def _generate(args: argparse.Namespace) -> int:
    prompt = _prompt(args.prompt)
    speculative = _speculative(args)
    model = _load(args)
    stream = model.stream(prompt, truncate="left" if args.truncate_left else None, speculative=speculative,
                          **_sampling_kwargs(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = stream.result
    if args.stats:
        t = result.timings
        print(f"prompt tokens {t.prompt_tokens} | generated {t.generated_tokens} | finish {result.finish_reason} | "
              f"time to first token {t.ttft_s * 1000:.1f} ms | decode {t.decode_tokens_per_s:.1f} tokens/s | "
              f"provider {model.provider} | load {model.load_seconds:.2f} s"
              + (f" | {'lookup' if args.lookup else 'draft'} accepted {t.accepted}/{t.proposed}"
                 if speculative is not None else ""), file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from gptedge.runtime.chat import fit_messages, template_for

    source = None
    if args.chat_template is not None:
        try:
            source = read_text_file(args.chat_template)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --chat-template {args.chat_template}: {exc}") from None
    speculative = _speculative(args)
    model = _load(args)
    template = template_for(model, source)
    kwargs = _sampling_kwargs(args)
    kwargs["stop_strings"] = tuple(kwargs.get("stop_strings", ())) + template.stop_strings
    params = model.sampling_params(**kwargs)
    if params.max_new_tokens >= model.context_length:
        raise UsageError(f"--max-new-tokens ({params.max_new_tokens}) must be below the context "
                         f"({model.context_length}) to leave room for the conversation")
    messages: list[dict[str, str]] = [{"role": "system", "content": _unescape(args.system)}] if args.system else []
    interactive = sys.stdin.isatty()
    banner = f"chatting with {args.bundle} on {model.provider}; Ctrl-C stops an answer, Ctrl-D quits"
    while True:
        try:  # the banner inside: a Ctrl-C right after it (before input() starts) still ends the chat cleanly
            if banner:
                print(banner, file=sys.stderr)
                banner = ""
            message = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError:
            print("gptedge chat: that line is not valid UTF-8 text; type it again", file=sys.stderr)
            continue
        if not message.strip():
            continue
        if not interactive:
            print(f"you> {message}")
        messages.append({"role": "user", "content": message})
        prompt = fit_messages(model, template, messages, params.max_new_tokens)
        sys.stdout.write("model>")
        answer = []
        stream = model.stream(prompt, params, speculative=speculative)
        try:
            for piece in stream:
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer).strip()})


def _next(args: argparse.Namespace) -> int:
    prompt = _prompt(args.prompt)
    model = _load(args)
    rows = model.next_tokens(prompt, args.top)
    from gptedge.runtime.tokens import token_repr

    shown = [token_repr(model.tokenizer, token_id, text) for text, token_id, _ in rows]
    width = max(len("token"), *(len(s) for s in shown))
    print(f"{'rank':>4}  {'token'.ljust(width)}  {'id':>7}  probability")
    for rank, ((_, token_id, prob), label) in enumerate(zip(rows, shown), 1):
        print(f"{rank:>4}  {label.ljust(width)}  {token_id:>7}  {prob:.4f}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    """One JSON line per text: {"index": i, "embedding": [...]}, in the order given."""
    import json

    texts = args.text or [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        raise UsageError("no text to embed; pass texts or lines on standard input")
    model = _load(args, embedding=True)
    vectors = model.embed(texts, batch_size=args.batch_size, truncate=args.truncate, prompt=args.prompt,
                          dimensions=args.dimensions)
    for i, vector in enumerate(vectors):
        print(json.dumps({"index": i, "embedding": [round(float(x), 7) for x in vector]}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from gptedge.runtime.evaluate import perplexity

    try:
        text = read_text_file(args.file)
    except FileNotFoundError:
        raise UsageError(f"{args.file} does not exist; pass a UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {args.file} as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise UsageError(f"{args.file} is empty; perplexity needs some text")
    model = _load(args)
    ids = model.encode(text)
    result = perplexity(model.engine, ids, window=args.window, stride=args.stride)
    print(f"perplexity {result.ppl:.4f} | nll {result.nll:.4f} nats/token | {result.tokens} tokens scored | "
          f"{args.file}")
    return 0


# -- info -----------------------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    from gptedge.runtime.bundle import read_spec
    from gptedge.runtime.optimum import is_optimum_folder

    folder = args.bundle
    if is_optimum_folder(folder):
        return _info_optimum(folder, args.json)
    spec = read_spec(folder, verify_checksums=not args.no_verify)
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    if args.json:
        from dataclasses import asdict

        print(json.dumps({**asdict(spec), "file_sizes": sizes}, indent=2, ensure_ascii=False))
        return 0
    for line in describe(spec, sizes, verified=not args.no_verify):
        print(line)
    return 0


def _kv_note(spec) -> str:
    """How a quantized cache's scales were made, for `info` (empty for a float cache)."""
    q = spec.kv_cache.quantization
    if not q:
        return ""
    cal = q.get("calibration", {})
    return (f" ({str(q.get('granularity', '?')).replace('_', '-')} scales calibrated on {cal.get('tokens', '?')} "
            f"tokens in {cal.get('windows', '?')} windows)")


def describe(spec, sizes: dict[str, int], verified: bool) -> list[str]:
    """Human summary of a bundle's gptedge.json."""
    from gptedge.runtime.bundle import GENAI_CONFIG_NAME, GENAI_MODEL_NAME

    a = spec.architecture
    lines = [
        f"architecture  {a.family}: {a.n_layer} layers, {a.n_head} heads ({a.n_kv_head} kv) x {a.head_dim}, "
        f"n_embd {a.n_embd}, vocab {a.vocab_size}, context {a.context_length}",
        f"dtype         {spec.dtype} (target {spec.target})",
        f"kv cache      {spec.kv_cache.update}, {spec.kv_cache.layout}, {spec.kv_cache.dtype}{_kv_note(spec)}",
        f"special       {', '.join(f'{k}={v!r}' for k, v in spec.special_tokens.items()) or 'none'}",
        f"defaults      {', '.join(f'{k}={v!r}' for k, v in spec.generation_defaults.items()) or 'none'}",
        f"format        version {spec.format_version}; checksums {'verified' if verified else 'not checked'}",
    ]
    if spec.task == "embedding":
        e = spec.embedding or {}
        prompts = ", ".join(e.get("prompts") or {}) or "none"
        lines[2] = (f"embedding     {e.get('pooling')} pooling, {'normalized' if e.get('normalize') else 'raw'}, "
                    f"{e.get('dimensions')} dimensions, prompts: {prompts} (gptedge embed, /v1/embeddings)")
    if a.details:
        lines.insert(1, f"model         {_model_line(a.details)}")
    if spec.chat_template:
        lines.insert(-1, f"chat template {len(spec.chat_template)} characters (Jinja)")
    if GENAI_CONFIG_NAME in sizes:
        lines.insert(-1, f"genai         {GENAI_MODEL_NAME} + {GENAI_CONFIG_NAME}: onnxruntime-genai runs this bundle")
    for title, data in (("quantization", spec.quantization), ("verification", spec.verification),
                        ("provenance", spec.provenance)):
        lines.append(f"{title:<13} {'' if data else 'none'}".rstrip())
        lines += [f"  {key:<28} {value}" for key, value in _flat(data or {})]
    lines.append("files")
    lines += [f"  {name:<28} {_size(n):>10}" for name, n in sizes.items()]
    lines.append(f"  {'total':<28} {_size(sum(sizes.values())):>10}")
    return lines


def _model_line(d: dict[str, Any]) -> str:
    """'rope (theta 500000, llama3 x8), rmsnorm, swiglu 1536, tied head, q/k norm':
    the model-space point in one line."""
    if d.get("positions") == "rope":
        scaling = d.get("rope_scaling") or {}
        extra = f", {scaling['type']}" + (f" x{scaling['factor']:g}" if "factor" in scaling else "") if scaling else ""
        parts = [f"rope (theta {d.get('rope_theta', 0):g}{extra})"]
    else:
        parts = [f"{d.get('positions', '?')} positions"]
    parts += [str(d.get("norm", "?")), f"{d.get('mlp', '?')} {d.get('intermediate_size', '?')}",
              "tied head" if d.get("tie_embeddings", True) else "untied head"]
    biases = [name for name in ("qkv", "proj", "mlp") if d.get(f"{name}_bias")]
    parts.append(f"biases on {', '.join(biases)}" if biases else "no biases")
    if d.get("qk_norm"):
        parts.append("q/k norm")
    if d.get("sliding_window"):
        parts.append(f"sliding window {d['sliding_window']}")
    return ", ".join(parts)


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """{'a': {'b': 1.23456}, 'ops': {'Add': 3}} -> [('a.b', '1.23456'), ('ops', 'Add 3')]: one row per leaf."""
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if (isinstance(value, dict) and value and all(isinstance(v, int) for v in value.values())
                and key.endswith("op_types")):
            rows.append((name, ", ".join(f"{k} {v}" for k, v in sorted(value.items(), key=lambda kv: -kv[1]))))
        elif isinstance(value, dict):
            rows += _flat(value, name)
        else:
            rows.append((name, f"{value:.6g}" if isinstance(value, float) else str(value)))
    return rows


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _info_optimum(folder: Path, as_json: bool) -> int:
    from gptedge.runtime.optimum import _config, architecture

    config = _config(folder)
    arch = architecture(config)
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    if as_json:
        print(json.dumps({"kind": "optimum", "config": config, "file_sizes": sizes}, indent=2))
        return 0
    print(f"Hugging Face Optimum decoder export ({arch.family}): {arch.n_layer} layers, {arch.n_head} heads x "
          f"{arch.head_dim}, n_embd {arch.n_embd}, vocab {arch.vocab_size}, context {arch.context_length}; "
          "kv cache concat (a copy per step)")
    for name, n in sizes.items():
        print(f"  {name:<24} {_size(n):>10}")
    return 0


# -- bench ----------------------------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    for name in ("prompt_tokens", "new_tokens", "runs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    from gptedge.runtime.bench import format_bench, run_bench

    if args.json is not None and not args.json.parent.resolve().is_dir():
        raise UsageError(f"--json {args.json}: the folder {args.json.parent} does not exist; choose a writable path")
    results = run_bench(args.bundle, args.provider, args.threads, args.prompt_tokens, args.new_tokens,
                        args.late_position, args.runs)
    print(format_bench(results))
    if args.json is not None:
        from gptedge.atomic import atomic_write_bytes

        try:
            atomic_write_bytes(args.json, (json.dumps(results, indent=2) + "\n").encode())
        except OSError as exc:
            raise GptEdgeError(f"cannot write {args.json}: {exc.strerror or exc}; choose a writable path") from exc
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
