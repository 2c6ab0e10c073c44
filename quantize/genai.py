"""A second graph in the bundle that onnxruntime-genai runs (C#, C++, Java and its Python package).

genai feeds a decoder `input_ids`, `attention_mask` [B, past + new] and (when the graph has it) `position_ids`,
binds one `max_length` buffer per layer as both past and present (`past_present_share_buffer`), and
preallocates the logits output as [B, S, V]: every position's logits. gptedge's own graph takes
`seqlens_k` / `total_sequence_length` from the runtime and a `logits_index` that asks for the last
position only, so prefill runs the LM head once instead of S times (benchmarks/results/genai-*.md has the
measured cost of the other way). The two contracts differ in a graph input the runtime cannot skip and in
an output shape genai fixes, so one graph cannot serve both without slowing gptedge's prefill.

`write_genai_files` therefore writes `genai_model.onnx`: gptedge's graph, node for node, with the three
runtime inputs replaced by a few nodes that derive them from `attention_mask` (the way genai's own model
builder does) and logits at every position. Its initializers stay references into the same
`model.onnx.data`, so the weights are stored once and the second graph costs kilobytes. `genai_config.json`
names the inputs and outputs; the config's `type` picks genai's decoder-only state machine, which every
gptedge family follows (it is not the architecture: that is in the graph).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from gptedge.errors import BundleError
from gptedge.runtime.bundle import GENAI_CONFIG_NAME, GENAI_MODEL_NAME, MODEL_NAME, TOKENIZER_NAME, BundleSpec

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # genai's tokenizer (onnxruntime-extensions) reads it
GENAI_FILES = (GENAI_MODEL_NAME, GENAI_CONFIG_NAME, TOKENIZER_CONFIG_NAME)
GENAI_MODEL_TYPE = "llama"  # genai's plain decoder-only state (DecoderOnly_Model); "gpt2" would mean a combined KV
ATTENTION_MASK = "attention_mask"


def has_genai(folder: str | Path) -> bool:
    """Whether a bundle carries the genai graph and config (quantize carries them over when the source does)."""
    return all((Path(folder) / name).is_file() for name in GENAI_FILES)


def _genai_template(template: str) -> str:
    """gptedge's `{layer}` name template in genai's printf form (`%d`)."""
    if "%" in template:
        raise BundleError(f"KV name template {template!r} has a '%', which genai's config cannot express")
    return template.replace("{layer}", "%d")


def genai_graph(model: onnx.ModelProto, spec: BundleSpec, vocab: int) -> onnx.ModelProto:
    """gptedge's in-place graph (any precision) rewired to genai's decoder contract (see the module docstring).

    `vocab` is the tokenizer's size: logits of padded embedding rows (ids with no text, which gptedge's sampler
    never draws) are sliced off, so genai cannot draw them either.
    """
    io = spec.io
    if spec.kv_cache.update != "inplace" or not (io.seqlens_k and io.total_sequence_length and io.logits_index):
        raise BundleError("onnxruntime-genai runs the in-place KV graph only; re-export with --kv inplace "
                            "(the default) and add --genai")
    graph = model.graph
    replaced = {io.seqlens_k, io.total_sequence_length, io.logits_index}
    names = {i.name for i in graph.input}
    missing = sorted(replaced - names)
    if missing:
        raise BundleError(f"model.onnx has no input {missing[0]!r}; the bundle is not a gptedge graph")
    batch = "batch"
    kept = [i for i in graph.input if i.name not in replaced]
    mask = helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, [batch, "total_sequence_length"])
    # attention_mask goes right after input_ids (and position_ids): genai binds by name, people read in order.
    position = 1 + sum(i.name == io.position_ids for i in kept[:2])
    kept.insert(position, mask)

    def c(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                   [len(values)], values))

    p = "genai/"
    nodes = [
        c(p + "one", [1]), c(p + "axis1", [1]), c(p + "zero", [0]), c(p + "axis0", [0]),
        # seqlens_k = tokens in the cache after this call - 1 = sum(mask) - 1 per row
        helper.make_node("ReduceSum", [ATTENTION_MASK, p + "axis1"], [p + "mask_sum"], keepdims=0),
        helper.make_node("Sub", [p + "mask_sum", p + "one"], [p + "last"]),
        helper.make_node("Cast", [p + "last"], [io.seqlens_k], to=TensorProto.INT32),
        # total_sequence_length = the mask's width (past + new), a scalar
        helper.make_node("Shape", [ATTENTION_MASK], [p + "total_1"], start=1, end=2),
        helper.make_node("Squeeze", [p + "total_1", p + "axis0"], [p + "total"]),
        helper.make_node("Cast", [p + "total"], [io.total_sequence_length], to=TensorProto.INT32),
        # logits_index = every position [B, S]: genai preallocates logits as [B, S, V]
        helper.make_node("Shape", [io.input_ids], [p + "ids_shape"]),
        helper.make_node("Shape", [io.input_ids], [p + "seq_1"], start=1, end=2),
        helper.make_node("Squeeze", [p + "seq_1", p + "axis0"], [p + "seq"]),
        helper.make_node("Squeeze", [p + "zero", p + "axis0"], [p + "start"]),
        helper.make_node("Squeeze", [p + "one", p + "axis0"], [p + "step"]),
        helper.make_node("Range", [p + "start", p + "seq", p + "step"], [p + "positions"]),
        helper.make_node("Unsqueeze", [p + "positions", p + "axis0"], [p + "positions_1s"]),
        helper.make_node("Expand", [p + "positions_1s", p + "ids_shape"], [io.logits_index]),
    ]
    full = spec.architecture.vocab_size
    if vocab < full:
        nodes += [c(p + "vocab", [vocab]), c(p + "axis2", [2]),
                  helper.make_node("Slice", [p + "logits_full", p + "zero", p + "vocab", p + "axis2"], [io.logits])]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if vocab < full:
        producer = next(n for n in out.graph.node if io.logits in n.output)
        producer.output[list(producer.output).index(io.logits)] = p + "logits_full"
        logits = next(o for o in out.graph.output if o.name == io.logits)
        logits.type.tensor_type.shape.dim[2].dim_value = vocab
    del out.graph.input[:]
    out.graph.input.extend(kept)
    old_nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + old_nodes)
    out.doc_string = "gptedge graph rewired for onnxruntime-genai (gptedge.quantize.genai)"
    return out


def genai_config(spec: BundleSpec, has_position_ids: bool, vocab: int) -> dict[str, Any]:
    """genai_config.json for the bundle: sizes, names, special tokens and greedy search defaults."""
    a, io, special = spec.architecture, spec.io, spec.special_tokens
    eos = special.get("stop_ids") or ([special["eos_id"]] if "eos_id" in special else [])
    if not eos:
        raise BundleError("the bundle names no end-of-sequence token; genai needs one (eos_token_id)")
    inputs = {"input_ids": io.input_ids, "attention_mask": ATTENTION_MASK,
              "past_key_names": _genai_template(io.past_key), "past_value_names": _genai_template(io.past_value)}
    if has_position_ids:
        inputs["position_ids"] = io.position_ids
    defaults = spec.generation_defaults
    return {
        "model": {
            "bos_token_id": special.get("bos_id", eos[0]),
            "context_length": a.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GENAI_MODEL_NAME,
                "head_size": a.head_dim,
                "hidden_size": a.n_embd,
                "inputs": inputs,
                "outputs": {"logits": io.logits, "present_key_names": _genai_template(io.present_key),
                            "present_value_names": _genai_template(io.present_value)},
                "num_attention_heads": a.n_head,
                "num_hidden_layers": a.n_layer,
                "num_key_value_heads": a.n_kv_head,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": special.get("pad_id", eos[0]),
            "type": GENAI_MODEL_TYPE,
            "vocab_size": vocab,
        },
        "search": {
            "do_sample": False,
            "max_length": a.context_length,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(defaults.get("repetition_penalty") or 1.0),
            "temperature": float(defaults.get("temperature") or 1.0),
            "top_k": int(defaults.get("top_k") or 50),
            "top_p": float(defaults.get("top_p") or 1.0),
        },
    }


def tokenizer_config(spec: BundleSpec) -> dict[str, Any]:
    """The tokenizer_config.json genai's tokenizer reads: the generic class (it then follows tokenizer.json's own
    model and pre-tokenizer), the special tokens, no extra BOS (gptedge encodes without one), the chat template."""
    special = spec.special_tokens
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    for key in ("bos", "eos", "pad", "unk"):
        if isinstance(special.get(key), str):
            config[f"{key}_token"] = special[key]
    if spec.chat_template:
        config["chat_template"] = spec.chat_template
    return config


def _tokenizer_size(folder: Path, spec: BundleSpec) -> int:
    from tokenizers import Tokenizer

    from gptedge.runtime.detokenizer import token_count

    return min(token_count(Tokenizer.from_file(str(folder / TOKENIZER_NAME))), spec.architecture.vocab_size)


def write_genai_files(folder: str | Path, spec: BundleSpec) -> None:
    """Write genai_model.onnx, genai_config.json and tokenizer_config.json beside the bundle's model.onnx (call
    before write_spec, so the checksums cover them)."""
    folder = Path(folder)
    model = onnx.load(str(folder / MODEL_NAME), load_external_data=False)
    vocab = _tokenizer_size(folder, spec)
    genai = genai_graph(model, spec, vocab)
    onnx.save(genai, str(folder / GENAI_MODEL_NAME))
    has_positions = bool(spec.io.position_ids) and any(i.name == spec.io.position_ids for i in genai.graph.input)
    config = genai_config(spec, has_positions, vocab)
    (folder / GENAI_CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    (folder / TOKENIZER_CONFIG_NAME).write_text(json.dumps(tokenizer_config(spec), indent=2, ensure_ascii=False)
                                                + "\n", encoding="utf-8")


def add_genai(folder: str | Path, spec: BundleSpec, token_ids: list[int]) -> None:
    """Write the genai files into a bundle being built and record their measured check in spec.verification
    (export --genai and quantize share this; call before write_spec)."""
    write_genai_files(folder, spec)
    spec.verification["genai"] = check_genai_graph(folder, spec, token_ids)


def check_genai_graph(folder: str | Path, spec: BundleSpec, token_ids: list[int], steps: int = 4) -> dict[str, Any]:
    """The measured gate of the genai graph: run it in onnxruntime the way genai feeds it (attention mask, one
    shared buffer per layer, every position's logits) beside model.onnx the way gptedge feeds it, over a prefill
    and `steps` greedy decode steps, and return the largest logit difference. Raises BundleError when the two
    disagree (they run the same nodes on the same weights, so anything but rounding noise is a wiring fault)."""
    import numpy as np
    import onnxruntime as ort

    from gptedge.runtime.engine import NP_DTYPES

    folder, io, a = Path(folder), spec.io, spec.architecture
    vocab = json.loads((folder / GENAI_CONFIG_NAME).read_text(encoding="utf-8"))["model"]["vocab_size"]
    ids = [int(t) for t in token_ids][: max(1, a.context_length - steps - 1)]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
                for name in (MODEL_NAME, GENAI_MODEL_NAME)]
    dtype = NP_DTYPES[spec.kv_cache.dtype]
    capacity = len(ids) + steps
    pasts = [{n: np.zeros((1, a.n_kv_head, capacity, a.head_dim), dtype) for n in io.past_names(a.n_layer)}
             for _ in sessions]
    gptedge_has_positions = any(i.name == io.position_ids for i in sessions[0].get_inputs())
    worst, done, new = 0.0, 0, ids
    for _ in range(steps + 1):
        S, total = len(new), done + len(new)
        x = np.array([new], np.int64)
        positions = np.arange(done, total, dtype=np.int64)[None, :]
        ours = {io.input_ids: x, io.seqlens_k: np.array([total - 1], np.int32),
                io.total_sequence_length: np.array(total, np.int32), io.logits_index: np.arange(S)[None, :]}
        theirs = {io.input_ids: x, ATTENTION_MASK: np.ones((1, total), np.int64)}
        if gptedge_has_positions:
            ours[io.position_ids] = theirs[io.position_ids] = positions
        results = []
        for session, feed, past in zip(sessions, (ours, theirs), pasts):
            try:
                outputs = session.run(None, {**feed, **past})
            except Exception as exc:  # onnxruntime's own error types; the message says what failed
                raise BundleError(f"the genai graph does not run the way model.onnx does ({exc}); nothing was "
                                  "written (a gptedge bug: please report it with the bundle's gptedge.json)") from exc
            past.update(zip(io.past_names(a.n_layer), outputs[1:]))
            results.append(outputs[0][..., :vocab].astype(np.float32))
        if results[0].shape != results[1].shape:
            raise BundleError(f"genai graph logits {results[1].shape} != gptedge's {results[0].shape}")
        worst = max(worst, float(np.abs(results[0] - results[1]).max()))
        done, new = total, [int(results[0][0, -1].argmax())]
    scale = 1e-4 if spec.dtype == "fp32" else 2e-2
    if not worst <= scale * max(1.0, float(np.abs(results[0]).max())):
        raise BundleError(f"the genai graph's logits differ from model.onnx's by {worst:.3g}, more than rounding; "
                          "nothing was written (a gptedge bug: please report it with the bundle's gptedge.json)")
    return {"max_abs_diff": worst, "tokens": len(ids), "decode_steps": steps}
