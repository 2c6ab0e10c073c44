"""What LoRA adapters chosen at run time would cost: `python benchmarks/runtime_adapters.py [--runs N]`.

onnxruntime runs LoRA adapters as graph inputs: each adapted projection gets two extra MatMuls and an Add
(x @ A @ B added to the projection's output), A [in, rank] and B [rank, out] are inputs whose defaults are
rank-0 initializers (no adapter: the branch adds zeros), and an adapter file (onnxruntime.AdapterFormat) fed
through RunOptions.add_active_adapter supplies them per request. Before building that into gptedge's export
and server, this measures it on the real SmolLM2-135M INT8 bundle (benchmarks/real_model.py prepares it):

- "merged": the bundle as gptedge ships a fine-tune (adapters merged into the weights: the base graph);
- "adapter-ready, none active": the same weights with a LoRA branch on every projection but the head
  (q/k/v, o, gate/up, down: what `--lora-targets all` trains), rank-0 defaults;
- "adapter-ready, rank 8 active": the same graph with a rank-8 adapter file active.

Decode tokens/s after a 128-token prompt (128 greedy tokens, batch 1, 2 threads, gptedge's engine and default
spin policy; each row in a fresh process, rounds interleaved, medians), the nodes each graph runs, and whether
the inactive branch leaves the greedy tokens as the merged graph's. Writes
benchmarks/results/runtime-adapters.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import HERE, THREADS, machine

SOURCE = HERE / ".cache" / "smollm2-real" / "gptedge-int8"
WORK = HERE / ".cache" / "runtime-adapters"
RESULTS = HERE / "results"
RANK = 8
ROWS = ("merged", "adapter-ready, none active", "adapter-ready, rank 8 active")


def adapter_ready(source: Path, dest: Path) -> list[tuple[str, int, int]]:
    """A copy of `source` whose every MatMulNBits but the head's adds x @ A @ B; the (name, in, out) of each."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source / "model.onnx"), load_external_data=False)
    graph = model.graph
    adapted, new_nodes = [], []
    for node in graph.node:
        new_nodes.append(node)
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type != "MatMulNBits" or node.input[1].startswith("lm_head"):  # the head: never adapted
            continue
        k, n, base = attrs["K"], attrs["N"], node.output[0]
        name = node.name.replace("/", ".")
        node.output[0] = f"{base}.base"
        a, b = f"{name}.lora_A", f"{name}.lora_B"
        graph.input.extend([helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, [k, "rank"]),
                            helper.make_tensor_value_info(b, onnx.TensorProto.FLOAT, ["rank", n])])
        graph.initializer.extend([numpy_helper.from_array(np.zeros((k, 0), np.float32), a),
                                  numpy_helper.from_array(np.zeros((0, n), np.float32), b)])
        new_nodes += [helper.make_node("MatMul", [node.input[0], a], [f"{name}.lora_xa"], name=f"{name}/lora/A"),
                      helper.make_node("MatMul", [f"{name}.lora_xa", b], [f"{name}.lora_xab"], name=f"{name}/lora/B"),
                      helper.make_node("Add", [f"{base}.base", f"{name}.lora_xab"], [base], name=f"{name}/lora/Add")]
        adapted.append((name, k, n))
    del graph.node[:]
    graph.node.extend(new_nodes)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != "model.onnx":
            os.link(f, dest / f.name)
    onnx.save(model, str(dest / "model.onnx"))
    return adapted


def write_adapter(adapted: list[tuple[str, int, int]], path: Path) -> None:
    """A rank-RANK adapter in onnxruntime's format; small random values (what they are does not change speed)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    params = {}
    for name, k, n in adapted:
        params[f"{name}.lora_A"] = ort.OrtValue.ortvalue_from_numpy((rng.standard_normal((k, RANK)) * 0.01)
                                                                    .astype(np.float32))
        params[f"{name}.lora_B"] = ort.OrtValue.ortvalue_from_numpy((rng.standard_normal((RANK, n)) * 0.01)
                                                                    .astype(np.float32))
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    adapter.export_adapter(str(path))


class _WithAdapter:
    """The session, with an adapter's parameters on every run. onnxruntime applies RunOptions' active adapters to
    run() only: run_with_iobinding says they "won't have an effect", and gptedge's in-place KV cache runs through
    an IOBinding. So the parameters (an adapter file holds named OrtValues) are bound as the inputs they are."""

    def __init__(self, session, path: Path) -> None:
        import onnxruntime as ort

        self._session = session
        self._params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        self._options = ort.RunOptions()
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self._options.add_active_adapter(adapter)

    def io_binding(self):
        binding = self._session.io_binding()
        for name, value in self._params.items():
            binding.bind_ortvalue_input(name, value)
        return binding

    def run(self, names, feeds, run_options=None):
        return self._session.run(names, feeds, self._options)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def child(row: str) -> None:
    """One row in this process: print its decode rate, node count and greedy tokens."""
    import onnx
    import onnxruntime as ort

    from gptedge.runtime import Model
    from gptedge.runtime.providers import session_options

    model = Model.load(SOURCE, provider="cpu", threads=THREADS, cache=False, prefix_cache_mb=0)
    graph = SOURCE / "model.onnx"
    if row != "merged":
        graph = WORK / "adapter-ready" / "model.onnx"
        session = ort.InferenceSession(str(graph), session_options(model.session_info.choice, THREADS),
                                       providers=["CPUExecutionProvider"])
        active = row.endswith("active") and "none" not in row
        model.engine.session = _WithAdapter(session, WORK / "adapter.onnx_adapter") if active else session
    ids = list(range(1000, 1128))
    model.generate(ids, temperature=0, max_new_tokens=8, stop_token_ids=())
    runs = [model.generate(ids, temperature=0, max_new_tokens=128, stop_token_ids=()) for _ in range(3)]
    rate = statistics.median(r.timings.decode_tokens_per_s for r in runs)
    nodes = len(onnx.load(str(graph), load_external_data=False).graph.node)
    cache = model.engine.new_cache(1, 16)  # the adapter's effect on the logits: nonzero when it is applied
    logits = np.asarray(model.engine.prefill(cache, np.asarray([ids[:16]], np.int64)), np.float64)
    cache.release()
    print("ROW " + json.dumps({"decode_tps": rate, "nodes": nodes, "tokens": runs[0].token_ids[:128],
                               "logits": logits.ravel()[:4096].tolist()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return child(args.row)
    if not (SOURCE / "gptedge.json").exists():
        raise SystemExit(f"no {SOURCE}: run benchmarks/real_model.py first")
    adapted = adapter_ready(SOURCE, WORK / "adapter-ready")
    write_adapter(adapted, WORK / "adapter.onnx_adapter")
    samples: dict[str, list[dict]] = {row: [] for row in ROWS}
    for _ in range(args.runs):
        for row in ROWS:
            out = subprocess.run([sys.executable, __file__, "--row", row], cwd=HERE, check=True, capture_output=True,
                                 text=True).stdout
            samples[row].append(json.loads(next(x for x in out.splitlines() if x.startswith("ROW "))[4:]))
    merged = statistics.median(s["decode_tps"] for s in samples["merged"])
    rows = []
    for row in ROWS:
        rate = statistics.median(s["decode_tps"] for s in samples[row])
        effect = float(np.abs(np.subtract(samples[row][0]["logits"], samples["merged"][0]["logits"])).max())
        rows.append({"row": row, "decode_tps": rate, "vs_merged": rate / merged, "nodes": samples[row][0]["nodes"],
                     "greedy_as_merged": samples[row][0]["tokens"] == samples["merged"][0]["tokens"],
                     "max_logit_change": effect, "samples": [s["decode_tps"] for s in samples[row]]})
    adapter_mb = (WORK / "adapter.onnx_adapter").stat().st_size / 1e6
    meta = {**machine(), "runs": args.runs, "rank": RANK, "adapted_projections": len(adapted),
            "adapter_mb": adapter_mb, "source": str(SOURCE.relative_to(HERE))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime-adapters.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| graph | nodes | decode tok/s @128 | vs merged | max logit change vs merged | greedy tokens as merged |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['nodes']} | {r['decode_tps']:.1f} | {r['vs_merged']:.2f}x | "
                     f"{r['max_logit_change']:.3g} | {'yes' if r['greedy_as_merged'] else 'no'} |")
    lines += ["", f"SmolLM2-135M-Instruct, gptedge INT8 bundle; a LoRA branch on {len(adapted)} projections "
              f"(every one but the head); rank-{RANK} adapter file {adapter_mb:.1f} MB (small random values), its "
              "parameters bound as inputs (onnxruntime applies active adapters to run() only, not to the IOBinding "
              f"runs of an in-place KV cache). Batch 1, 128-token prompt, 128 greedy tokens, {THREADS} threads, "
              f"medians of {args.runs} rounds. Machine: {meta['machine']}; {meta['time']}."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "runtime-adapters.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
