"""Anything a user (or an embedding app) can feed gptedge gets a typed error that says what to do.

Each case expects a GptEdgeError subclass whose message holds a key phrase; never a raw exception,
a crash or a hang. The CLI cases run `python -m gptedge.cli ...` in real subprocesses (all of them
at once, two at a time, in one module fixture) and assert a non-zero exit, exactly one stderr line
starting with "gptedge", and no traceback. Cases already covered elsewhere in the same form
(tests/test_runtime.py, test_cli_runtime.py, test_export.py, test_train.py, test_quantize.py,
test_hf_export.py) are not repeated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptedge.errors import (
    BundleError,
    CheckpointError,
    ContextLengthError,
    DataError,
    GptEdgeError,
    QuantizeError,
    UsageError,
)
from gptedge.runtime import Model
from gptedge.runtime.bundle import SPEC_NAME, checksum_files

CLI_TIMEOUT_S = 120


# -- helpers -----------------------------------------------------------------------------------------------
def bundle_variant(src: Path, dest: Path, spec_edit: Callable[[dict], Any] | None = None,
                   file_edit: Callable[[Path], Any] | None = None) -> Path:
    """A copy of bundle `src`; `spec_edit` changes the parsed gptedge.json in place, `file_edit` changes
    files, after which the checksums are re-recorded (so only the edit itself can be refused), unless
    it is marked `raw` (applied last, as is: a broken gptedge.json, a file gone missing)."""
    shutil.copytree(src, dest)
    spec = json.loads((dest / SPEC_NAME).read_text())
    is_raw = getattr(file_edit, "raw", False)
    if file_edit is not None and not is_raw:
        file_edit(dest)
        spec["files"] = checksum_files(dest)
    if spec_edit is not None:
        spec_edit(spec)
    (dest / SPEC_NAME).write_text(json.dumps(spec))
    if is_raw:
        file_edit(dest)
    return dest


def raw(edit: Callable[[Path], Any]) -> Callable[[Path], Any]:
    edit.raw = True  # type: ignore[attr-defined]
    return edit


def put(dotted: str, value: Any) -> Callable[[dict], None]:
    """A spec edit setting `a.b.c` to value."""
    def edit(spec: dict) -> None:
        *path, last = dotted.split(".")
        for key in path:
            spec = spec[key]
        spec[last] = value
    return edit


def drop(key: str) -> Callable[[dict], None]:
    return lambda spec: spec.pop(key)


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def one_error_line(stderr: str, command: str) -> str:
    """The single `gptedge COMMAND: error: ...` line; fails on tracebacks or extra gptedge lines."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("gptedge")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"gptedge {command}: error: "), stderr
    return lines[0]


# -- the CLI, in subprocesses --------------------------------------------------------------------------------
# (id, argv with {bundle} {tmp} placeholders (bytes allowed), stdin, key phrase of the error line)
CLI_CASES = [
    ("generate-non-utf8-prompt", ["generate", "{bundle}", b"caf\xe9 \xff"], None, "not valid Unicode"),
    ("generate-stdin-empty", ["generate", "{bundle}", "-"], "", "prompt is empty"),
    ("generate-threads-0", ["generate", "{bundle}", "Hi", "--threads", "0"], None, "threads must be an integer >= 1"),
    ("generate-temperature-nan", ["generate", "{bundle}", "Hi", "--temperature", "nan"], None,
     "temperature must be a finite number"),
    ("generate-min-p-1", ["generate", "{bundle}", "Hi", "--min-p", "1"], None,
     "in [0, 1) (0 switches it off), got 1.0 (option --min-p)"),
    ("generate-seed-negative", ["generate", "{bundle}", "Hi", "--seed", "-1"], None, "seed must be an integer >= 0"),
    ("generate-repetition-0", ["generate", "{bundle}", "Hi", "--repetition-penalty", "0"], None,
     "(option --repetition-penalty)"),
    ("generate-top-k-not-int", ["generate", "{bundle}", "Hi", "--top-k", "abc"], None, "invalid int value: 'abc'"),
    ("generate-bundle-is-a-file", ["generate", "{bundle}/model.onnx", "Hi"], None, "is not a bundle folder"),
    ("generate-bad-tokenizer", ["generate", "{tmp}/bad-tokenizer", "Hi"], None, "not a valid tokenizer.json"),
    ("next-no-gptedge-json", ["next", "{tmp}", "Hi"], None, "it is not a gptedge bundle"),
    ("eval-binary-file", ["eval", "{bundle}", "{tmp}/binary.dat"], None, "as UTF-8 text"),
    ("eval-empty-file", ["eval", "{bundle}", "{tmp}/empty.txt"], None, "is empty"),
    ("eval-directory", ["eval", "{bundle}", "{tmp}"], None, "Is a directory"),
    ("eval-window-0", ["eval", "{bundle}", "{tmp}/text.txt", "--window", "0"], None, "window must be between 1"),
    ("eval-stride-too-big", ["eval", "{bundle}", "{tmp}/text.txt", "--stride", "1000"], None,
     "stride must be between 1 and the window"),
    ("chat-no-room-for-history", ["chat", "{bundle}", "--max-new-tokens", "200"], "hello\n",
     "must be below the context"),
    ("bench-runs-0", ["bench", "{bundle}", "--runs", "0"], None, "--runs must be >= 1"),
    ("bench-json-unwritable", ["bench", "{bundle}", "--runs", "1", "--prompt-tokens", "2", "--new-tokens", "2",
                               "--json", "{tmp}/missing/x.json"], None, "choose a writable path"),
    ("info-garbage-spec", ["info", "{tmp}/garbage-spec"], None, "is not valid JSON"),
    ("quantize-negative-gate", ["quantize", "{bundle}", "{tmp}/q", "--eval-text", "x", "--max-ppl-increase", "-1"],
     None, "max_ppl_increase must be a percentage >= 0"),
    ("quantize-block-size-7", ["quantize", "{bundle}", "{tmp}/q", "--eval-text", "x", "--block-size", "7"], None,
     "block size"),
    ("export-a-bundle", ["export", "{bundle}", "{tmp}/out", "--quiet"], None, "neither a gptedge checkpoint"),
    ("train-dropout-2", ["train", "{tmp}/text.txt", "--out", "{tmp}/run", "--preset", "tiny", "--dropout", "2",
                         "--no-progress"], None, "--dropout must be"),
]


@pytest.fixture(scope="module")
def cli_files(runtime_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli-bad")
    (tmp / "binary.dat").write_bytes(b"\xff\xfe\x00\x01binary")
    (tmp / "empty.txt").write_text("")
    (tmp / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    bundle_variant(runtime_bundle, tmp / "bad-tokenizer",
                   file_edit=write("tokenizer.json", b'{"version": "1.0", "model": 7}'))
    (tmp / "garbage-spec").mkdir()
    (tmp / "garbage-spec" / SPEC_NAME).write_text("{not json")
    return tmp


@pytest.fixture(scope="module")
def cli_results(cli_files: Path, runtime_bundle: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every CLI case run once, two subprocesses at a time; a hang fails its case with TimeoutExpired."""
    def run(case):
        name, argv, stdin, _ = case
        args = [a if isinstance(a, bytes) else a.format(bundle=runtime_bundle, tmp=cli_files) for a in argv]
        try:
            return name, subprocess.run([sys.executable, "-m", "gptedge.cli", *args], input=(stdin or "").encode(),
                                        capture_output=True, timeout=CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            return name, exc

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, CLI_CASES))


@pytest.mark.parametrize("name, argv, stdin, phrase", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_nonzero(cli_results, name, argv, stdin, phrase) -> None:
    proc = cli_results[name]
    assert not isinstance(proc, subprocess.TimeoutExpired), f"{name} hung for {CLI_TIMEOUT_S} s"
    stderr = proc.stderr.decode("utf-8", "replace")
    # > 0: not killed by a signal
    assert proc.returncode not in (0, None) and proc.returncode > 0, (proc.returncode, stderr)
    line = one_error_line(stderr, argv[0])
    assert phrase in line, line


# -- the Python API: prompts, sampling parameters, other calls -------------------------------------------------
# (id, keyword arguments of Model.generate with the prompt as "prompt", error class, key phrase)
GENERATE_CASES = [
    ("lone-surrogate", dict(prompt="abc\ud800"), UsageError, "not valid Unicode"),
    ("float-ids", dict(prompt=np.array([1.5, 2.0])), UsageError, "integer token ids"),
    ("2d-ids", dict(prompt=np.array([[1, 2]])), UsageError, "integer token ids"),
    ("bool-ids", dict(prompt=[True, 1]), UsageError, "integer token ids"),
    ("bytes", dict(prompt=b"hello"), UsageError, "got bytes"),
    ("none", dict(prompt=None), UsageError, "got NoneType"),
    ("huge-id", dict(prompt=[2**70]), UsageError, "outside this model's vocabulary"),
    ("long-prompt", dict(prompt="x " * 400, max_new_tokens=3), ContextLengthError, "truncate='left'"),
    ("temperature-str", dict(temperature="0.5"), UsageError, "temperature must be a finite number"),
    ("temperature-nan", dict(temperature=float("nan")), UsageError, "temperature must be a finite number"),
    ("temperature-inf", dict(temperature=float("inf")), UsageError, "temperature must be a finite number"),
    ("top-k-float", dict(top_k=1.5), UsageError, "top_k must be an integer"),
    ("min-p-1", dict(min_p=1.0), UsageError, "min_p must be in [0, 1)"),
    ("min-p-negative", dict(min_p=-0.1), UsageError, "min_p must be in [0, 1)"),
    ("repetition-0", dict(repetition_penalty=0), UsageError, "repetition_penalty must be a finite number > 0"),
    ("presence-nan", dict(presence_penalty=float("nan")), UsageError, "presence_penalty must be a finite number"),
    ("frequency-minus-inf", dict(frequency_penalty=-float("inf")), UsageError,
     "frequency_penalty must be a finite number"),
    ("stop-ids-none", dict(stop_token_ids=None), UsageError, "must be sequences"),
    ("stop-ids-negative", dict(stop_token_ids=[-1]), UsageError, "non-negative integer token ids"),
    ("stop-strings-int", dict(stop_strings=123), UsageError, "must be sequences"),
    ("stop-strings-none", dict(stop_strings=[None]), UsageError, "non-empty strings"),
    ("max-new-float", dict(max_new_tokens=5.0), UsageError, "max_new_tokens must be an integer"),
    ("max-new-bool", dict(max_new_tokens=True), UsageError, "max_new_tokens must be an integer"),
    ("seed-float", dict(seed=1.5), UsageError, "seed must be an integer >= 0"),
    ("seed-negative", dict(seed=-1), UsageError, "seed must be an integer >= 0"),
    ("params-dict", dict(params={"temperature": 0}), UsageError, "params must be a SamplingParams"),
    ("truncate-no-room", dict(truncate="left", max_new_tokens=128), ContextLengthError, "must be below the context"),
    ("cancel-not-a-token", dict(cancel=True), UsageError, "cancel must"),
]


@pytest.mark.parametrize("name, kwargs, error, phrase", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_bad_input(runtime_model: Model, name, kwargs, error, phrase) -> None:
    kwargs = {"prompt": "Hello", "max_new_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        runtime_model.generate(kwargs.pop("prompt"), **kwargs)
    assert phrase in str(info.value)


OTHER_CALLS = [
    ("batch-empty", lambda m: m.generate_batch([]), UsageError, "non-empty list of prompts"),
    ("batch-a-string", lambda m: m.generate_batch("abc"), UsageError, "non-empty list of prompts"),
    ("batch-empty-row", lambda m: m.generate_batch(["ok", ""]), UsageError, "prompt is empty"),
    ("next-k-bool", lambda m: m.next_tokens("Hi", True), UsageError, "k must be an integer >= 1"),
    ("perplexity-one-token", lambda m: m.perplexity("a"), UsageError, "at least 2 tokens"),
    ("decode-negative-id", lambda m: m.decode([5, -1]), UsageError, "outside"),
    ("encode-not-text", lambda m: m.encode(5), UsageError, "expected text"),
    ("load-provider-none", lambda m: Model.load(m.folder, provider=None), UsageError, "unknown provider"),
    ("load-threads-bool", lambda m: Model.load(m.folder, threads=True), UsageError, "threads must be an integer"),
    ("load-empty-path", lambda m: Model.load(""), UsageError, "needs the path of a bundle folder"),
]


@pytest.mark.parametrize("name, call, error, phrase", OTHER_CALLS, ids=[c[0] for c in OTHER_CALLS])
def test_api_bad_input(runtime_model: Model, name, call, error, phrase, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # Model.load("") looks at the working folder
    with pytest.raises(error) as info:
        call(runtime_model)
    assert phrase in str(info.value)


def test_bad_threads_keep_the_graph_cache_and_say_nothing_else(runtime_model: Model, runtime_graph_cache: Path,
                                                              capfd, caplog) -> None:
    """A bad argument is refused before the optimized-graph cache is touched: the entry survives, no warnings."""
    entries = sorted(p.name for p in (runtime_graph_cache / "graphs").iterdir())
    assert entries, "runtime_model should have filled the graph cache"
    with pytest.raises(UsageError, match="threads must be an integer"):
        Model.load(runtime_model.folder, threads="2")
    assert sorted(p.name for p in (runtime_graph_cache / "graphs").iterdir()) == entries
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# -- bundles ---------------------------------------------------------------------------------------------------
# (id, spec edit, file edit, key phrase); every case must fail Model.load with a BundleError.
BUNDLE_CASES = [
    ("spec-a-list", None, raw(write(SPEC_NAME, b"[1, 2]")), "does not hold a JSON object"),
    ("spec-not-json", None, raw(write(SPEC_NAME, b"{")), "is not valid JSON"),
    ("spec-not-utf8", None, raw(write(SPEC_NAME, b"\xff\xfe{}")), "is not valid JSON"),
    ("no-architecture", drop("architecture"), None, "missing or has unexpected fields"),
    ("n-layer-str", put("architecture.n_layer", "2"), None, "not a plausible size"),
    ("n-layer-0", put("architecture.n_layer", 0), None, "not a plausible size"),
    ("n-kv-head-mismatch", put("architecture.n_kv_head", 3), None, "is not a multiple of n_kv_head=3"),
    ("dtype-int3", put("dtype", "int3"), None, "dtype 'int3' is not one of"),
    ("target-tpu", put("target", "tpu"), None, "target 'tpu' is not one of"),
    ("kv-update-ring", put("kv_cache.update", "ring"), None, "kv_cache.update 'ring'"),
    ("kv-dtype-int4", put("kv_cache.dtype", "int4"), None, "kv_cache.dtype 'int4'"),
    ("kv-dtype-int8-fp32-graph", put("kv_cache.dtype", "int8"), None, "the graph's KV inputs are fp32"),
    ("kv-int8-concat", lambda s: s["kv_cache"].update(dtype="int8", update="concat"), None,
     "needs kv_cache.update 'inplace'"),
    ("io-template-unknown-field", put("io.past_key", "past_{foo}"), None, "io.past_key"),
    ("io-template-not-str", put("io.past_key", 5), None, "io.past_key"),
    ("io-name-not-in-graph", put("io.past_key", "nothing_{layer}"), None, "does not match model.onnx"),
    ("graph-head-dims-mismatch", lambda s: s["architecture"].update(n_head=2, n_kv_head=2, head_dim=32), None,
     "does not match model.onnx"),
    ("graph-vocab-mismatch", put("architecture.vocab_size", 50257), None, "does not match model.onnx"),
    ("special-tokens-a-list", put("special_tokens", [1]), None, "special_tokens"),
    ("eos-id-a-string", put("special_tokens.eos_id", "abc"), None, "special_tokens.eos_id"),
    ("quantization-a-string", put("quantization", "yes"), None, "quantization"),
    ("generation-defaults-bad", put("generation_defaults", {"temperature": -1}), None, "generation_defaults"),
    ("no-model-checksum", lambda s: s["files"].pop("model.onnx"), None, "lists no checksum for model.onnx"),
    ("listed-file-missing", None, raw(lambda d: (d / "model.onnx.data").unlink()), "is missing from"),
    ("model-empty", None, write("model.onnx", b""), "is missing or empty"),
    ("model-random-bytes", None, write("model.onnx", bytes(range(256)) * 20), "not a valid"),
]


@pytest.mark.parametrize("name, spec_edit, file_edit, phrase", BUNDLE_CASES, ids=[c[0] for c in BUNDLE_CASES])
def test_bad_bundle_is_refused_at_load(runtime_bundle: Path, tmp_path: Path, name, spec_edit, file_edit,
                                       phrase) -> None:
    folder = bundle_variant(runtime_bundle, tmp_path / name, spec_edit, file_edit)
    with pytest.raises(BundleError) as info:
        Model.load(folder, provider="cpu", threads=1)
    assert phrase in str(info.value)


# -- checkpoints -----------------------------------------------------------------------------------------------
def _config_edit(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _truncate(name: str, size: int) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:size])


CHECKPOINT_CASES = [
    ("config-not-json", write("config.json", b"{oops"), "neither a gptedge checkpoint"),
    ("version-2", _config_edit(lambda c: c.update(version=2)), "upgrade gptedge"),
    ("no-model-entry", _config_edit(lambda c: c.pop("model")), 'invalid "model" entry'),
    ("heads-do-not-divide", _config_edit(lambda c: c["model"].update(n_head=3)), "must be divisible"),
    ("n-layer-negative", _config_edit(lambda c: c["model"].update(n_layer=-1)), 'invalid "model" entry'),
    ("weights-truncated", _truncate("model.safetensors", 1000), "is not a valid safetensors file"),
    ("weights-header-huge", write("model.safetensors", (10**15).to_bytes(8, "little") + b"{}"),
     "is not a valid safetensors file"),
    ("tokenizer-garbage", write("tokenizer.json", b"{garbage"), "not a valid tokenizer.json"),
    ("hf-sizes-not-numbers", write("config.json", json.dumps({"model_type": "gpt2", "n_positions": "many"}).encode()),
     "invalid sizes"),
]


@pytest.mark.parametrize("name, edit, phrase", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_is_refused_by_export(runtime_checkpoint: Path, tmp_path: Path, name, edit, phrase) -> None:
    from gptedge.export.exporter import export_bundle

    source = tmp_path / "ckpt"
    shutil.copytree(runtime_checkpoint, source)
    edit(source)
    with pytest.raises(CheckpointError) as info:
        export_bundle(source, tmp_path / "out", progress=False)
    assert phrase in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written, no temporary folder


# -- export and quantize options (checked before any work) ----------------------------------------------------
EXPORT_OPTIONS = [
    ("kv-ring", dict(kv="ring"), "kv 'ring' is not one of"),
    ("dtype-int8", dict(dtype="int8"), "dtype 'int8' is not one of"),
    ("max-context-bool", dict(max_context=True), "max_context must be a positive integer"),
    ("max-context-negative", dict(max_context=-5), "max_context must be a positive integer"),
]


@pytest.mark.parametrize("name, options, phrase", EXPORT_OPTIONS, ids=[c[0] for c in EXPORT_OPTIONS])
def test_bad_export_options(runtime_checkpoint: Path, tmp_path: Path, name, options, phrase) -> None:
    from gptedge.export.exporter import export_bundle

    with pytest.raises(UsageError, match=phrase):
        export_bundle(runtime_checkpoint, tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


QUANTIZE_OPTIONS = [
    ("gate-nan", dict(max_ppl_increase=float("nan")), "max_ppl_increase must be a percentage"),
    ("eval-tokens-5", dict(max_eval_tokens=5), "max_eval_tokens must be an integer >= 128"),
    ("eval-text-only-binary", dict(eval_text="{tmp}/blobs"), "too short for the quality gate"),
]


@pytest.mark.parametrize("name, options, phrase", QUANTIZE_OPTIONS, ids=[c[0] for c in QUANTIZE_OPTIONS])
def test_bad_quantize_options(runtime_bundle: Path, tmp_path: Path, name, options, phrase) -> None:
    from gptedge.quantize import quantize_bundle

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "a.bin").write_bytes(b"\0\1\2" * 100)
    options = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in options.items()}
    options.setdefault("eval_text", "some held-out text " * 50)
    with pytest.raises(QuantizeError, match=phrase):
        quantize_bundle(runtime_bundle, tmp_path / "out", progress=False, log=lambda line: None, **options)
    assert not (tmp_path / "out").exists()


# -- corpora and training options ------------------------------------------------------------------------------
def _hidden_only(tmp: Path) -> list[str]:
    (tmp / "data").mkdir()
    (tmp / "data" / ".secret.txt").write_text("hidden text")
    return [str(tmp / "data")]


def _bom_only(tmp: Path) -> list[str]:
    (tmp / "bom.txt").write_bytes(b"\xef\xbb\xbf")
    return [str(tmp / "bom.txt")]


def _corpus(tmp: Path) -> list[str]:
    (tmp / "corpus.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    return [str(tmp / "corpus.txt")]


TRAIN_CASES = [
    ("folder-of-hidden-files", _hidden_only, {}, DataError, "contains no files"),
    ("glob-matches-nothing", lambda tmp: [str(tmp / "*.nothing")], {}, DataError, "matches no files"),
    ("only-a-bom", _bom_only, {}, DataError, "the training data is empty"),
    ("dropout-2", _corpus, dict(dropout=2.0), UsageError, "--dropout must be"),
    ("dropout-negative", _corpus, dict(dropout=-0.5), UsageError, "--dropout must be"),
    ("lr-inf", _corpus, dict(lr=float("inf")), UsageError, "--lr must be"),
    ("resume-and-init", _corpus, dict(resume="{ckpt}", init_from="{ckpt}"), UsageError, "exclude each other"),
    ("init-from-a-bundle", _corpus, dict(init_from="{bundle}"), CheckpointError, "neither a gptedge checkpoint"),
]


@pytest.mark.parametrize("name, data, options, error, phrase", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_training_input(runtime_checkpoint: Path, runtime_bundle: Path, tmp_path: Path,
                            name, data, options, error, phrase) -> None:
    from gptedge.train.trainer import TrainConfig, train

    options = {k: v.format(ckpt=runtime_checkpoint, bundle=runtime_bundle) if isinstance(v, str) else v
               for k, v in options.items()}
    config = TrainConfig(out=str(tmp_path / "run"), data=data(tmp_path), preset="tiny", steps=1, batch_size=2,
                         eval_every=0, eval_batches=1, cache_dir=str(tmp_path / "cache"), progress=False, **options)
    with pytest.raises(error) as info:
        train(config, log=lambda line: None)
    assert phrase in str(info.value)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".tmp-gptedge-*"))



# -- properties: any prompt, any sampling values ------------------------------------------------------------------
# Complements tests/test_sampling.py (filters, penalties, validity on valid params) with what it lacks:
# arbitrary *values* for every option (wrong types, NaN, infinities, huge numbers), a seed repeating the
# whole sampled sequence for any valid params, and arbitrary Unicode prompts through the whole model.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=3),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 0.5, 1.0, 1e308, -1e308, 2**31]),
    st.lists(st.integers(-5, 400), max_size=3),
)
OPTION_NAMES = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                "max_new_tokens", "stop_token_ids", "stop_strings", "seed"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(OPTION_NAMES), ANY_VALUE, max_size=5),
       hnp.arrays(np.float32, 50, elements=st.floats(-1e4, 1e4, width=32)), st.integers(0, 2**32 - 1))
def test_any_sampling_values_are_refused_or_sample_valid_repeatable_tokens(options, logits, seed) -> None:
    from gptedge.runtime.sampling import SamplingParams, filter_logits, sample_next

    try:
        params = SamplingParams(**options)
    except UsageError:
        return  # refused with a typed error: fine
    params = SamplingParams(**{**options, "seed": seed if params.seed is None else params.seed})
    history = [int(i) for i in np.argsort(logits)[-5:]]
    assert not np.isnan(filter_logits(logits, params, history)).any()

    def run() -> list[int]:
        rng, seen, out = params.make_rng(), list(history), []
        for step in range(6):
            token = sample_next(np.roll(logits, step), params, rng, seen)
            assert 0 <= token < logits.size
            seen.append(token)
            out.append(token)
        return out

    assert run() == run()  # the same seed repeats the whole sequence


PROMPT_TEXT = st.lists(st.one_of(st.text(max_size=6),
                                 st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "😀",
                                                  "<|endoftext|>", "\r\n"])), max_size=8).map("".join)


@settings(max_examples=60, deadline=None)
@given(PROMPT_TEXT)
def test_any_prompt_text_generates_or_is_a_usage_error(runtime_model: Model, prompt: str) -> None:
    try:
        stream = runtime_model.stream(prompt, temperature=0.0, max_new_tokens=3, stop_token_ids=())
        pieces = list(stream)
    except GptEdgeError as exc:
        assert isinstance(exc, UsageError) and ("prompt is empty" in str(exc) or "not valid Unicode" in str(exc)
                                                or "context" in str(exc)), exc
        return
    result = stream.result
    assert "".join(pieces) == result.text
    assert result.finish_reason == "length" and len(result.token_ids) == 3


@pytest.mark.parametrize("kwargs, phrase", [({"window": 2.5}, "whole number"), ({"stride": "8"}, "whole number")])
def test_perplexity_window_and_stride_must_be_whole_numbers(runtime_model, kwargs, phrase):
    from gptedge.errors import UsageError

    with pytest.raises(UsageError, match=phrase):
        runtime_model.perplexity("def f(x):\n    return x + 1\n", **kwargs)


@pytest.mark.parametrize("path", [None, 3, ""])
def test_load_needs_a_path(path):
    from gptedge.errors import GptEdgeError
    from gptedge.runtime import Model

    with pytest.raises(GptEdgeError, match="path|bundle|exist"):
        Model.load(path)
