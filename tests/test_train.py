"""Training: data pipeline, schedule, checkpoints, exact resume, fine-tuning, and every bad-input error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gptedge.cli import main
from gptedge.errors import CheckpointError, DataError, UsageError
from gptedge.train import data as D
from gptedge.train.checkpoint import (
    TRAINER_STATE,
    is_checkpoint,
    load_checkpoint,
    load_trainer_state,
    read_config,
    save_checkpoint,
)
from gptedge.train.ddp import DistEnv, pick_device
from gptedge.train.presets import PRESETS, get_preset
from gptedge.train.tokenizer import load_tokenizer, train_tokenizer
from gptedge.train.trainer import TrainConfig, _param_groups, iter_metrics, lr_at, resolve_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(out: Path, corpus: Path, cache: Path, **overrides) -> TrainConfig:
    settings = dict(out=str(out), data=[str(corpus)], preset="tiny", steps=10, batch_size=4, eval_every=5,
                    eval_batches=2, cache_dir=str(cache), progress=False)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def train_ckpt(tmp_path_factory: pytest.TempPathFactory, train_corpus: Path, train_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "base"
    return train(tiny(out, train_corpus, train_cache, steps=12, eval_every=6))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------------------------- schedule, optimizer


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # cosine decay
    assert lrs[60] == pytest.approx(0.55e-3)  # half way: the mean of peak and floor
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)  # floor after the schedule


def test_weight_decay_applies_to_matrices_only() -> None:
    from gptedge.train.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=8))
    decay, no_decay = _param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) == 2 + 2 * 4  # wte (tied head, once), wpe, 4 matrices per layer
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(non_embedding=False)


# --------------------------------------------------------------------------------------------- data


def test_resolve_inputs_files_folders_globs(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("1")
    (tmp_path / "a" / "b" / "two.py").write_text("2")
    (tmp_path / "a" / ".hidden").mkdir()
    (tmp_path / "a" / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "c.txt").write_text("3")
    got = D.resolve_inputs([str(tmp_path / "a"), str(tmp_path / "*.txt"), str(tmp_path / "c.txt")])
    assert [p.name for p in got] == ["two.py", "one.txt", "c.txt"]  # sorted per input, hidden skipped, de-duplicated
    with pytest.raises(DataError, match="does not exist"):
        D.resolve_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="matches no files"):
        D.resolve_inputs([str(tmp_path / "*.md")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no files"):
        D.resolve_inputs([str(tmp_path / "empty")])


def test_non_utf8_files_are_skipped_counted_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("hello wörld")
    bad.write_bytes("caf\xe9 latin-1".encode("latin-1"))
    src = D.read_sources([bad, good])
    assert src.texts == ["hello wörld"] and src.skipped == [bad] and src.n_files == 1
    assert "skipped 1 file(s) that are not UTF-8" in capsys.readouterr().err
    with pytest.raises(DataError, match="none of the 1 input file"):
        D.read_sources([bad], log=lambda m: None)


def test_max_bytes_caps_the_corpus_deterministically() -> None:
    files = D.stdlib_files()
    assert len(files) > 100
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in files)
    assert files == D.stdlib_files()
    a = D.read_sources(files, max_bytes=100_000)
    b = D.read_sources(files, max_bytes=100_000)
    assert 99_000 <= a.n_bytes <= 100_000 and a.texts == b.texts


def test_jsonl_puts_the_loss_on_completions_only(tmp_path: Path, train_cache: Path) -> None:
    rows = [{"prompt": f"Q: {i} plus one?\nA:", "completion": f" {i + 1}"} for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = D.read_sources([path])
    assert src.examples[3] == [("Q: 3 plus one?\nA:", False), (" 4", True)] and not src.texts
    tok = train_tokenizer(src.training_texts(), vocab_size=300)
    data = D.load_or_build_tokens(train_cache, "jsonl-test", lambda: src, tok)
    eot = tok.token_to_id("<|endoftext|>")
    # Example 0: prompt tokens masked out, completion tokens and the closing <|endoftext|> kept.
    p = tok.encode(rows[0]["prompt"]).ids
    c = tok.encode(rows[0]["completion"]).ids
    n = len(p) + len(c) + 1
    assert list(data.tokens[:n]) == p + c + [eot]
    assert list(data.mask[:n]) == [0] * len(p) + [1] * (len(c) + 1)
    x, y = D.windows(data, np.array([0]), block_size=n - 1)
    assert list(x[0]) == (p + c)[: n - 1]
    expected = [-100] * (len(p) - 1) + c + [eot]  # y[i] is token i+1, a target only if it is not prompt
    assert list(y[0]) == expected


def test_bad_jsonl_lines_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*\"completion\""):
        D.read_sources([path])
    path.write_text("{oops\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        D.read_sources([path])


def test_token_cache_is_reused_and_keyed_by_files_and_tokenizer(tmp_path: Path, train_corpus: Path) -> None:
    src = D.read_sources([train_corpus])
    tok = train_tokenizer(src.training_texts(), vocab_size=300)
    fp = D.fingerprint([train_corpus], None)
    key = D.cache_key(fp, tok.to_str())
    built = D.load_or_build_tokens(tmp_path, key, lambda: src, tok)
    assert built.tokens.dtype == np.uint16 and built.mask is None and built.meta["n_files"] == 1

    def must_not_read() -> D.Sources:
        raise AssertionError("the cache should have been used")

    again = D.load_or_build_tokens(tmp_path, key, must_not_read, tok)
    assert isinstance(again.tokens, np.memmap) and np.array_equal(again.tokens, built.tokens)
    other_tok = train_tokenizer(src.training_texts(), vocab_size=290)
    assert D.cache_key(fp, other_tok.to_str()) != key
    assert D.fingerprint([train_corpus], 1000) != fp
    train_corpus.touch()  # a newer mtime means possibly new content
    assert D.fingerprint([train_corpus], None) != fp
    assert D.token_dtype(65535) is np.uint16 and D.token_dtype(65536) is np.uint32


def test_split_sampler_and_baseline() -> None:
    data = D.TokenData(np.arange(1000, dtype=np.uint16) % 4, None, {})
    train_part, val_part = data.split(0.1)
    assert len(train_part.tokens) == 900 and len(val_part.tokens) == 100
    assert D.unigram_entropy(val_part, 4) == pytest.approx(math.log(4), abs=1e-3)
    with pytest.raises(DataError, match="block size 100 is larger"):
        D.check_fits(train_part, val_part, 100)
    a, b = D.BatchSampler(train_part, 16, seed=7), D.BatchSampler(train_part, 16, seed=7)
    first = a.global_starts(8)
    state = a.state_dict()
    second = a.global_starts(8)
    assert np.array_equal(first, b.global_starts(8))  # same seed, same batches
    b.load_state_dict(state)
    assert np.array_equal(second, b.global_starts(8))  # restored state continues the same stream
    assert first.max() <= 900 - 16 - 1 and first.min() >= 0


# --------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_folder_contents(train_ckpt: Path) -> None:
    assert sorted(p.name for p in train_ckpt.iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "tokenizer.json", "trainer_state.pt"]
    cfg = read_config(train_ckpt)
    assert cfg["format"] == "gptedge-checkpoint" and cfg["version"] == 1
    assert cfg["step"] == 12 and cfg["tokens_seen"] == 12 * 4 * 64
    assert cfg["train"]["preset"] == "tiny" and cfg["train"]["lr"] == get_preset("tiny")["lr"]
    assert cfg["val_loss"] < cfg["unigram_entropy"] + 2 and math.isfinite(cfg["train_loss"])
    with safe_open(str(train_ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # the tied matrix stored once
    model, meta = load_checkpoint(train_ckpt)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.vocab_size == load_tokenizer(train_ckpt / "tokenizer.json").get_vocab_size()
    assert meta == cfg and is_checkpoint(train_ckpt) and not is_checkpoint(train_ckpt.parent)
    losses = [r["loss"] for r in iter_metrics(train_ckpt) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert load_trainer_state(train_ckpt)["step"] == 12


def test_weights_that_do_not_match_the_config_are_refused(train_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(train_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["n_embd"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not a gptedge checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoint_save_load_round_trip(train_ckpt: Path, tmp_path: Path) -> None:
    model, meta = load_checkpoint(train_ckpt)
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "model")}
    copy = save_checkpoint(tmp_path / "copy", model, extra, (train_ckpt / "tokenizer.json").read_text(), None)
    again, _ = load_checkpoint(copy)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])


def test_resume_is_exact(train_corpus: Path, train_cache: Path, tmp_path: Path) -> None:
    full = train(tiny(tmp_path / "full", train_corpus, train_cache, steps=10, eval_every=3))
    half = train(tiny(tmp_path / "half", train_corpus, train_cache, steps=10, eval_every=3, stop_after=5))
    assert read_config(half)["step"] == 5 and not read_config(half)["final"]
    resumed = train(TrainConfig(out=str(half), resume=str(half), cache_dir=str(train_cache), progress=False))
    a, b = params(load_checkpoint(full)[0]), params(load_checkpoint(resumed)[0])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert read_config(resumed)["step"] == 10 and read_config(resumed)["final"]
    loss = lambda f: [r["loss"] for r in iter_metrics(f) if "loss" in r]  # noqa: E731
    assert loss(full) == loss(resumed)
    sa, sb = load_trainer_state(full), load_trainer_state(resumed)
    assert sa["sampler"] == sb["sampler"]
    assert torch.equal(sa["optimizer"]["state"][0]["exp_avg_sq"], sb["optimizer"]["state"][0]["exp_avg_sq"])


def test_fine_tune_on_jsonl_from_a_checkpoint(train_ckpt: Path, tmp_path: Path, train_cache: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i % 7}\n"} for i in range(300)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(out=str(tmp_path / "ft"), data=[str(path)], init_from=str(train_ckpt), lr=2e-3, steps=8,
                      batch_size=4, eval_every=0, eval_batches=2, cache_dir=str(train_cache), progress=False)
    out = train(cfg)
    meta = read_config(out)
    assert meta["step"] == 8 and meta["train"]["lr"] == 2e-3 and meta["train"]["init_from"] == str(train_ckpt)
    assert meta["data"]["has_mask"] and meta["data"]["n_examples"] == 300
    assert (out / "tokenizer.json").read_text() == (train_ckpt / "tokenizer.json").read_text()
    assert meta["model"] == read_config(train_ckpt)["model"]
    state = load_trainer_state(out)
    assert float(state["optimizer"]["state"][0]["step"]) == 8  # a fresh optimizer, not the source's 12 steps
    losses = [r["loss"] for r in iter_metrics(out) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    # Without --lr, fine-tuning uses the preset's smaller fine-tuning rate.
    default, _ = resolve_config(TrainConfig(out="x", init_from=str(train_ckpt), data=[str(path)]))
    assert default.lr == get_preset("tiny")["finetune_lr"] and default.n_embd == 64


# --------------------------------------------------------------------------------------------- presets, device


def test_presets_resolve_and_unknown_preset_lists_them() -> None:
    for name in PRESETS:
        cfg, _ = resolve_config(TrainConfig(out="x", preset=name))
        assert cfg.block_size == PRESETS[name]["block_size"] and cfg.steps >= 1 and cfg.n_embd % cfg.n_head == 0
    cfg, _ = resolve_config(TrainConfig(out="x", preset="tiny", steps=3, block_size=32))
    assert (cfg.steps, cfg.block_size, cfg.n_layer) == (3, 32, 2)  # explicit options win over the preset
    with pytest.raises(UsageError,
                       match="unknown preset 'huge'; choose one of: tiny, small, tiny-llama, small-llama, gpt2"):
        get_preset("huge")


def test_device_choice() -> None:
    if torch.cuda.is_available():
        assert pick_device("auto", DistEnv()).type == "cuda" and pick_device("cuda", DistEnv()).type == "cuda"
    else:
        assert pick_device("auto", DistEnv()).type in ("cpu", "mps")
        with pytest.raises(UsageError, match="no usable CUDA"):
            pick_device("cuda", DistEnv())
    assert pick_device("cpu", DistEnv()).type == "cpu"
    with pytest.raises(UsageError, match="unknown device"):
        pick_device("tpu", DistEnv())


# --------------------------------------------------------------------------------------------- the CLI


def test_cli_trains_and_prints_the_summary(train_corpus: Path, train_cache: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc = main(["train", str(train_corpus), "--out", str(out), "--preset", "tiny", "--steps", "6", "--batch-size", "4",
               "--eval-batches", "2", "--cache-dir", str(train_cache), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0 and is_checkpoint(out)
    for expected in ("steps: 6", "tokens/s", "train loss:", "val loss:", "unigram baseline", f"checkpoint: {out}"):
        assert expected in stdout


class _Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def _bad_input(kind: str, tmp: Path, corpus: Path, ckpt: Path) -> tuple[list[str], str]:
    """Arguments for one kind of bad input, and the text its error must contain."""
    if kind == "missing data":
        return [str(tmp / "nope.txt")], "does not exist"
    if kind == "empty data":
        (tmp / "empty.txt").write_text("")
        return [str(tmp / "empty.txt")], "the training data is empty"
    if kind == "all non-UTF-8":
        (tmp / "a.bin").write_bytes(b"\xff\xfe\x00\x81" * 100)
        (tmp / "b.bin").write_bytes(b"\xc3\x28" * 100)
        return [str(tmp / "a.bin"), str(tmp / "b.bin")], "none of the 2 input file(s) is UTF-8"
    if kind == "block size larger than the data":
        (tmp / "short.txt").write_text("print('hello world')\n" * 20)
        return [str(tmp / "short.txt"), "--block-size", "64"], "block size 64 is larger than the data"
    if kind == "unknown preset":
        return [str(corpus), "--preset", "huge"], "unknown preset 'huge'; choose one of: tiny, small, tiny-llama"
    if kind == "incompatible resume":
        return [str(corpus), "--resume", str(ckpt), "--preset", "small"], "incompatible model shape"
    if kind == "pickle in trainer state":
        evil = tmp / "evil"
        shutil.copytree(ckpt, evil)
        torch.save({"step": 1, "optimizer": {}, "sampler": {}, "rng": _Evil(tmp / "pwned")}, evil / TRAINER_STATE)
        return [str(corpus), "--resume", str(evil)], "refused"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "missing data", "empty data", "all non-UTF-8", "block size larger than the data", "unknown preset",
    "incompatible resume", "pickle in trainer state",
])
def test_bad_input_is_one_line_error_and_writes_nothing(kind: str, tmp_path: Path, train_corpus: Path, train_ckpt: Path,
                                                        train_cache: Path, capsys: pytest.CaptureFixture) -> None:
    args, message = _bad_input(kind, tmp_path, train_corpus, train_ckpt)
    out = tmp_path / "out"
    preset = [] if "--preset" in args else ["--preset", "tiny"]
    rc = main(["train", *args, *preset, "--out", str(out), "--steps", "2", "--cache-dir", str(train_cache),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("gptedge train: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-gptedge-*"))
    assert not (tmp_path / "pwned").exists()


def test_pickled_trainer_state_is_a_checkpoint_error(train_ckpt: Path, tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    shutil.copytree(train_ckpt, evil)
    torch.save({"x": _Evil(tmp_path / "pwned")}, evil / TRAINER_STATE)
    with pytest.raises(CheckpointError, match="refused"):
        load_trainer_state(evil)
    assert not (tmp_path / "pwned").exists()


def test_existing_output_needs_force(train_corpus: Path, train_cache: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["train", str(train_corpus), "--out", str(out), "--preset", "tiny", "--cache-dir", str(train_cache)])
    assert rc == 2 and "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_tiny_preset_learns_well_below_the_unigram_baseline(train_corpus: Path, train_cache: Path,
                                                            tmp_path: Path) -> None:
    # 120 steps of 16 windows: about 2 passes over the 33k training tokens.
    out = train(TrainConfig(out=str(tmp_path / "learn"), data=[str(train_corpus)], preset="tiny", steps=120,
                            batch_size=16, vocab_size=384, eval_every=0, cache_dir=str(train_cache), progress=False))
    meta = read_config(out)
    # A context-free model cannot beat the unigram entropy; the transformer must use the context to get below it.
    assert meta["val_loss"] < meta["unigram_entropy"] - 0.1, (meta["val_loss"], meta["unigram_entropy"])


def test_a_diverging_run_stops_with_advice_and_saves_no_nan_weights(train_corpus: Path, train_cache: Path,
                                                                    tmp_path: Path) -> None:
    from gptedge.errors import TrainingDiverged

    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        train(tiny(out, train_corpus, train_cache, lr=1e6, warmup=0, grad_clip=0.0, eval_every=0, steps=20))
    assert not out.exists()


def test_an_interrupted_run_says_which_checkpoint_it_kept(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    from gptedge.cli import main
    from gptedge.train import trainer

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "5"]) == 130
    assert "no checkpoint was written" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"step": 200}))
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "5"]) == 130
    assert f"is from step 200; continue with --resume {tmp_path / 'run'}" in capsys.readouterr().err
