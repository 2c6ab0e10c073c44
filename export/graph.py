"""The torch modules that *define* the exported ONNX graphs, and the export call itself.

Two graphs, both following the contract in `gptedge.runtime.bundle` exactly:

- `InplaceGraph` ("inplace", the default): attention is ONNX Runtime's
  `com.microsoft::GroupQueryAttention`, emitted with `torch.onnx.ops.symbolic_multi_out`.
  The KV cache is one fixed-capacity buffer per layer; binding the same OrtValue as
  past and present makes a decode step write only the new token's keys, O(1) per step.
  Each row's real length travels in `seqlens_k`, so right-padded batches need no mask.
- `ConcatGraph` ("concat", an explicit option): standard ops only (MatMul, Softmax,
  Where), present = past ++ new, padding carried by `attention_mask`. Portable to any
  runtime, at an O(context) copy per step.

Both graphs run `GPT.embed`, `GPT.blocks` and `GPT.head` themselves: what a graph chooses is the
attention kernel it hands the blocks (`GroupQueryKernel` or `ConcatKernel`;
`gptedge.train.model.CachedAttention` is PyTorch's) and the ops for the norms and the GELU (`ort_ops`
in place; the concat graph keeps PyTorch's, `TORCH_OPS`, which trace to standard ops). So every model
family exports through the same two wrappers, and verification compares them against `GPT.forward`.
Neither uses `is_causal=True`: with a past the causal mask must be aligned bottom-right.

The LM head is `Gemm(h, W, transB=1)` on the [V, C] matrix itself (the embedding table when
tied), so it is stored once (a MatMul would make the exporter fold a transposed copy of it into
the file: 154 MB more for GPT-2 small in fp32).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptedge.quantize.rotary import compute_tables
from gptedge.runtime.bundle import IOSpec
from gptedge.runtime.traits import TRAITS
from gptedge.train.model import GPT, TORCH_OPS, Block, Ops, RMSNorm, rope_inv_freq, rotate

OPSET = 18  # DirectML's ceiling; also keeps SDPA-free graphs free of ai.onnx Attention
CONCAT_IO = IOSpec(seqlens_k=None, total_sequence_length=None, attention_mask="attention_mask")
INPLACE_IO = IOSpec()


def io_spec(kv: str) -> IOSpec:
    """The IOSpec a bundle of this KV kind declares (bundle.py's defaults for "inplace")."""
    return INPLACE_IO if kv == "inplace" else CONCAT_IO


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's fused norms and GELU (the in-place graph's; the concat graph stays standard ops)


def ort_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm as ONNX Runtime's SimplifiedLayerNormalization: one node where the decomposition costs seven (fp32
    inside, the same arithmetic; CPU, CUDA and DirectML have it). LayerNorm as it is: it traces to one
    LayerNormalization node already."""
    if not isinstance(norm, RMSNorm):
        return norm(x)
    return torch.onnx.ops.symbolic(
        "SimplifiedLayerNormalization", [x, norm.weight], dict(axis=-1, epsilon=norm.eps, stash_type=1),
        dtype=x.dtype, shape=x.shape, version=1)


def ort_gelu(act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """act(x) as ONNX Runtime's FastGelu (tanh form) or com.microsoft Gelu (erf form): the tanh formula is
    otherwise 8 nodes (Pow, Tanh, 4 Mul, 2 Add)."""
    op = "FastGelu" if act.approximate == "tanh" else "Gelu"
    return torch.onnx.ops.symbolic(f"com.microsoft::{op}", [x], {}, dtype=x.dtype, shape=x.shape, version=1)


def ort_ops(fused_gelu: bool) -> Ops:
    """The in-place graph's ops: fused norms always, the fused GELU where the target provider has a kernel for it
    (runtime/traits.py; DirectML has none, and its graphs keep the standard GELU ops)."""
    return Ops(norm=ort_norm, gelu=ort_gelu if fused_gelu else TORCH_OPS.gelu)


def fuse_residual_norms(proto) -> int:
    """Fold each residual add of the blocks into the norm that reads it; returns how many were folded.

    `Block.forward` is the plain residual stream (`x = x + attn(ln_1(x))`, `x = x + mlp(ln_2(x))`), so the traced
    graph has Add -> LayerNormalization (or SimplifiedLayerNormalization). ONNX Runtime's fused kernel for that
    pair is com.microsoft SkipLayerNormalization (SkipSimplifiedLayerNormalization): one node that returns the norm
    and, as its fourth output, the sum the stream carries on. The pair is rewritten here, in the file, rather than
    in PyTorch (which would have to carry each branch un-added into the next block) or left to ONNX Runtime's
    session optimizer: onnxruntime 1.32 fuses only an Add whose sum nothing else reads (the last one; every other
    residual sum also feeds the next block's add) and never SimplifiedLayerNormalization.

    Only the adds `Block.forward` itself traced qualify (read from the exporter's node metadata, before `tidy`
    drops it), so the embedding sum before the first norm stays a plain Add. The fused node takes the norm's place
    in the names (`tidy`) and the add's place in the node order (every input exists by then).
    """
    import ast

    import onnx
    from onnx import helper

    fused_op = {"LayerNormalization": "SkipLayerNormalization",
                "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization"}
    block = f"{Block.__module__}.{Block.__qualname__}"
    graph = proto.graph
    nodes = list(graph.node)
    readers: dict[str, list] = {}
    made_at: dict[str, int] = {}  # value name -> index of the node that computes it
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(node)
        made_at.update((name, i) for name in node.output)
    graph_outputs = {o.name for o in graph.output}

    def traced_by_block(node) -> bool:  # the innermost module of the node's trace is a Block
        meta = {p.key: p.value for p in node.metadata_props}
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]")) or []  # modules, op last
        return len(classes) > 1 and classes[-2] == block

    replaced: dict[int, onnx.NodeProto] = {}  # id(add) -> fused node
    dropped: set[int] = set()  # id(norm)
    for i, add in enumerate(nodes):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or not traced_by_block(add):
            continue
        norms = [n for n in readers.get(add.output[0], []) if n.op_type in fused_op and n.domain in ("", "ai.onnx")
                 and n.input[0] == add.output[0] and id(n) not in dropped]
        if not norms:
            continue
        norm = norms[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        if (attrs.get("axis", -1) != -1 or any(made_at.get(name, -1) > i for name in norm.input[1:])
                or any(out and (readers.get(out) or out in graph_outputs) for out in norm.output[1:])):
            continue  # not over the last axis, a weight computed after the add, or the norm's statistics read
        total = add.output[0]
        keep_total = any(r is not norm for r in readers[total]) or total in graph_outputs
        fused = helper.make_node(
            fused_op[norm.op_type], [*add.input, *norm.input[1:]],
            [norm.output[0], *(["", "", total] if keep_total else [])],
            domain="com.microsoft", epsilon=attrs.get("epsilon", 1e-5))
        fused.metadata_props.extend(norm.metadata_props)
        replaced[id(add)] = fused
        dropped.add(id(norm))
    if not replaced:
        return 0
    kept = []
    for node in nodes:
        if id(node) not in dropped:
            kept.append(onnx.NodeProto())
            kept[-1].CopyFrom(replaced.get(id(node), node))
    del graph.node[:]
    graph.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


# ---------------------------------------------------------------------------------------------
# The attention kernels


class GroupQueryKernel:
    """Attention as `com.microsoft::GroupQueryAttention` over one fixed-capacity buffer per layer.

    Grouped KV heads go to the op as they are (kv_num_heads). Rotary models hand it the cos/sin tables
    (do_rotary) when the provider's kernel rotates heads of this size (runtime/traits.py), so the rotation
    happens inside the kernel at the positions it derives from seqlens_k; otherwise q and k are rotated here,
    at `position_ids`, before the kernel (the same arithmetic as the PyTorch reference). Per-head q/k norms
    use `ops` (the graph's fused norms).
    """

    def __init__(self, model: GPT, past: tuple[torch.Tensor, ...], seqlens_k: torch.Tensor,
                 total: torch.Tensor, position_ids: torch.Tensor, rotary_in_kernel: bool, ops: Ops) -> None:
        c = model.config
        self.past, self.seqlens_k, self.total, self.ops = past, seqlens_k, total, ops
        rope = c.positions == "rope"
        self.rope = [model.rope_cos, model.rope_sin] if rope and rotary_in_kernel else []
        self.cos = self.sin = None
        if rope and not rotary_in_kernel:
            self.cos = F.embedding(position_ids, model.rope_cos).unsqueeze(2)  # [B, S, 1, D/2]: a Gather
            self.sin = F.embedding(position_ids, model.rope_sin).unsqueeze(2)
        self.attrs = dict(num_heads=c.n_head, kv_num_heads=c.n_kv_head, scale=1.0 / c.head_dim**0.5)
        if self.rope:
            self.attrs.update(do_rotary=1, rotary_interleaved=0)
        self.presents: list[torch.Tensor] = []

    def __call__(self, layer: int, qkv: torch.Tensor, attn) -> torch.Tensor:
        past_k, past_v = self.past[2 * layer], self.past[2 * layer + 1]
        B, S, _ = qkv.shape
        if self.cos is not None:  # rotary outside the kernel: q and k rotated per head here
            q, k, v = attn.split(qkv, self.ops)
            q = rotate(q.view(B, S, attn.n_head, attn.head_dim), self.cos, self.sin).reshape(B, S, -1)
            k = rotate(k.view(B, S, attn.n_kv_head, attn.head_dim), self.cos, self.sin).reshape(B, S, -1)
        elif attn.q_norm is None:  # packed q, k, v go in as they are (no Split node)
            q, k, v = qkv, None, None
        else:  # per-head norms must run on q and k first
            q, k, v = attn.split(qkv, self.ops)
        y, new_k, new_v = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            [q, k, v, past_k, past_v, self.seqlens_k, self.total, *self.rope],
            self.attrs,
            dtypes=(qkv.dtype, past_k.dtype, past_v.dtype),
            shapes=([B, S, attn.sizes[0]], past_k.shape, past_v.shape),
            version=1,
        )
        self.presents += [new_k, new_v]
        return y  # [B, S, H*D]


def rotary_in_kernel(config, target: str) -> bool:
    """Whether the in-place graph lets GroupQueryAttention rotate q and k (the target's kernel takes this head size)."""
    return config.positions == "rope" and TRAITS[target].rotates_in_kernel(config.head_dim)


def attention_kernel(kv: str, config, target: str) -> str:
    """The attention kernel an export of `config` uses, in words: what the export prints and gptedge.json records."""
    if kv != "inplace":
        return "standard ops over a concatenated cache"
    if config.positions != "rope":
        return "GroupQueryAttention, in place"
    if rotary_in_kernel(config, target):
        return "GroupQueryAttention, in place, rotary inside the kernel"
    return (f"GroupQueryAttention, in place, rotary in the graph (head size {config.head_dim}: "
            f"{TRAITS[target].ort_name}'s kernel rotates multiples of {TRAITS[target].rotary_head_multiple} only)")


class ConcatKernel:
    """Attention in standard ops: present = past ++ new, rotary applied explicitly, KV heads repeated for the scores."""

    def __init__(self, model: GPT, past: tuple[torch.Tensor, ...], position_ids: torch.Tensor,
                 attention_mask: torch.Tensor, S: int) -> None:
        c = self.c = model.config
        self.past = past
        self.cos = self.sin = None
        if c.positions == "rope":
            self.cos = F.embedding(position_ids, model.rope_cos).unsqueeze(1)  # [B, 1, S, D/2]: a Gather
            self.sin = F.embedding(position_ids, model.rope_sin).unsqueeze(1)
        # Bottom-right causal mask: new token i sits at cache index P + i and sees keys 0..P+i
        # that the attention mask marks real. Never is_causal=True: it aligns top-left.
        T = attention_mask.shape[1]
        keys = torch.arange(T, device=attention_mask.device)  # [T]
        queries = torch.arange(S, device=attention_mask.device) + (T - S)  # [S]
        # [B, 1, S, T]
        self.allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        self.presents: list[torch.Tensor] = []

    def __call__(self, layer: int, qkv: torch.Tensor, attn) -> torch.Tensor:
        c = self.c
        B, S, _ = qkv.shape
        q, k, v = attn.heads(qkv, self.cos, self.sin)  # [B, H, S, D], [B, Hkv, S, D] x 2
        k = torch.cat([self.past[2 * layer], k], dim=2)  # [B, Hkv, T, D]
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.presents += [k, v]
        group = c.n_head // c.n_kv_head
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, H, T, D]
        scores = (q * (1.0 / c.head_dim**0.5)) @ k.transpose(2, 3)  # [B, H, S, T]
        probs = scores.masked_fill(~self.allowed, torch.finfo(q.dtype).min).softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(B, S, c.n_head * c.head_dim)  # [B, S, H*D]


def _logits(model: GPT, h: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
    """Logits [B, K, V] for the K positions in `logits_index` [B, K] only.

    2-D F.linear on the [V, C] head exports as Gemm(transB=1): a tied matrix is stored once.
    """
    B, K = logits_index.shape
    C = h.shape[-1]
    h = h.gather(1, logits_index.unsqueeze(-1).expand(B, K, C))  # [B, K, C]
    return model.head(h.reshape(B * K, C)).reshape(B, K, -1)


class InplaceGraph(nn.Module):
    """inputs: input_ids, position_ids, seqlens_k, total_sequence_length, logits_index, past_* (see bundle.py)."""

    def __init__(self, model: GPT, rotary_in_kernel: bool = True, fused_gelu: bool = False) -> None:
        super().__init__()
        self.model = model
        self.rotary_in_kernel = rotary_in_kernel
        self.ops = ort_ops(fused_gelu)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        position_ids: torch.Tensor,  # [B, S] int64 (unused when GroupQueryAttention rotates: it derives positions)
        seqlens_k: torch.Tensor,  # [B] int32: tokens in the cache after this call - 1
        total_sequence_length: torch.Tensor,  # [] int32
        logits_index: torch.Tensor,  # [B, K] int64
        *past: torch.Tensor,  # 2 * n_layer of [B, Hkv, capacity, D]
    ) -> tuple[torch.Tensor, ...]:
        kernel = GroupQueryKernel(self.model, past, seqlens_k, total_sequence_length, position_ids,
                                  self.rotary_in_kernel, self.ops)
        h = self.model.blocks(self.model.embed(input_ids, position_ids), kernel, self.ops)
        return (_logits(self.model, h, logits_index), *kernel.presents)


class ConcatGraph(nn.Module):
    """inputs: input_ids, position_ids, attention_mask [B, P+S], logits_index, past_* [B, Hkv, P, D]."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        position_ids: torch.Tensor,  # [B, S] int64
        attention_mask: torch.Tensor,  # [B, P+S] int64, 1 = real token
        logits_index: torch.Tensor,  # [B, K] int64
        *past: torch.Tensor,  # 2 * n_layer of [B, Hkv, P, D]
    ) -> tuple[torch.Tensor, ...]:
        kernel = ConcatKernel(self.model, past, position_ids, attention_mask, input_ids.shape[1])
        h = self.model.blocks(self.model.embed(input_ids, position_ids), kernel)
        return (_logits(self.model, h, logits_index), *kernel.presents)


def graph_names(kv: str, n_layer: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in declaration order, from the IOSpec (one source of truth)."""
    io = io_spec(kv)
    extra = [io.seqlens_k, io.total_sequence_length] if kv == "inplace" else [io.attention_mask]
    inputs = [io.input_ids, io.position_ids, *extra, io.logits_index, *io.past_names(n_layer)]
    return inputs, [io.logits, *io.present_names(n_layer)]


def example_inputs(kv: str, model: GPT, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; every dynamic size differs and is >= 2 so none gets specialised."""
    c = model.config
    B, S, K, P = 2, 5, 3, 7  # P: KV capacity ("inplace") or past length ("concat")
    ids = torch.zeros(B, S, dtype=torch.long)
    past = tuple(torch.zeros(B, c.n_kv_head, P, c.head_dim, dtype=dtype) for _ in range(2 * c.n_layer))
    if kv == "inplace":
        extra: tuple[torch.Tensor, ...] = (torch.full((B,), S - 1, dtype=torch.int32),
                                           torch.tensor(S, dtype=torch.int32))
    else:
        extra = (torch.ones(B, P + S, dtype=torch.long),)
    return (ids, ids.clone(), *extra, torch.zeros(B, K, dtype=torch.long), *past)


def dynamic_shapes(kv: str, model: GPT, context_length: int) -> tuple:
    """torch.export dims, named as the ONNX graph will name them (batch, sequence, kv_capacity, ...)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("sequence", min=1, max=context_length)
    nlogits = Dim("logits_count", min=1, max=context_length)
    n_past = 2 * model.config.n_layer
    if kv == "inplace":
        capacity = Dim("kv_capacity", min=1, max=context_length)
        return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}, None, {0: batch, 1: nlogits},
                tuple({0: batch, 2: capacity} for _ in range(n_past)))
    past_len = Dim("past_sequence", min=0, max=context_length)
    total = Dim.DYNAMIC  # = past_sequence + sequence; named Dims cannot be added, export infers the relation
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: nlogits},
            tuple({0: batch, 2: past_len} for _ in range(n_past)))


@dataclass
class GraphStats:
    seconds: float
    nodes: int
    op_types: dict[str, int]


def export_graph(model: GPT, kv: str, path: Path, *, context_length: int, target: str = "cpu",
                 verbose: bool = False) -> GraphStats:
    """Trace `model` (already in its export dtype, eval mode) and save `path` + `path.data`.

    In-place graphs use ONNX Runtime's fused kernels that the `target` provider has (runtime/traits.py).
    """
    import onnx

    if kv == "inplace":
        wrapper = InplaceGraph(model, rotary_in_kernel(model.config, target), TRAITS[target].fused_gelu).eval()
    else:
        wrapper = ConcatGraph(model).eval()
    dtype = next(model.parameters()).dtype
    inputs, outputs = graph_names(kv, model.config.n_layer)
    start = time.perf_counter()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" lines: irrelevant to a GPT
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's axis-renaming chatter; real failures raise
            program = torch.onnx.export(
                wrapper, example_inputs(kv, model, dtype), None, dynamo=True, opset_version=OPSET,
                dynamic_shapes=dynamic_shapes(kv, model, context_length), input_names=inputs, output_names=outputs,
                optimize=True, verify=False, report=False, verbose=verbose,
            )
    finally:
        registry_log.setLevel(level)
    proto = program.model_proto
    if kv == "inplace":  # ONNX Runtime's own graph (GroupQueryAttention): its fused norms too; "concat" stays portable
        fuse_residual_norms(proto)
    proto = tidy(proto)
    computed_rotary_tables(proto, model)
    if kv == "concat":
        name_total_dims(proto, graph_names(kv, model.config.n_layer))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return GraphStats(time.perf_counter() - start, len(proto.graph.node), op_counts(proto))


def computed_rotary_tables(proto, model: GPT) -> bool:
    """The traced graph stores the model's rotary tables; have it compute them from the frequencies instead
    (gptedge.quantize.rotary: same values, folded back into tables when a session loads, not on disk)."""
    if model.config.positions != "rope":
        return False
    factor = float((model.config.rope_scaling or {}).get("attention_factor", 1.0))
    return compute_tables(proto, rope_inv_freq(model.config).numpy(), factor)


def op_counts(proto) -> dict[str, int]:
    """Nodes per op type of a graph (what gptedge.json records and the node-count tests read)."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def name_total_dims(proto, names: tuple[list[str], list[str]]) -> None:
    """The concat graph's attention-mask and present length is past + new: call it `total_sequence` everywhere."""
    inputs, outputs = names
    wanted = {inputs[2]: 1, **{name: 2 for name in outputs[1:]}}  # attention_mask dim 1, present_* dim 2
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name in wanted:
            value.type.tensor_type.shape.dim[wanted[value.name]].dim_param = "total_sequence"


def tidy(proto):
    """Readable node and weight names from the module path; drop trace metadata (it embeds local file paths).

    Names like `transformer.h.3.attn.c_attn/MatMul` let quantization exclude or
    select nodes by module, the way one reads the PyTorch model.
    """
    import ast

    proto.doc_string = ""
    proto.graph.doc_string = ""
    used: set[str] = set()
    renamed: dict[str, str] = {}
    weights = {init.name for init in proto.graph.initializer}  # a val_ input computed by a node keeps its name
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]")) or []  # full module paths, op last
        module = scopes[-2].removeprefix("model.") if len(scopes) > 1 else ""
        module = "" if module.startswith("_empty_nn_module_stack") else module
        base = f"{module}/{node.op_type}" if module else node.op_type
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        node.name = name
        del node.metadata_props[:]
        node.doc_string = ""
        if (module and node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1].startswith("val_")
                and node.input[1] in weights):
            renamed.setdefault(node.input[1], f"{module}.weight_t")  # [in, out]: the transposed Linear weight
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name.removeprefix("model."))
        init.doc_string = ""
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
            elif name.startswith("model."):
                node.input[i] = name.removeprefix("model.")
    for value in list(proto.graph.value_info):
        value.doc_string = ""
    del proto.metadata_props[:]
    return proto
