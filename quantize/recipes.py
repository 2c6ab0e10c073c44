"""The quantization recipes as data: what each one is, where it runs, and its block sizes.

Four recipes, each a function from a float ONNX model to a quantized one (gptedge.quantize.quantizer):

    int8-weight    weight-only INT8 blocks (com.microsoft MatMulNBits, bits=8); int8 compute where the
                   provider offers it (runtime/traits.py: matmul_nbits_accuracy)
    int4-weight    the same at 4 bits
    int8-dynamic   per-channel INT8 weights, activations quantized on the fly per call
                   (MatMulInteger, fused to DynamicQuantizeMatMul by ONNX Runtime's CPU provider)
    int8-static    QDQ INT8 weights and activations, activation ranges calibrated on text

Where a recipe runs is not written here: a recipe has a kind ("weight", "dynamic", "static") and each
provider's row in gptedge.runtime.traits says which kinds it has fused INT8 kernels for, and why not
where it has none. A new provider or recipe is a new row, not a new comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptedge.errors import QuantizeError
from gptedge.runtime.traits import TRAITS

# Weights per scale of MatMulNBits blocks, by bit width. INT8: 128, for decode speed, prefill time and file
# size (one scale per 128 weights instead of per 32) in benchmarks/results/quantize-methods.json (rows
# "int8-weight" and "int8-weight, block 32"); whether a block size is good enough for a given model is
# the quality gate's call. INT4 keeps 32: at 4 bits a block's single scale is what limits quality.
# Other widths (a recipe registered by a test, say) use FALLBACK_BLOCK_SIZE.
DEFAULT_BLOCK_SIZE = {8: 128, 4: 32}
FALLBACK_BLOCK_SIZE = 32


@dataclass(frozen=True)
class Method:
    """One recipe: its name on the command line, bit width, kind (what runtime/traits.py keys kernels by)."""

    name: str
    bits: int
    kind: str  # "weight" | "dynamic" | "static"
    summary: str

    @property
    def needs_fp32(self) -> bool:
        """onnxruntime's dynamic and static quantizers take fp32 graphs; weight-only blocks take any float dtype."""
        return self.kind != "weight"

    @property
    def calibrated(self) -> bool:
        """Static recipes fit activation ranges on calibration text, which the gate must then not score."""
        return self.kind == "static"


METHODS: dict[str, Method] = {
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
    """Bit width of the LM head's blocks: a weight-only recipe's own bits; INT8 for dynamic / static recipes.

    Dynamic and static recipes do not quantize the head themselves; it is stored as INT8 MatMulNBits
    blocks so the tied embedding can read the same bytes in every recipe. The one place this rule
    lives: the default block size, the candidate labels and the graph surgery all ask here.
    """
    return method.bits if method.kind == "weight" else 8


def default_block_size(bits: int, n_embd: int) -> int:
    """The default block for `bits`, halved until it divides the model width (tiny test models)."""
    block = DEFAULT_BLOCK_SIZE.get(bits, FALLBACK_BLOCK_SIZE)
    while block > 16 and n_embd % block:
        block //= 2
    return block


def check_block_size(block_size: int) -> int:
    """MatMulNBits takes power-of-two blocks of at least 16: refuse anything else before any work."""
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block size must be a power of two >= 16 (MatMulNBits' rule), got {block_size!r}")
    return block_size
