"""Llama-style Hugging Face folders -> bundles whose logits and greedy tokens equal transformers'.

For each supported model type, a random-init model with odd sizes (grouped KV heads, an
explicit head_dim where the type allows it, biases, an untied head, scaled RoPE) is saved with
save_pretrained, exported in place and with the concatenating cache, and run through the
bundle's graph in ONNX Runtime: a right-padded batch of three prompts, then 24 greedy steps.
Every position's logits are compared with transformers' own forward over the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

from gptedge.errors import CheckpointError, UsageError  # noqa: E402
from gptedge.export import hf  # noqa: E402
from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.runtime.bundle import read_spec  # noqa: E402
from test_hf_export import VOCAB, right_padded_greedy, small_bpe  # noqa: E402

STEPS = 24
CONTEXT = 64
PROMPTS = ["def add(a, b):\n    return", "hello", "for i in range(10):"]

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, num_hidden_layers=3, hidden_size=96,
              num_attention_heads=6, num_key_value_heads=2, intermediate_size=200)
# model_type -> (config class, model class, config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(COMMON, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, attention_bias=True, mlp_bias=True,
                   tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(COMMON, num_attention_heads=4, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(COMMON, hidden_size=80, num_attention_heads=5, num_key_value_heads=1, head_dim=16,
                     sliding_window=4096, rope_scaling={"rope_type": "linear", "factor": 2.0},
                     tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(COMMON, num_key_value_heads=3, num_hidden_layers=2, max_position_embeddings=128,
                  original_max_position_embeddings=CONTEXT, tie_word_embeddings=False, pad_token_id=0,
                  rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 16 for i in range(8)],
                                "long_factor": [2.0 + i / 8 for i in range(8)]})),
}


def save_family(folder: Path, model_type: str, seed: int = 0, **changes) -> Path:
    """A random-init transformers model of `model_type` with weights scaled up (varied, decisive greedy tokens)."""
    config_cls, model_cls, config = FAMILIES[model_type]
    tok = small_bpe()
    eot = tok.token_to_id("<|endoftext|>")
    cfg = getattr(transformers, config_cls)(**{**config, **changes}, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """model_type -> (HF folder, {"inplace": bundle, "concat": bundle})."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, name in enumerate(FAMILIES):
        folder = save_family(root / name, name, seed=seed)
        out[name] = (folder, {kv: export_bundle(folder, root / f"{name}-{kv}", kv=kv, progress=False)
                              for kv in ("inplace", "concat")})
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("kv", ["inplace", "concat"])
def test_logits_and_greedy_equal_transformers(exported, model_type: str, kv: str) -> None:
    folder, bundles = exported[model_type]
    reference = getattr(transformers, FAMILIES[model_type][1]).from_pretrained(folder).eval()
    tok = Tokenizer.from_file(str(bundles[kv] / "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    tokens, rows = right_padded_greedy(bundles[kv], prompts, STEPS)
    for prompt, mine, logits in zip(prompts, tokens, rows):
        with torch.no_grad():
            theirs = reference(torch.tensor([prompt + mine])).logits[0].numpy()  # [T + 1, V]
        assert np.abs(logits - theirs).max() <= 1e-4
        # Identical greedy: transformers' argmax at every generated position is the token ONNX chose.
        assert theirs[len(prompt) - 1 : -1].argmax(-1).tolist() == mine
    assert any(len(set(row)) > 3 for row in tokens)  # not stuck on one token: the comparison means something


def test_bundle_records_family_and_heads(exported) -> None:
    for name, (folder, bundles) in exported.items():
        spec = read_spec(bundles["inplace"])
        config = json.loads((folder / "config.json").read_text())
        a = spec.architecture
        assert a.family == name and spec.provenance["source_kind"] == f"huggingface-{name}"
        assert (a.n_head, a.n_kv_head, a.n_layer) == (
            config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"])
        assert a.head_dim == config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        assert a.details["positions"] == "rope" and a.details["norm"] == "rmsnorm" and a.details["mlp"] == "swiglu"
        assert a.details["tie_embeddings"] == config["tie_word_embeddings"]
    assert read_spec(exported["llama"][1]["inplace"]).architecture.details["rope_scaling"]["type"] == "llama3"
    assert read_spec(exported["qwen3"][1]["inplace"]).architecture.details["qk_norm"] is True
    assert read_spec(exported["qwen2"][1]["inplace"]).architecture.details["qkv_bias"] is True


def test_inplace_graph_has_no_rotary_ops_outside_attention(exported, tmp_path: Path) -> None:
    """RoPE runs inside GroupQueryAttention (do_rotary). The file computes its cos/sin tables from the
    frequencies rather than storing them; the session ONNX Runtime builds has folded them back into tables,
    so no Sin/Cos/rotation arithmetic runs per step."""
    import onnx
    import onnxruntime as ort

    bundle = exported["llama"][1]["inplace"]
    proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 3 and all(len(n.input) == 9 for n in gqa)
    assert {a.name: a.i for a in gqa[0].attribute if a.name in ("do_rotary", "kv_num_heads", "num_heads")} == {
        "do_rotary": 1, "kv_num_heads": 2, "num_heads": 6}
    stored = {t.name for t in proto.graph.initializer}
    assert "rope_inv_freq" in stored and not stored & {"rope_cos", "rope_sin"}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert "GroupQueryAttention" in ops and not {"Sin", "Cos", "Range"} & set(ops)


def test_sliding_window_shorter_than_context(tmp_path: Path) -> None:
    folder = save_family(tmp_path / "m", "mistral", sliding_window=16)
    with pytest.raises(UsageError, match="sliding window of 16 positions.*use at most 16"):
        export_bundle(folder, tmp_path / "wide", max_context=CONTEXT, progress=False)
    assert not (tmp_path / "wide").exists()
    bundle = export_bundle(folder, tmp_path / "b", progress=False)  # default: the longest exact context
    assert read_spec(bundle).architecture.context_length == 16


@pytest.mark.parametrize("model_type, change, message", [
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ("llama", {"num_key_value_heads": 4}, r"n_head \(6\) must be divisible by n_kv_head \(4\)"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ("qwen3", {"hidden_size": None}, "it has no hidden_size"),
])
def test_unsupported_configs_are_refused(model_type: str, change: dict, message: str, tmp_path: Path) -> None:
    config = {"model_type": model_type, **FAMILIES[model_type][2], **change}
    with pytest.raises(CheckpointError, match=message):
        hf.gpt_config(config, tmp_path)


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"), "missing: layers.1.self_attn.k_proj.weight"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(7, 96)}),
     "wrong shape: transformer.h.0.mlp.c_fc"),
    (lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(3)}), "unexpected: layers.0.extra.weight"),
])
def test_bad_weights_are_refused_and_nothing_written(edit, message: str, tmp_path: Path) -> None:
    folder = save_family(tmp_path / "m", "llama")
    _edit_weights(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        export_bundle(folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _rename_embedding_to_head(state: dict) -> None:
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")


def _add_a_different_head(state: dict) -> None:
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.5


@pytest.mark.parametrize("edit", [None, _rename_embedding_to_head], ids=["embedding name", "head name"])
def test_a_tied_matrix_stored_under_either_name_exports(edit, tmp_path: Path) -> None:
    """Tied checkpoints store the one matrix as the embedding (transformers) or as the head (some converters)."""
    folder = save_family(tmp_path / "m", "llama")
    reference = transformers.LlamaForCausalLM.from_pretrained(folder).eval()  # read before the rename
    if edit is not None:
        _edit_weights(folder, edit)
    bundle = export_bundle(folder, tmp_path / "b", progress=False)
    prompt = [5, 9, 14, 3]
    tokens, rows = right_padded_greedy(bundle, [prompt], 8)
    with torch.no_grad():
        theirs = reference(torch.tensor([prompt + tokens[0]])).logits[0].numpy()
    assert np.abs(rows[0] - theirs).max() <= 1e-4


def test_a_tied_config_with_two_different_matrices_is_refused(tmp_path: Path) -> None:
    folder = save_family(tmp_path / "m", "llama")
    _edit_weights(folder, _add_a_different_head)
    with pytest.raises(CheckpointError, match="tie_word_embeddings is true but lm_head.weight differs"):
        export_bundle(folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_head_dim_that_disagrees_with_weights_is_refused(tmp_path: Path) -> None:
    folder = save_family(tmp_path / "m", "qwen3")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "head_dim": 16}))
    with pytest.raises(CheckpointError, match="wrong shape: transformer.h.0.attn.c_attn.weight"):
        export_bundle(folder, tmp_path / "out", progress=False)


def test_several_eos_ids_and_chat_template_travel_into_the_bundle(tmp_path: Path) -> None:
    folder = save_family(tmp_path / "m", "llama")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5, 7], "temperature": 0.6}))
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    spec = read_spec(export_bundle(folder, tmp_path / "b", progress=False))
    assert spec.special_tokens["stop_ids"] == [0, 5, 7]
    assert spec.chat_template == template
    assert spec.generation_defaults == {"temperature": 0.6}


def test_generation_stops_on_any_stop_id(tmp_path: Path) -> None:
    from gptedge.runtime import Model

    folder = save_family(tmp_path / "m", "qwen3")
    bundle = export_bundle(folder, tmp_path / "b", progress=False)
    model = Model.load(bundle, provider="cpu", threads=1)
    free = model.generate("hello", max_new_tokens=12, temperature=0.0, stop_token_ids=())
    assert len(free.token_ids) == 12
    stop = free.token_ids[5]  # make the 6th greedy token (not an earlier one) one of three stop ids
    first = free.token_ids.index(stop)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB - 1, stop, VOCAB - 2]}))
    model = Model.load(export_bundle(folder, tmp_path / "b2", progress=False), provider="cpu", threads=1)
    assert model.stop_ids == (VOCAB - 1, stop, VOCAB - 2)
    result = model.generate("hello", max_new_tokens=12, temperature=0.0)
    assert result.finish_reason == "eos" and result.token_ids == free.token_ids[:first]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_int8_bundle_passes_the_gate(exported, model_type: str, tmp_path: Path) -> None:
    from gptedge.quantize import quantize_bundle

    _, bundles = exported[model_type]
    text = "".join(f"{p} {i}\n" for i, p in enumerate(PROMPTS * 60))
    out = quantize_bundle(bundles["inplace"], tmp_path / "int8", method="int8-weight", eval_text=text, progress=False)
    q = read_spec(out).quantization
    assert q["method"] == "int8-weight" and q["quality"]["passed"] and q["quality"]["ppl_increase_pct"] < 2.0
    head = q["lm_head"]
    assert set(head["measured"]) == {"quantized", "float"}  # an untied head is measured both ways, as a tied one
    assert head["quantized"] and q["embedding"]["tied_to_lm_head"] == FAMILIES[model_type][2]["tie_word_embeddings"]


def test_rotary_tables_are_never_quantized(exported, tmp_path: Path) -> None:
    """The concat graph reads cos/sin tables with a Gather on position_ids: arithmetic, not a position embedding
    (the tables are computed from the float frequencies, gptedge.quantize.rotary)."""
    import onnx

    from gptedge.quantize import quantize_bundle

    text = "".join(f"{p} {i}\n" for i, p in enumerate(PROMPTS * 60))
    out = quantize_bundle(exported["qwen2"][1]["concat"], tmp_path / "int8", method="int8-weight", eval_text=text,
                          quantize_lm_head=True, progress=False)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert read_spec(out).quantization["position_embedding"]["nodes"] == []
    inits = {t.name: t for t in proto.graph.initializer}
    tables = [n.input[0] for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "position_ids"]
    assert sorted(tables) == ["rope_cos", "rope_sin"] and not set(tables) & set(inits)
    assert list(inits["rope_inv_freq"].dims) == [1, 8]  # [1, head_dim / 2]
    assert inits["rope_inv_freq"].data_type == onnx.TensorProto.FLOAT
    assert int(onnx.numpy_helper.to_array(inits["rope.limit"])) == CONTEXT
    assert not [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]


def test_sentencepiece_only_folder_says_how_to_convert(tmp_path: Path) -> None:
    folder = save_family(tmp_path / "m", "llama")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(CheckpointError, match="only a SentencePiece tokenizer.model.*save_pretrained"):
        export_bundle(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_info_shows_family_heads_and_rope(exported, capsys) -> None:
    from gptedge.cli import main

    assert main(["info", str(exported["llama"][1]["inplace"])]) == 0
    out = capsys.readouterr().out
    assert "architecture  llama: 3 layers, 6 heads (2 kv) x 16" in out
    assert ("model         rope (theta 500000, llama3 x8), rmsnorm, swiglu 200, tied head, "
            "biases on qkv, proj, mlp") in out
    assert main(["info", str(exported["qwen3"][1]["inplace"])]) == 0
    assert "4 heads (2 kv) x 32" in capsys.readouterr().out


def test_sharded_safetensors_with_an_index_import_the_same(exported, tmp_path: Path) -> None:
    folder, bundles = exported["qwen2"]
    model = transformers.Qwen2ForCausalLM.from_pretrained(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="300KB")
    (sharded / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    a, b = hf.load_hf(folder).model.state_dict(), hf.load_hf(sharded).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
