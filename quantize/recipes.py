"""The quantization recipes as data: what each one is, where it runs, its block sizes and its gate.

Six recipes, each a function from a float ONNX model to a quantized one (gptedge.quantize.quantizer):

    int8           weight-only INT8 blocks of 64 (MatMulNBits), scales searched per block to minimise the
                   rounding error weighted by each input channel's mean square activation on calibration text
                   (gptedge.quantize.rounding.searched); the default
    int4           weight-only INT4 blocks with integer zero points, rounded by GPTQ (act-order) on calibration
                   text, the LM head at INT8; a ladder of candidates from the smallest (blocks of 64) to
                   blocks of 32 with the most sensitive tensors at INT8, the first that passes the gate is kept
    int8-weight    onnxruntime's round-to-nearest INT8 blocks (MatMulNBits, bits=8), no calibration
    int4-weight    the same at 4 bits
    int8-dynamic   per-channel INT8 weights, activations quantized on the fly per call
                   (MatMulInteger, fused to DynamicQuantizeMatMul by ONNX Runtime's CPU provider)
    int8-static    QDQ INT8 weights and activations, activation ranges calibrated on text

The choices (block sizes, INT8 heads for INT4 bodies, GPTQ with act-order, the gates) were measured on the
real SmolLM2-135M and on a model trained here: benchmarks/quantize_recipes.py writes
benchmarks/results/quantize-recipes.json. Where a recipe runs is not written here: a recipe has a kind
("weight", "dynamic", "static") and each provider's row in gptedge.runtime.traits says which kinds it has
fused INT8 kernels for, and why not where it has none. A new provider or recipe is a new row.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptedge.errors import QuantizeError
from gptedge.runtime.traits import TRAITS

# Weights per scale of onnxruntime's round-to-nearest MatMulNBits blocks, by bit width. INT8: 128, for decode
# speed, prefill time and file size in benchmarks/results/quantize-methods.json (rows "int8-weight" and
# "int8-weight, block 32"); whether a block size is good enough for a given model is the quality gate's call.
# INT4 keeps 32: at 4 bits a block's single scale is what limits quality. The rounding recipes (int8, int4)
# choose theirs in benchmarks/results/quantize-recipes.json: 64 for int8 (Q8_0's size, its quality or better),
# their rungs for int4. Other widths (a recipe registered by a test, say) use FALLBACK_BLOCK_SIZE.
DEFAULT_BLOCK_SIZE = {8: 128, 4: 32}
ROUNDING_BLOCK_SIZE = 64
FALLBACK_BLOCK_SIZE = 32


@dataclass(frozen=True)
class Rung:
    """One candidate of a recipe's ladder: tried in order, the first that passes the gate is kept."""

    block_size: int
    sensitive_int8: float = 0.0  # fraction of the projections (the largest output error first) kept at INT8

    @property
    def label(self) -> str:
        extra = f", {self.sensitive_int8:.0%} most sensitive at int8" if self.sensitive_int8 else ""
        return f"blocks of {self.block_size}{extra}"


@dataclass(frozen=True)
class Method:
    """One recipe: its name on the command line, bit width, kind (what runtime/traits.py keys kernels by)."""

    name: str
    bits: int
    kind: str  # "weight" | "dynamic" | "static"
    summary: str
    # How weights are rounded: None (onnxruntime's quantizers), "searched" or "gptq" (gptedge.quantize.rounding)
    rounding: str | None = None
    head: int | None = None  # the LM head's bit width when it differs from `bits` (an INT4 head costs too much)
    rungs: tuple[Rung, ...] = ()  # candidates in order (empty: one build, at the block size asked for)
    max_ppl_increase: float = 2.0  # the gate's default limit, percent

    @property
    def needs_fp32(self) -> bool:
        """onnxruntime's dynamic and static quantizers take fp32 graphs; weight-only blocks take any float dtype."""
        return self.kind != "weight"

    @property
    def calibrated(self) -> bool:
        """Recipes that fit something on calibration text (activation ranges, rounding), which the gate must then
        not score."""
        return self.kind == "static" or self.rounding is not None


METHODS: dict[str, Method] = {
    "int8": Method("int8", 8, "weight", "INT8 blocks of 64, scales searched against calibration activations",
                   rounding="searched"),
    "int4": Method("int4", 4, "weight", "INT4 blocks rounded by GPTQ on calibration text, INT8 head; the smallest "
                   "candidate that passes the gate", rounding="gptq", head=8,
                   rungs=(Rung(64), Rung(32), Rung(32, 0.1)), max_ppl_increase=5.0),
    "int8-weight": Method("int8-weight", 8, "weight", "weight-only INT8 blocks (MatMulNBits bits=8)"),
    "int8-dynamic": Method("int8-dynamic", 8, "dynamic",
                           "per-channel INT8 weights, activations quantized per call (DynamicQuantizeMatMul)"),
    "int8-static": Method("int8-static", 8, "static",
                          "QDQ INT8 weights and activations, activation ranges calibrated on --calibration text"),
    "int4-weight": Method("int4-weight", 4, "weight", "weight-only INT4 blocks (MatMulNBits bits=4)"),
}


def unsupported_reason(method: Method, target: str) -> str | None:
    """Why `target`'s provider cannot run `method` well (no fused kernels for its kind), None when it can."""
    return TRAITS[target].int8_kernels.get(method.kind)


def targets_of(method: Method) -> list[str]:
    """The bundle targets whose provider runs `method` fused, in the provider table's order."""
    return [target for target in TRAITS if unsupported_reason(method, target) is None]


def runnable_methods(target: str) -> list[str]:
    """The recipes `target`'s provider runs fused, in table order: what an error suggests instead."""
    return [name for name, method in METHODS.items() if unsupported_reason(method, target) is None]


def get_method(name: str, target: str) -> Method:
    """The recipe `name` for a bundle of `target`; QuantizeError if unknown or not runnable there."""
    if name not in METHODS:
        raise QuantizeError(f"unknown method {name!r}; choose one of: auto, {', '.join(METHODS)}")
    method = METHODS[name]
    why = unsupported_reason(method, target)
    if why is not None:
        raise QuantizeError(f"{name} cannot run on a {target} bundle ({TRAITS[target].ort_name}): {why}; "
                            f"use one of: {', '.join(runnable_methods(target))}")
    return method


def head_bits(method: Method) -> int:
    """Bit width of the LM head's blocks: the recipe's `head`, else a weight-only recipe's own bits; INT8 for
    dynamic / static recipes.

    Dynamic and static recipes do not quantize the head themselves; it is stored as INT8 MatMulNBits
    blocks so the tied embedding can read the same bytes in every recipe. The one place this rule
    lives: the default block size, the candidate labels and the graph surgery all ask here.
    """
    if method.head is not None:
        return method.head
    return method.bits if method.kind == "weight" else 8


def default_block_size(bits: int, n_embd: int, method: Method | None = None) -> int:
    """The default block for `bits` (or the recipe's first rung), halved until it divides the model width."""
    if method is not None and method.rungs:
        block = method.rungs[0].block_size
    elif method is not None and method.rounding:
        block = ROUNDING_BLOCK_SIZE
    else:
        block = DEFAULT_BLOCK_SIZE.get(bits, FALLBACK_BLOCK_SIZE)
    while block > 16 and n_embd % block:
        block //= 2
    return block


def check_block_size(block_size: int) -> int:
    """MatMulNBits takes power-of-two blocks of at least 16: refuse anything else before any work."""
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block size must be a power of two >= 16 (MatMulNBits' rule), got {block_size!r}")
    return block_size
