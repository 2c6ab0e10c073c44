"""gptedge.export on a tiny gptedge checkpoint: the bundle contract, verification, atomic writes, bad input.

Exports are shared per module (each takes seconds): an fp32 in-place CPU bundle, an fp16
CUDA bundle, and an fp32 concat bundle written through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gptedge.cli import main as cli_main
from gptedge.errors import CheckpointError, ExportError, GptEdgeError, OutputExistsError, UsageError
from gptedge.export import exporter
from gptedge.export.exporter import export_bundle
from gptedge.export.graph import CONCAT_IO, graph_names
from gptedge.export.verify import FP16_REL_TOL
from gptedge.runtime.bundle import IOSpec, read_spec, sha256_file
from gptedge.runtime.onnx_scan import scan_model
from gptedge.train.checkpoint import load_checkpoint, save_checkpoint
from gptedge.train.model import GPT, GPTConfig
from gptedge.train.tokenizer import EOT, train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "The quick brown fox jumps over the lazy dog.\n"]
CONFIG = dict(block_size=64, n_layer=2, n_head=3, n_embd=48)


def make_checkpoint(dest: Path, seed: int = 0) -> Path:
    """A random GPT (weights scaled up so greedy output varies) + a byte-level BPE tokenizer, saved as a checkpoint."""
    tok = train_tokenizer(TEXTS * 8, 300)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), **CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return save_checkpoint(dest, model, {}, tok.to_str(), None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("export") / "ckpt")


@pytest.fixture(scope="module")
def gpt(ckpt: Path) -> GPT:
    return load_checkpoint(ckpt)[0]


@pytest.fixture(scope="module")
def bundle_cpu(ckpt: Path, tmp_path_factory) -> tuple[Path, str]:
    """(bundle, what it printed on stderr with progress=False)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out = export_bundle(ckpt, tmp_path_factory.mktemp("export") / "cpu", progress=False)
    return out, err.getvalue()


@pytest.fixture(scope="module")
def bundle_fp16(ckpt: Path, tmp_path_factory) -> Path:
    return export_bundle(ckpt, tmp_path_factory.mktemp("export") / "cuda", target="cuda", progress=False)


@pytest.fixture(scope="module")
def bundle_concat(ckpt: Path, tmp_path_factory) -> tuple[Path, int, str, str]:
    """Written by `gptedge export ... --kv concat --max-context 48`: (bundle, exit code, stdout, stderr)."""
    out_dir = tmp_path_factory.mktemp("export") / "concat"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_main(["export", str(ckpt), str(out_dir), "--kv", "concat", "--max-context", "48"])
    return out_dir, code, stdout.getvalue(), stderr.getvalue()


def spec_json(bundle: Path) -> dict:
    return json.loads((bundle / "gptedge.json").read_text())


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# -- the bundle ---------------------------------------------------------------------------------------------------
def test_cpu_bundle_spec(bundle_cpu, ckpt: Path, gpt: GPT) -> None:
    bundle, stderr = bundle_cpu
    assert stderr == ""  # progress=False is silent
    assert sorted(p.name for p in bundle.iterdir()) == ["gptedge.json", "model.onnx", "model.onnx.data",
                                                        "tokenizer.json"]
    spec = read_spec(bundle)  # checksums verified
    assert set(spec.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert ((spec.dtype, spec.target, spec.kv_cache.update, spec.kv_cache.dtype, spec.kv_cache.layout)
            == ("fp32", "cpu", "inplace", "fp32", "BNSH"))
    assert spec.io == IOSpec()
    a, c = spec.architecture, gpt.config
    assert (a.n_layer, a.n_head, a.n_kv_head, a.head_dim, a.n_embd, a.vocab_size, a.context_length) == (
        c.n_layer, c.n_head, c.n_head, c.head_dim, c.n_embd, c.vocab_size, c.block_size)
    tok_id = json.loads((bundle / "tokenizer.json").read_text())["added_tokens"][0]["id"]
    assert spec.special_tokens == {"bos_id": tok_id, "bos": EOT, "eos_id": tok_id, "eos": EOT}
    assert (bundle / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    prov = spec.provenance
    assert prov["source"] == ckpt.name and prov["source_kind"] == "gptedge-checkpoint"
    assert prov["source_sha256"] == {"model.safetensors": sha256_file(ckpt / "model.safetensors")}
    assert set(prov["tools"]) == {"gptedge", "torch", "onnx", "onnxruntime"} and prov["exported_at"].endswith("+00:00")


def test_cpu_bundle_verification_numbers(bundle_cpu) -> None:
    v = read_spec(bundle_cpu[0]).verification
    assert v["steps"] >= 32 and v["batch"] == 2 and len(set(v["prompt_lengths"])) == 2
    assert v["tolerance"] == 1e-4
    assert 0 <= v["max_abs_diff_prefill"] <= 1e-4 and 0 <= v["max_abs_diff_decode"] <= 1e-4
    assert v["greedy_match"] is True and v["greedy_agreement"] == 1.0
    # each row: last prompt position + steps
    assert v["greedy_compared"] == v["batch"] * (v["steps"] + 1) + v["chunk_tokens"]


def test_graph_matches_bundle_contract(bundle_cpu, gpt: GPT) -> None:
    m = onnx.load(bundle_cpu[0] / "model.onnx", load_external_data=False)
    c = gpt.config
    inputs, outputs = graph_names("inplace", c.n_layer)
    assert [i.name for i in m.graph.input] == inputs == [
        "input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_index",
        *[f"past_{kv}_{i}" for i in range(c.n_layer) for kv in ("key", "value")]]
    assert [o.name for o in m.graph.output] == outputs
    by_name = {v.name: v for v in [*m.graph.input, *m.graph.output]}
    T = onnx.TensorProto
    expect = {
        "input_ids": (T.INT64, ["batch", "sequence"]), "position_ids": (T.INT64, ["batch", "sequence"]),
        "seqlens_k": (T.INT32, ["batch"]), "total_sequence_length": (T.INT32, []),
        "logits_index": (T.INT64, ["batch", "logits_count"]),
        "logits": (T.FLOAT, ["batch", "logits_count", c.vocab_size]),
    }
    for i in range(c.n_layer):
        for name in (f"past_key_{i}", f"past_value_{i}", f"present_key_{i}", f"present_value_{i}"):
            expect[name] = (T.FLOAT, ["batch", c.n_head, "kv_capacity", c.head_dim])
    for name, (dtype, shape) in expect.items():
        assert (by_name[name].type.tensor_type.elem_type, dims(by_name[name])) == (dtype, shape), name
    assert {o.domain or "ai.onnx": o.version for o in m.opset_import} == {"ai.onnx": 18, "com.microsoft": 1}
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("GroupQueryAttention") == c.n_layer
    assert not {"Attention", "Gelu", "Transpose", "Softmax"} & set(ops)  # no unfused attention, no opset-20 Gelu
    assert len(ops) <= 25 * c.n_layer + 15, f"graph is not lean: {len(ops)} nodes"
    assert "transformer.h.1.attn.c_attn/MatMul" in {n.name for n in m.graph.node}  # names follow the modules
    assert not any(n.metadata_props for n in m.graph.node)  # no trace metadata (it embeds local paths)


def test_weights_external_and_tied_embedding_stored_once(bundle_cpu, gpt: GPT) -> None:
    bundle = bundle_cpu[0]
    m = onnx.load(bundle / "model.onnx", load_external_data=False)
    c = gpt.config
    shapes = [tuple(t.dims) for t in m.graph.initializer]
    assert shapes.count((c.vocab_size, c.n_embd)) == 1 and (c.n_embd, c.vocab_size) not in shapes
    big = [t for t in m.graph.initializer if np.prod(t.dims) * 4 > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    unique_params = sum(p.numel() for p in gpt.parameters())  # the tied matrix counts once
    assert (bundle / "model.onnx.data").stat().st_size <= unique_params * 4
    assert (bundle / "model.onnx").stat().st_size < 64 * 1024
    scan_model(bundle / "model.onnx")  # the runtime's own safety scan accepts it


def test_fp16_bundle_for_cuda(bundle_fp16, bundle_cpu) -> None:
    spec = read_spec(bundle_fp16)
    assert (spec.dtype, spec.target, spec.kv_cache.dtype, spec.kv_cache.update) == ("fp16", "cuda", "fp16", "inplace")
    m = onnx.load(bundle_fp16 / "model.onnx", load_external_data=False)
    floats = {t.data_type
              for t in m.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert floats == {onnx.TensorProto.FLOAT16}
    assert ({v.type.tensor_type.elem_type for v in m.graph.input if v.name.startswith("past_")}
            == {onnx.TensorProto.FLOAT16})
    v = spec.verification
    assert v["tolerance_rule"] == f"{FP16_REL_TOL} x max(1, max |reference logit|)"
    assert v["tolerance"] == pytest.approx(FP16_REL_TOL * max(1.0, v["max_abs_logit"]))
    assert 0 < v["max_abs_diff_prefill"] <= v["tolerance"] and 0 < v["max_abs_diff_decode"] <= v["tolerance"]
    assert v["greedy_mismatches_beyond_tolerance"] == 0 and v["greedy_agreement"] >= 0.95 and v["steps"] >= 32
    ratio = (bundle_fp16 / "model.onnx.data").stat().st_size / (bundle_cpu[0] / "model.onnx.data").stat().st_size
    assert 0.45 < ratio < 0.55


def test_concat_bundle_via_cli(bundle_concat, gpt: GPT) -> None:
    bundle, code, stdout, stderr = bundle_concat
    assert code == 0 and stdout.strip() == str(bundle.resolve())
    for stage in ("loading", "tracing the graph", "verifying against PyTorch", "wrote"):
        assert stage in stderr
    spec = read_spec(bundle)
    assert spec.io == CONCAT_IO == IOSpec(seqlens_k=None, total_sequence_length=None, attention_mask="attention_mask")
    assert (spec.kv_cache.update, spec.dtype, spec.architecture.context_length) == ("concat", "fp32", 48)
    v = spec.verification
    assert v["steps"] >= 32 and max(v["max_abs_diff_prefill"], v["max_abs_diff_decode"]) <= 1e-4 and v["greedy_match"]
    m = onnx.load(bundle / "model.onnx", load_external_data=False)
    c = gpt.config
    assert [i.name for i in m.graph.input][:4] == ["input_ids", "position_ids", "attention_mask", "logits_index"]
    by_name = {x.name: x for x in [*m.graph.input, *m.graph.output]}
    assert dims(by_name["attention_mask"]) == ["batch", "total_sequence"]
    assert dims(by_name["past_key_0"]) == ["batch", c.n_head, "past_sequence", c.head_dim]
    assert dims(by_name["present_value_1"]) == ["batch", c.n_head, "total_sequence", c.head_dim]
    assert {o.domain or "ai.onnx" for o in m.opset_import} == {"ai.onnx"}  # standard ops only
    assert [tuple(t.dims) for t in m.graph.initializer if t.name == "transformer.wpe.weight"] == [(48, c.n_embd)]


def test_bundle_runs_in_a_process_without_torch(bundle_cpu, gpt: GPT, tmp_path: Path) -> None:
    """prefill + decode through onnxruntime + numpy + gptedge.runtime.bundle alone, `import torch` made to fail."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np, onnxruntime as ort
        from gptedge.runtime.bundle import read_spec
        try:
            import torch
            raise SystemExit("torch was importable")
        except ImportError:
            pass
        folder = sys.argv[1]
        spec = read_spec(folder)
        a, io = spec.architecture, spec.io
        sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
        prompts = json.loads(sys.argv[2])
        B, S, cap = len(prompts), max(map(len, prompts)), 32
        kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros((B, a.n_kv_head, cap, a.head_dim), np.float32))
              for _ in range(2 * a.n_layer)]
        def step(ids, pos, seqlens, total, index):
            b = sess.io_binding()
            b.bind_output(io.logits)
            for name, value in ((io.input_ids, ids), (io.position_ids, pos),
                                (io.seqlens_k, np.array(seqlens, np.int32)),
                                (io.total_sequence_length, np.array(total, np.int32)), (io.logits_index, index)):
                b.bind_cpu_input(name, value)
            for value, past, present in zip(kv, io.past_names(a.n_layer), io.present_names(a.n_layer)):
                b.bind_ortvalue_input(past, value)
                b.bind_ortvalue_output(present, value)
            sess.run_with_iobinding(b)
            return b.copy_outputs_to_cpu()[0]
        ids = np.zeros((B, S), np.int64)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = p
        lengths = [len(p) for p in prompts]
        logits = step(ids, np.tile(np.arange(S), (B, 1)), [n - 1 for n in lengths], S,
                      np.array([[n - 1] for n in lengths]))
        tokens = [[] for _ in prompts]
        for _ in range(8):
            nxt = logits[:, -1].argmax(-1)
            for r in range(B):
                tokens[r].append(int(nxt[r]))
            logits = step(nxt.reshape(B, 1), np.array([[n] for n in lengths]), lengths, max(lengths) + 1,
                          np.zeros((B, 1), np.int64))
            lengths = [n + 1 for n in lengths]
        print(json.dumps({"tokens": tokens,
                          "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None}))
    """))
    prompts = [[5, 17, 42, 99, 7, 3], [11, 250, 8]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), str(bundle_cpu[0]), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_loaded"] is False
    want = [gpt.generate_greedy(torch.tensor([p]), 8)[0, len(p):].tolist() for p in prompts]
    assert result["tokens"] == want
    assert len(set(want[0])) > 1  # the model's output varies, so the comparison means something


# -- bad input: a clear gptedge error, nothing written ---------------------------------------------------------
def assert_nothing_written(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before  # no bundle, no leftover temporary folder


def test_refuses_a_folder_that_is_no_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    for source in (tmp_path / "src", tmp_path / "missing", tmp_path / "src" / "notes.txt"):
        with pytest.raises(CheckpointError, match="gptedge checkpoint|does not exist|is a file"):
            export_bundle(source, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, {"src"})


def test_refuses_unsupported_model_type(tmp_path: Path) -> None:
    src = tmp_path / "mamba"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"model_type 'mamba' is not supported.*gpt2 \(GPT2LMHeadModel\).*llama"):
        export_bundle(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, {"mamba"})


def test_refuses_checkpoint_without_tokenizer(ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(ckpt, src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        export_bundle(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, {"ckpt"})


def test_refuses_max_context_above_block_size(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--max-context 65 exceeds the model.s block size 64 .*; use at most 64"):
        export_bundle(ckpt, tmp_path / "out", max_context=65, progress=False)
    code = cli_main(["export", str(ckpt), str(tmp_path / "out"), "--max-context", "0", "--quiet"])
    assert code == 2
    assert_nothing_written(tmp_path, set())


def test_refuses_unwritable_output(ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(GptEdgeError, match="cannot write"):
        export_bundle(ckpt, blocker / "bundle", progress=False)
    assert blocker.read_text() == "not a folder"
    assert_nothing_written(tmp_path, {"file"})


def test_refuses_existing_output_without_force(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export_bundle(ckpt, out, progress=False)
    assert cli_main(["export", str(ckpt), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --force" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_nothing_written(tmp_path, {"bundle"})


def test_refuses_bad_option_combinations(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fp16"):
        export_bundle(ckpt, tmp_path / "out", target="cuda", dtype="fp32", progress=False)
    with pytest.raises(UsageError, match="would replace the source"):
        export_bundle(ckpt, ckpt, force=True, progress=False)
    with pytest.raises(UsageError, match="target"):
        export_bundle(ckpt, tmp_path / "out", target="tpu", progress=False)
    assert_nothing_written(tmp_path, set())
    assert (ckpt / "model.safetensors").is_file()


def test_failed_verification_writes_nothing(bundle_cpu, tmp_path: Path, monkeypatch) -> None:
    """A graph that does not compute the source model (here: another model's graph) fails export, atomically."""
    other = make_checkpoint(tmp_path / "other", seed=1)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("previous bundle")

    def stale_graph(model, kv, path, **kwargs):
        shutil.copyfile(bundle_cpu[0] / "model.onnx", path)
        shutil.copyfile(bundle_cpu[0] / "model.onnx.data", path.parent / "model.onnx.data")
        return exporter_stats

    from gptedge.export import graph

    exporter_stats = graph.GraphStats(seconds=0.0, nodes=0, op_types={})
    monkeypatch.setattr(graph, "export_graph", stale_graph)
    with pytest.raises(ExportError, match="verification failed.*nothing was written"):
        export_bundle(other, out, force=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the earlier output is untouched
    assert_nothing_written(tmp_path, {"other", "bundle"})


def test_dtype_defaults_and_limits_follow_the_provider_traits() -> None:
    """GPUs get fp16 by default; an in-place CUDA bundle must be fp16 (its GroupQueryAttention is fp16-only)."""
    assert [exporter._check_options(t, None, "inplace") for t in ("cpu", "cuda", "dml")] == ["fp32", "fp16", "fp16"]
    assert exporter._check_options("dml", "fp32", "inplace") == "fp32"  # DirectML's GQA takes fp32 too
    assert exporter._check_options("cuda", "fp32", "concat") == "fp32"  # no GroupQueryAttention in a concat graph
    with pytest.raises(UsageError, match="runs fp16 only: use --dtype fp16 for --target cuda, or --kv concat"):
        exporter._check_options("cuda", "fp32", "inplace")


def test_inplace_cpu_graph_uses_fused_kernels_and_concat_stays_standard(runtime_bundle: Path, runtime_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    import onnx

    ops = {n.op_type for n in onnx.load(runtime_bundle / "model.onnx", load_external_data=False).graph.node}
    assert {"FastGelu", "SkipLayerNormalization", "GroupQueryAttention"} <= ops and not ops & {"Tanh", "Pow"}
    concat = export_bundle(runtime_checkpoint, tmp_path / "concat", kv="concat", progress=False)
    ops = {n.op_type for n in onnx.load(concat / "model.onnx", load_external_data=False).graph.node}
    assert not ops & {"FastGelu", "SkipLayerNormalization", "GroupQueryAttention"} and "Tanh" in ops


def test_the_bundle_names_its_source_without_a_local_path(runtime_bundle, runtime_checkpoint) -> None:
    from gptedge.runtime.bundle import read_spec

    spec = read_spec(runtime_bundle)
    text = (runtime_bundle / "gptedge.json").read_text(encoding="utf-8")
    assert spec.provenance["source"] == runtime_checkpoint.name and spec.provenance["source_sha256"]
    assert str(runtime_checkpoint.parent) not in text
