"""What every import produces: a float PyTorch model and everything the bundle carries beside the graph.

A gptedge checkpoint, a Hugging Face folder (gptedge.export.hf) and a GGUF file (gptedge.export.gguf) each
load into one `Source`; the exporter reads nothing else, so a new kind of source is a new loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Source:
    kind: str  # "gptedge-checkpoint", "huggingface-<model_type>" or "gguf-<architecture>"
    path: Path
    model: Any  # gptedge.train.model.GPT, fp32, eval
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_file: Path | None  # copied verbatim when present; None: the tokenizer is saved as built
    special_tokens: dict[str, Any] = field(default_factory=dict)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    weight_files: list[Path] = field(default_factory=list)
    family: str = "gpt2"  # a name for people ("gpt2", "llama", "qwen3", ...); the model's config says what it computes
    chat_template: str | None = None  # Jinja text from the source's tokenizer files, carried into the bundle
    # A quantized source (a GGUF file: gptedge.export.gguf.GGUFWeights): its stored blocks per weight
    # (`blocks(name)`), the width to round again what cannot be kept (`requantize_bits(name)`) and the stored
    # types per kind of tensor (`types()`). None: a float source.
    stored: Any = None
