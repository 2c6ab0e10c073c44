"""GGUF files -> bundles that compute the model the file holds.

Small GGUFs are written here (tests/gguf_util.py, the way llama.cpp's converter writes them) from random
transformers models of every family gptedge imports. Float files must give transformers' logits (1e-4) and
greedy tokens; Q8_0, Q4_0 and Q4_1 files must keep their blocks: the bundle's MatMulNBits weights hold the
file's integers and scales, the graph matches transformers running the dequantized weights, and greedy
decoding agrees with it over 24 tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from onnx import numpy_helper  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from gguf_util import reference, write_gguf  # noqa: E402
from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.quantize.ggml_blocks import unpack  # noqa: E402
from gptedge.runtime.bundle import read_spec  # noqa: E402
from test_families import FAMILIES  # noqa: E402
from test_hf_export import EOT, VOCAB, small_bpe  # noqa: E402

STEPS = 24
PROMPTS = ["def add(a, b):\n    return", "hello", "for i in range(10):"]
GPT2 = ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_positions=64, n_embd=96, n_layer=2, n_head=3))
# Sizes whose every matrix row is whole blocks of 32, so each type applies to every projection.
BLOCKABLE = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2)


def make_model(model_type: str, seed: int = 0, **changes):
    """A random transformers model of `model_type` with weights scaled up (varied, decisive greedy tokens)."""
    config_cls, model_cls, config = GPT2 if model_type == "gpt2" else FAMILIES[model_type]
    tok = small_bpe()
    eot = tok.token_to_id(EOT)
    cfg = getattr(transformers, config_cls)(**{**config, **changes}, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model, tok


def _compare(bundle: Path, ref, tol: float | None, graph: Path | None = None) -> float:
    """The bundle's greedy tokens are transformers' argmax at every position, and its logits within `tol`.

    tol None: the graph rounds activations (MatMulNBits accuracy_level 4), so its logits are not held to a bound;
    a token may then differ from transformers' only where transformers' own top two are closer than twice the
    largest logit difference measured along the way (a near-tie). Returns that difference.
    """
    from gptedge.export.verify import session
    from gptedge.runtime.engine import Engine
    from gptedge.runtime.evaluate import greedy_decode

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in PROMPTS]
    engine = Engine(session(graph or bundle / "model.onnx"), read_spec(bundle))
    tokens, rows = greedy_decode(engine, prompts, STEPS, keep_logits=True)
    worst = 0.0
    for prompt, mine, logits in zip(prompts, tokens, rows):
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt + mine])).logits[0].numpy()
        error = float(np.abs(logits - theirs).max())
        worst = max(worst, error)
        for position, token in enumerate(mine):
            want = theirs[len(prompt) - 1 + position]
            if int(want.argmax()) != token:
                assert tol is None and want.max() - want[token] <= 2 * error, (position, token)
        if tol is not None:
            assert error <= tol
    assert any(len(set(row)) > 3 for row in tokens)
    return worst


# test_families' configurations: Llama with Llama 3 rotary scaling (rope_freqs), Phi-3 with longrope (factor
# tensors), Mistral with linear scaling, Qwen2 biases and an untied head, Qwen3 q/k norms.
FLOAT_CASES = [("llama", "F32"), ("qwen2", "F32"), ("qwen3", "F32"), ("phi3", "F32"), ("mistral", "F32"),
               ("gpt2", "F32"), ("llama", "F16")]


@pytest.mark.parametrize("model_type, qtype", FLOAT_CASES, ids=[f"{m}-{q}" for m, q in FLOAT_CASES])
def test_float_files_equal_transformers(tmp_path: Path, model_type: str, qtype: str) -> None:
    model, tok = make_model(model_type)
    held = write_gguf(model, tok, tmp_path / "m.gguf", model_type, qtype)
    bundle = export_bundle(tmp_path / "m.gguf", tmp_path / "b", progress=False)
    spec = read_spec(bundle)
    assert spec.quantization is None and spec.provenance["source_kind"] == f"gguf-{gguf_arch(model_type)}"
    assert spec.architecture.family == gguf_arch(model_type)
    _compare(bundle, reference(model, held), 1e-4)


def gguf_arch(model_type: str) -> str:
    return "llama" if model_type == "mistral" else model_type


@pytest.fixture(scope="module", params=["Q8_0", "Q4_0", "Q4_1"])
def kept(request, tmp_path_factory):
    """(qtype, GGUF path, bundle, transformers on the file's dequantized weights) for a blockable Llama."""
    root = tmp_path_factory.mktemp(f"kept-{request.param}")
    model, tok = make_model("llama", seed=3, rope_scaling=None, **BLOCKABLE)
    held = write_gguf(model, tok, root / "m.gguf", "llama", request.param,
                      chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    bundle = export_bundle(root / "m.gguf", root / "b", progress=False)
    return request.param, root / "m.gguf", bundle, reference(model, held)


def test_kept_bundle_records_and_gates(kept) -> None:
    qtype, _, bundle, _ = kept
    q = read_spec(bundle).quantization
    assert q["method"] == "gguf-kept" and q["kind"] == "weight" and q["block_size"] == 32
    # 4 projections a layer, and the tied head: Q4_1's offsets are kept for projections, a Q4_1 head stays float
    head = qtype != "Q4_1"
    assert q["gguf"]["kept"] == {qtype: 2 * 4 + head} and q["gguf"]["requantized"] == {}
    assert q["gguf"]["float"] == ([] if head else ["lm_head.weight"])
    assert q["blocks_match_dequantized"]["max_abs_diff_prefill"] <= 1e-3
    assert q["quality"]["passed"] and abs(q["quality"]["ppl_increase_pct"]) <= 0.5


def test_kept_blocks_hold_the_files_integers_and_scales(kept) -> None:
    """Every MatMulNBits weight, dequantized as the kernel does, is the gguf package's dequantization of the file."""
    qtype, path, bundle, ref = kept
    graph = onnx.load(str(bundle / "model.onnx"))
    inits = {t.name: t for t in graph.graph.initializer}
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    node = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and "h.1.mlp.c_proj" in n.name)
    packed, scales = (numpy_helper.to_array(inits[n]) for n in node.input[1:3])
    raw = stored["blk.1.ffn_down.weight"]
    d = np.asarray(raw.data).reshape(raw.data.shape[0], -1, gguf.GGML_QUANT_SIZES[raw.tensor_type][1])
    assert np.array_equal(scales.reshape(d.shape[:2]), d[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    values = unpack(packed, 8 if qtype == "Q8_0" else 4).astype(np.float32)
    if len(node.input) > 3:  # Q4_1: integer zero points + the block-sum offset term
        zeros = unpack(numpy_helper.to_array(inits[node.input[3]])[:, None, :], 4)[:, 0, :values.shape[1]]
        offsets = numpy_helper.to_array(next(inits[i] for n in graph.graph.node if n.name.endswith("_Offsets")
                                             and "h.1.mlp.c_proj" in n.name for i in n.input[1:]))
        mine = (values - zeros[..., None]) * scales.reshape(d.shape[:2])[..., None] + offsets.T[..., None]
    else:
        mine = (values - (128 if qtype == "Q8_0" else 8)) * scales.reshape(d.shape[:2])[..., None]
    theirs = gguf.quants.dequantize(np.asarray(raw.data), raw.tensor_type)
    if qtype == "Q4_1":  # the offset is the remainder m + z d, rounded once in fp32
        np.testing.assert_allclose(mine.reshape(theirs.shape), theirs, rtol=0, atol=1e-6)
    else:
        assert np.array_equal(mine.reshape(theirs.shape), theirs)


def test_kept_bundle_decodes_like_transformers_on_the_dequantized_weights(kept, tmp_path: Path) -> None:
    """Exact arithmetic (accuracy_level 0): transformers' greedy tokens and logits within the blocks' tolerance.
    The shipped graph (int8 activations, as llama.cpp computes these types): the same tokens but at near-ties."""
    from gptedge.quantize.blocks import set_accuracy_level

    _, _, bundle, ref = kept
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    set_accuracy_level(graph, 0)
    shutil.copyfile(bundle / "model.onnx.data", tmp_path / "model.onnx.data")
    onnx.save(graph, str(tmp_path / "model.onnx"))
    _compare(bundle, ref, 1e-3, graph=tmp_path / "model.onnx")
    assert _compare(bundle, ref, None) <= 0.05 * 30  # int8 activation rounding, not a wrong weight


def test_dequantize_switch_writes_the_float_model(kept, tmp_path: Path) -> None:
    _, path, _, ref = kept
    bundle = export_bundle(path, tmp_path / "f", dequantize=True, progress=False)
    assert read_spec(bundle).quantization is None
    _compare(bundle, ref, 1e-4)


def test_chat_template_and_stop_ids_travel(kept) -> None:
    spec = read_spec(kept[2])
    assert spec.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert spec.special_tokens["eos"] == EOT and spec.special_tokens["bos"] == EOT


def test_info_shows_what_the_file_held_and_what_was_kept(kept, capsys) -> None:
    from gptedge.cli import main

    qtype, _, bundle, _ = kept
    assert main(["info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert f"source_types.attn_q.{qtype}" in out and f"gguf.kept.{qtype}" in out


def test_a_type_that_cannot_be_kept_is_rounded_again_and_said_so(tmp_path: Path) -> None:
    """Q5_0 (5.5 bits a weight) has no MatMulNBits form: its weights are rounded again to 8 bits and gated."""
    model, tok = make_model("llama", seed=5, rope_scaling=None, **BLOCKABLE)
    held = write_gguf(model, tok, tmp_path / "m.gguf", "llama", "Q5_0")
    bundle = export_bundle(tmp_path / "m.gguf", tmp_path / "b", progress=False)
    q = read_spec(bundle).quantization
    assert q["method"] == "gguf-kept+requantized" and q["gguf"]["kept"] == {}
    assert q["gguf"]["requantized"] == {"int8": 2 * 4 + 1} and q["blocks_match_dequantized"] is None
    assert q["quality"]["passed"] and q["quality"]["max_ppl_increase_pct"] == 2.0
    assert "int8" in q["gguf"]["embedding"]
    _compare(bundle, reference(model, held), None)


def test_a_text_prompt_starts_with_bos_when_the_file_asks(tmp_path: Path) -> None:
    from gptedge.runtime import Model

    model, tok = make_model("llama", seed=6, rope_scaling=None)
    write_gguf(model, tok, tmp_path / "m.gguf", "llama", "F32", add_bos=True)
    bundle = export_bundle(tmp_path / "m.gguf", tmp_path / "b", progress=False)
    loaded = Model.load(bundle)
    bos = loaded.spec.special_tokens["bos_id"]
    assert loaded.spec.special_tokens["add_bos"] is True
    assert loaded.prompt_ids("hello") == [bos] + loaded.encode("hello")
    assert loaded.prompt_ids([5, 6]) == [5, 6]  # ids are taken as given



SPM_TEXTS = ["Hello world, this is a test.", "  two leading spaces and   three inside", "def f(x):\n\treturn x * 2",
             "naïve café 日本語 😀 unseen: Ωμέγα ∑∫", "numbers 12345 and 3.14"]


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path: Path) -> None:
    """A `llama` (SentencePiece BPE) vocabulary, written as llama.cpp's converter writes one: pieces, scores and
    types; gptedge's tokenizer gives sentencepiece's own ids, byte fallback included. (Control tokens written in
    the text, "<s>", are matched as tokens, as llama.cpp does when it parses special tokens; sentencepiece never
    matches them.)"""
    spm = pytest.importorskip("sentencepiece")
    import sysconfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8"))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", [sp.id_to_piece(i) for i in range(n)])
    w.add_array("tokenizer.ggml.scores", [sp.get_score(i) for i in range(n)])
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", sp.unk_id())
    w.add_bool("tokenizer.ggml.add_space_prefix", True)
    w.add_tensor("token_embd.weight", np.zeros((n, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from gptedge.export.gguf_file import GGUFFile
    from gptedge.export.gguf_tokenizer import build_tokenizer

    tok = build_tokenizer(GGUFFile(tmp_path / "v.gguf"))
    for text in SPM_TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
