"""What each execution provider can do, as data: one row per provider, read by every layer that cares.

Export (default dtype), quantization (which INT8 kernels exist, MatMulNBits settings), provider choice
(GroupQueryAttention dtypes, install hints) and the runtime (where KV lives, serialized runs, memory
pattern, the optimized-graph cache) look a fact up here instead of comparing provider names. The
facts come from onnxruntime's kernel registrations (its docs/ContribOperators.md and OperatorKernels.md); a new
provider is a new row.

No onnxruntime import: export and quantize read this table too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class ProviderTraits:
    name: str  # gptedge's name: what --provider and --target take
    ort_name: str  # onnxruntime's execution provider
    install_hint: str  # what to install when onnxruntime does not offer it
    kv_device: str  # OrtValue device the KV buffers live on
    default_dtype: str  # what `gptedge export --target NAME` writes by default
    gqa_dtypes: tuple[str, ...]  # KV / activation dtypes its GroupQueryAttention kernel takes
    # Quantized KV cache dtypes its GroupQueryAttention takes in place with fp32 activations, as measured here
    # (tests/test_kv_cache_int8.py runs it); unmeasured providers list none.
    quantized_kv: tuple[str, ...] = ()
    serialize_runs: bool = False  # one Run at a time per session (DirectML)
    memory_pattern: bool = True  # onnxruntime's memory-pattern optimization allowed (DirectML requires it off)
    graph_cache: bool = True  # the optimized graph can be saved and reloaded (DirectML's fused nodes cannot)
    # Quantization kinds ("weight", "dynamic", "static") -> None when fused kernels exist, else why not.
    int8_kernels: Mapping[str, str | None] = field(default_factory=dict)
    matmul_nbits_accuracy: int | None = None  # MatMulNBits accuracy_level (CPU: 4 = int8 activations)
    matmul_nbits_whole_blocks: bool = False  # K must be a multiple of the block size (DirectML)
    gather_block_quantized: bool = True  # a GatherBlockQuantized kernel for the quantized embedding
    preload_nvidia_libraries: bool = False  # let onnxruntime find CUDA / cuDNN from pip's nvidia-* packages first
    fused_gelu: bool = False  # com.microsoft FastGelu / Gelu kernels exist (not in DirectML's registration table)
    # GroupQueryAttention rotates q and k itself (do_rotary) only for head sizes that are a multiple of this: the CPU
    # kernel refuses others ("head_size shall be a multiple of 16", tests/test_head_sizes.py). Other rotary models
    # are rotated in the graph before the kernel, which is exact everywhere; CUDA's and DirectML's kernels are not
    # measured here, so they get the same rule.
    rotary_head_multiple: int = 16
    # What `gptedge quantize --method auto` builds for a bundle of this target, and why (printed with the choice).
    auto_quantize: tuple[str, str] = ("int8", "")

    def rotates_in_kernel(self, head_dim: int) -> bool:
        """Whether this provider's GroupQueryAttention can apply the rotary embedding to heads of `head_dim`."""
        return head_dim % self.rotary_head_multiple == 0

    @property
    def host_kv(self) -> bool:
        """KV buffers in host memory: rows can be numpy views (continuous batching)."""
        return self.kv_device == "cpu"


TRAITS: dict[str, ProviderTraits] = {
    "cpu": ProviderTraits(
        name="cpu", ort_name="CPUExecutionProvider", install_hint="pip install onnxruntime", kv_device="cpu",
        default_dtype="fp32", gqa_dtypes=("fp32", "fp16"), quantized_kv=("int8",),
        int8_kernels={"weight": None, "dynamic": None, "static": None},
        matmul_nbits_accuracy=4, fused_gelu=True,
        auto_quantize=("int8", "MatMulNBits INT8 decodes fastest on CPU (benchmarks/results/quantize-methods.json), "
                               "and searched scales keep real models' quality at Q8_0's size "
                               "(benchmarks/results/quantize-recipes.json)"),
    ),
    "cuda": ProviderTraits(
        name="cuda", ort_name="CUDAExecutionProvider",
        install_hint="install onnxruntime-gpu (and CUDA 12 + cuDNN 9) instead of onnxruntime", kv_device="cuda",
        default_dtype="fp16", gqa_dtypes=("fp16",), preload_nvidia_libraries=True, fused_gelu=True,
        auto_quantize=("int8", "MatMulNBits is the one INT8 form with fused CUDA kernels; dynamic INT8 has none"),
        int8_kernels={"weight": None,
                      "dynamic": "onnxruntime's CUDA provider has no "
                                 "DynamicQuantizeLinear / DynamicQuantizeMatMul kernels",
                      "static": "QDQ INT8 runs unfused (dequantize + float MatMul) on CUDA"},
    ),
    "dml": ProviderTraits(
        name="dml", ort_name="DmlExecutionProvider",
        install_hint="install onnxruntime-directml on Windows instead of onnxruntime",
        kv_device="dml", default_dtype="fp16", gqa_dtypes=("fp32", "fp16"), serialize_runs=True, memory_pattern=False,
        graph_cache=False,
        int8_kernels={"weight": None,
                      "dynamic": "the dynamic recipe quantizes fp32 graphs for onnxruntime's CPU kernels",
                      "static": "DirectML's support for QDQ INT8 graphs is unverified"},
        matmul_nbits_whole_blocks=True, gather_block_quantized=False,
        auto_quantize=("int8", "MatMulNBits is the one INT8 form DirectML runs fused (dequantize + GEMM)"),
    ),
}
PROVIDER_NAMES = tuple(TRAITS)  # the table's order, as --provider and --target list them: CPU, the fallback, first
# The preference of the "auto" provider: the first of these that onnxruntime offers and that can run the bundle,
# else CPU (gptedge.runtime.providers.choose_provider).
AUTO_ORDER = ("cuda", "dml")
# Bundles written before gptedge.json recorded `quantization.kind` name only their recipe.
LEGACY_QUANT_KINDS = {"int8-weight": "weight", "int4-weight": "weight", "int8-dynamic": "dynamic",
                      "int8-static": "static"}


def traits(name: str) -> ProviderTraits:
    return TRAITS[name]


def quantization_kind(quantization: Mapping | None) -> str | None:
    """The quantization kind a bundle's gptedge.json records (None: not quantized)."""
    if not quantization:
        return None
    return quantization.get("kind") or LEGACY_QUANT_KINDS.get(str(quantization.get("method", "")), "weight")
