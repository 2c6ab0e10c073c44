"""Which MatMulNBits form holds a Q4_1 block exactly and runs fast: `python benchmarks/gguf_blocks.py`.

A Q4_1 block of 32 stores w = d q + m (q in 0..15, fp16 d and m). One [576 -> 1536] projection of
SmolLM2-135M's shape, with random Q4_1 blocks, one token (a decode step), 2 threads, in four forms:
  float zero points   (q - z) d with z = -m / d in float: exact, but onnxruntime's CPU kernel has no fast path
  integer zero points (q - round(-m / d)) d: the fast kernel, but each block shifts by up to d / 2
  integer + offsets   (q - z) d on the fast kernel plus the remainder r = m + z d through the input's block sums
                      (gptedge's form: gptedge.quantize.ggml_blocks): exact, three more small nodes
  no zero points      Q4_0's form (d (q - 8)), for the kernel's own speed
each at accuracy_level 0 (fp32 arithmetic) and 4 (int8 activations, the CPU default). Reports the time a call
and the largest difference from the exact product, and writes benchmarks/results/gguf-blocks.json.
"""

from __future__ import annotations

import json
import time

import numpy as np

from common import HERE, THREADS, machine, pin_threads

K, N, BLOCK, CALLS = 576, 1536, 32, 400


def model(form: str, accuracy: int, q: np.ndarray, d: np.ndarray, m: np.ndarray):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gptedge.quantize.ggml_blocks import pack

    blocks = K // BLOCK
    inits = [numpy_helper.from_array(pack(q, 4), "B"), numpy_helper.from_array(d, "S")]
    inputs, nodes = ["A", "B", "S"], []
    z = np.clip(np.round(-m / d), 0, 15).astype(np.uint8)
    if form == "float zero points":
        inits.append(numpy_helper.from_array((-m / d).astype(np.float32), "Z"))
        inputs.append("Z")
    elif form in ("integer zero points", "integer + offsets"):
        inits.append(numpy_helper.from_array(pack(z.reshape(N, blocks // 2, 2), 4).reshape(N, -1), "Z"))
        inputs.append("Z")
    out = "Y" if form != "integer + offsets" else "P"
    nodes.append(helper.make_node("MatMulNBits", inputs, [out], domain="com.microsoft", K=K, N=N, bits=4,
                                  block_size=BLOCK, accuracy_level=accuracy))
    if form == "integer + offsets":
        ones = np.kron(np.eye(blocks, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
        inits += [numpy_helper.from_array(ones, "E"),
                  numpy_helper.from_array((m + z * d).astype(np.float32).T.copy(), "R")]
        nodes += [helper.make_node("MatMul", ["A", "E"], ["s"]), helper.make_node("MatMul", ["s", "R"], ["o"]),
                  helper.make_node("Add", ["P", "o"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft",
                                                                                                    1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    pin_threads()
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (N, K // BLOCK, BLOCK)).astype(np.uint8)
    d = (rng.random((N, K // BLOCK)) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    m = (-rng.random((N, K // BLOCK)) * 0.08).astype(np.float16).astype(np.float32)
    w = (d[..., None] * q + m[..., None]).reshape(N, K).astype(np.float64)
    x = rng.standard_normal((1, K)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T
    rows = []
    for form in ("float zero points", "integer zero points", "integer + offsets", "no zero points"):
        for accuracy in (0, 4):
            session = model(form, accuracy, q, d, m)
            y = session.run(None, {"A": x})[0]
            for _ in range(50):
                session.run(None, {"A": x})
            start = time.perf_counter()
            for _ in range(CALLS):
                session.run(None, {"A": x})
            us = (time.perf_counter() - start) / CALLS * 1e6
            diff = None if form == "no zero points" else float(np.abs(y - exact).max() / np.abs(exact).max())
            rows.append({"form": form, "accuracy_level": accuracy, "us_per_call": round(us, 1),
                         "max_rel_diff": diff})
            print(f"{form:22s} level {accuracy}: {us:8.1f} us a call, largest difference "
                  f"{'-' if diff is None else f'{diff:.1e}'} of the largest output", flush=True)
    out = {"meta": {**machine(), "shape": [K, N], "calls": CALLS}, "rows": rows}
    (HERE / "results" / "gguf-blocks.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
