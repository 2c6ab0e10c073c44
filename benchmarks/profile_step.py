"""Where a decode step's time goes: `python benchmarks/profile_step.py BUNDLE [--name NAME]`.

Prefills a 200-token prompt, then runs 100 single-token decode steps through the runtime's Engine
with onnxruntime's per-node profiler on (2 threads, sequential), and reports the kernel time per
token by operator type, next to the wall time per token measured without the profiler. Writes
benchmarks/results/profile-NAME.json and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import HERE, THREADS, pin_threads

PROMPT, STEPS = 200, 100


def session(bundle: Path, profile_dir: str | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "step")
    return ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])


def run(bundle: Path, profile_dir: str | None, batch: int = 1) -> tuple[float, object]:
    from gptedge.runtime.bundle import read_spec
    from gptedge.runtime.engine import Engine

    sess = session(bundle, profile_dir)
    engine = Engine(sess, read_spec(bundle))
    cache = engine.new_cache(batch, PROMPT + STEPS + 1)
    engine.forward(cache, np.random.default_rng(0).integers(0, 1000, (batch, PROMPT)))
    token = np.full((batch, 1), 5, np.int64)
    start = time.perf_counter()
    for _ in range(STEPS):
        engine.forward(cache, token)
    return (time.perf_counter() - start) / STEPS * 1000, sess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--name", help="results file name (default: the bundle's folder and parent)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together in each step")
    args = parser.parse_args()
    pin_threads()
    wall_ms, _ = run(args.bundle, None, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        _, sess = run(args.bundle, tmp, args.batch)
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (STEPS + 1)
    decode = nodes[-per_run * STEPS:]  # the prefill run comes first
    time_us: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in decode:
        time_us[e["args"]["op_name"]] += e["dur"]
        count[e["args"]["op_name"]] += 1
    total = sum(time_us.values())
    ops = [{"op": op, "ms_per_token": us / STEPS / 1000, "nodes": count[op] // STEPS, "share": us / total}
           for op, us in time_us.most_common()]
    result = {"bundle": str(args.bundle), "prompt": PROMPT, "steps": STEPS, "threads": THREADS, "batch": args.batch,
              "wall_ms_per_token": wall_ms, "kernel_ms_per_token": total / STEPS / 1000, "ops": ops}
    name = args.name or f"{args.bundle.parent.name}-{args.bundle.name}" + (f"-b{args.batch}" if args.batch > 1 else "")
    out = HERE / "results" / f"profile-{name}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"{args.bundle} x{args.batch}: {wall_ms:.2f} ms a step (no profiler), "
          f"kernels {result['kernel_ms_per_token']:.2f} ms")
    for o in ops[:10]:
        print(f"  {o['op']:34s} {o['ms_per_token']:.3f} ms  {o['nodes']:3d} nodes  {o['share']:.1%}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
