"""`gptedge generate | chat | next | eval | info | bench` on a real bundle, and their one-line errors."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptedge.cli import main
from gptedge.runtime import Model


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_streams_the_same_text_as_the_api(capsys, runtime_bundle: Path, runtime_model: Model) -> None:
    rc, out, err = run_cli(capsys, "generate", runtime_bundle, "def add(a, b):", "--temperature", "0",
                           "--max-new-tokens", "20", "--provider", "cpu", "--stats")
    expected = runtime_model.generate("def add(a, b):", temperature=0.0, max_new_tokens=20)
    assert rc == 0 and out == expected.text + "\n"
    assert "time to first token" in err and "tokens/s" in err and "provider cpu" in err


def test_generate_sampling_options_and_stop(capsys, runtime_bundle: Path, runtime_model: Model) -> None:
    args = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1",
            "--presence-penalty", "0.2", "--frequency-penalty", "0.1", "--max-new-tokens", "25", "--seed", "7",
            "--threads", "1"]
    rc, out, _ = run_cli(capsys, "generate", runtime_bundle, "Hello", *args)
    expected = runtime_model.generate("Hello", temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                                      presence_penalty=0.2, frequency_penalty=0.1, max_new_tokens=25, seed=7)
    assert rc == 0 and out == expected.text + "\n"
    full = runtime_model.generate("Hello", temperature=0.0, max_new_tokens=30, stop_token_ids=()).text
    stop = full[6:9]
    rc, out, _ = run_cli(capsys, "generate", runtime_bundle, "Hello", "--temperature", "0", "--max-new-tokens", "30",
                         "--stop", stop, "--stop", "never-seen")
    assert rc == 0 and out == full[: full.index(stop)] + "\n"


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, runtime_bundle: Path, runtime_model: Model) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好，世界。"))
    rc, out, _ = run_cli(capsys, "generate", runtime_bundle, "-", "--temperature", "0", "--max-new-tokens", "10")
    assert rc == 0 and out == runtime_model.generate("你好，世界。", temperature=0.0, max_new_tokens=10).text + "\n"


def test_next_prints_a_table(capsys, runtime_bundle: Path, runtime_model: Model) -> None:
    rc, out, _ = run_cli(capsys, "next", runtime_bundle, "def add(a, b):", "--top", "5")
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].split() == ["rank", "token", "id", "probability"] and len(lines) == 6
    from gptedge.runtime.tokens import token_repr

    rows = runtime_model.next_tokens("def add(a, b):", 5)
    for rank, (line, (text, token_id, prob)) in enumerate(zip(lines[1:], rows), 1):
        assert line.split()[0] == str(rank) and f" {token_id} " in line and line.endswith(f"{prob:.4f}")
        assert token_repr(runtime_model.tokenizer, token_id, text) in line


def test_token_repr_shows_bytes_of_partial_characters(runtime_model: Model) -> None:
    from gptedge.runtime.tokens import token_repr

    ids = runtime_model.encode("龍")  # not in the tiny tokenizer's training text: one token per byte
    assert len(ids) == 3
    shown = [token_repr(runtime_model.tokenizer, i, runtime_model.decode([i])) for i in ids]
    assert "".join(eval(s).hex() for s in shown) == "龍".encode().hex()  # noqa: S307 - repr of bytes
    assert token_repr(runtime_model.tokenizer, runtime_model.encode("Hello")[0], "Hello") == "'Hello'"


def test_eval_prints_perplexity(capsys, tmp_path: Path, runtime_bundle: Path, runtime_model: Model) -> None:
    text = "Hello world! The quick brown fox jumps over the lazy dog.\n" * 8
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    rc, out, _ = run_cli(capsys, "eval", runtime_bundle, path)
    assert rc == 0 and f"perplexity {runtime_model.perplexity(text):.4f}" in out


def test_info_describes_the_bundle(capsys, runtime_bundle: Path) -> None:
    rc, out, _ = run_cli(capsys, "info", runtime_bundle)
    assert rc == 0
    for needle in ("gpt2: 2 layers, 4 heads", "fp32 (target cpu)", "inplace", "quantization  none", "max_abs_diff",
                   "checksums verified", "model.onnx.data", "total", "gptedge-checkpoint", "GroupQueryAttention 2"):
        assert needle in out, needle
    rc, out, _ = run_cli(capsys, "info", runtime_bundle, "--json")
    data = json.loads(out)
    assert rc == 0 and data["architecture"]["n_layer"] == 2 and data["file_sizes"]["model.onnx"] > 0


def test_bench_prints_a_table_and_writes_json(capsys, tmp_path: Path, runtime_bundle: Path) -> None:
    dest = tmp_path / "bench.json"
    rc, out, _ = run_cli(capsys, "bench", runtime_bundle, "--prompt-tokens", "16", "--new-tokens", "16", "--runs", "1",
                         "--json", dest, "--provider", "cpu")
    assert rc == 0 and "time to first token, 16-token prompt" in out and "decode at position 112" in out
    data = json.loads(dest.read_text())
    assert data["late_position"] == 112 and data["decode_tokens_per_s"] > 0 and data["late_decode_tokens_per_s"] > 0
    assert data["ttft_ms"] > 0 and data["reload_graph_cache"] == "hit"


def test_chat_keeps_history_and_survives_long_input(capsys, monkeypatch, runtime_bundle: Path) -> None:
    long_turn = "tell me more " * 60  # longer than the context on its own: truncated, not an error
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hello there\n\n{long_turn}\nand again\n"))
    rc, out, err = run_cli(capsys, "chat", runtime_bundle, "--temperature", "0", "--max-new-tokens", "12", "--system",
                           "Be brief.")
    assert rc == 0, err
    assert out.count("model>") == 3 and "you> Hello there" in out and "you> and again" in out


def test_chat_ctrl_c_stops_the_answer_not_the_program(capsys, monkeypatch, runtime_bundle: Path) -> None:
    real_stream = Model.stream
    calls = []

    def interrupted_stream(self, *args, **kwargs):
        seen: list[int] = []

        def ctrl_c_on_second_token(token_id: int) -> None:
            seen.append(token_id)
            if len(calls) == 1 and len(seen) == 2:
                raise KeyboardInterrupt  # what Ctrl-C does in the middle of the first answer

        stream = real_stream(self, *args, on_token=ctrl_c_on_second_token, **kwargs)
        calls.append(stream)
        return stream

    monkeypatch.setattr(Model, "stream", interrupted_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n"))
    rc, out, _ = run_cli(capsys, "chat", runtime_bundle, "--temperature", "0", "--max-new-tokens", "6")
    assert rc == 0 and "[stopped]" in out and out.count("model>") == 2
    assert calls[0].result.finish_reason == "cancelled"  # the interrupted generation was closed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "{missing}", "Hi"], "is not a bundle folder"),
        (["generate", "{bundle}", ""], "prompt is empty"),
        (["generate", "{bundle}", "Hi", "--temperature", "-1"], "temperature must be"),
        (["generate", "{bundle}", "Hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "{bundle}", "Hi", "--top-p", "0"], "(option --top-p)"),
        (["generate", "{bundle}", "Hi", "--top-k", "-3"], "(option --top-k)"),
        (["generate", "{bundle}", "Hi", "--max-new-tokens", "0"], "(option --max-new-tokens)"),
        (["generate", "{bundle}", "Hi", "--max-new-tokens", "400"], "most recent tokens (option --truncate-left)"),
        (["generate", "{bundle}", "Hi", "--provider", "tpu"], "unknown provider 'tpu'"),
        (["generate", "{bundle}", "Hi", "--stop", ""], "non-empty"),
        (["next", "{bundle}", "Hi", "--top", "0"], "k must be"),
        (["eval", "{bundle}", "{missing}"], "does not exist"),
        (["bench", "{bundle}", "--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
        (["info", "{missing}"], "is not a bundle folder"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path: Path, runtime_bundle: Path, argv, message) -> None:
    argv = [a.format(bundle=runtime_bundle, missing=tmp_path / "missing") for a in argv]
    rc, out, err = run_cli(capsys, *argv)
    assert rc != 0 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tampered_bundle_fails_in_a_subprocess(tmp_path: Path, runtime_bundle: Path) -> None:
    bundle = tmp_path / "tampered"
    shutil.copytree(runtime_bundle, bundle)
    (bundle / "tokenizer.json").write_text((bundle / "tokenizer.json").read_text() + " ")
    proc = subprocess.run([sys.executable, "-m", "gptedge.cli", "generate", str(bundle), "Hi"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gptedge generate: error: bundle file tokenizer.json does not match its sha256 in gptedge.json: "
        "it was modified or corrupted; re-export or re-copy the bundle"
    ]


def test_help_explains_every_option(capsys) -> None:
    import argparse

    from gptedge.runtime.cli import add_arguments

    for command in ("generate", "chat", "next", "eval", "info", "bench"):
        parser = argparse.ArgumentParser()
        add_arguments(parser, command)
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert undocumented == [], (command, undocumented)
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0 and "bundle folder" in capsys.readouterr().out


def test_prompt_escapes_mean_what_they_mean_in_stop(capsys, runtime_bundle: Path, runtime_model: Model) -> None:
    rc, out, _ = run_cli(capsys, "generate", runtime_bundle, "import os\\nimport", "--temperature", "0",
                         "--max-new-tokens", "5", "--provider", "cpu")
    expected = runtime_model.generate("import os\nimport", temperature=0.0, max_new_tokens=5).text
    assert rc == 0 and out == expected + "\n"


def test_an_error_names_its_option_whatever_its_wording(capsys, runtime_bundle: Path, monkeypatch) -> None:
    """The option comes from the error's field, set where the check is made, not from the message's words."""
    from gptedge.errors import UsageError
    from gptedge.runtime.model import Model

    def reworded(self, *args, **kwargs) -> None:
        raise UsageError("a nucleus probability has to lie above zero and at most one", field="top_p")

    monkeypatch.setattr(Model, "sampling_params", reworded)
    rc, _, err = run_cli(capsys, "generate", str(runtime_bundle), "Hi")
    assert rc != 0 and "(option --top-p)" in err and "nucleus" in err

