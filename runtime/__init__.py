"""gptedge.runtime: run a gptedge bundle with numpy + onnxruntime + tokenizers only (never torch).

    from gptedge.runtime import Model
    model = Model.load("bundle/")
    result = model.generate("def fib(n):", temperature=0.0, max_new_tokens=64)
    print(result.text, result.finish_reason, result.timings.decode_tokens_per_s)

Public names are imported lazily, so `import gptedge.runtime.bundle` (used by the exporter and the
quantizer) does not load onnxruntime, and `import gptedge.runtime` costs nothing until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Model": "gptedge.runtime.model",
    "Stream": "gptedge.runtime.model",
    "GenerationResult": "gptedge.runtime.decoding",
    "Timings": "gptedge.runtime.decoding",
    "CancelToken": "gptedge.runtime.decoding",
    "SamplingParams": "gptedge.runtime.sampling",
    "BundleSpec": "gptedge.runtime.bundle",
    "read_spec": "gptedge.runtime.bundle",
    "Engine": "gptedge.runtime.engine",
    "choose_provider": "gptedge.runtime.providers",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from gptedge.runtime.bundle import BundleSpec, read_spec
    from gptedge.runtime.decoding import CancelToken, GenerationResult, Timings
    from gptedge.runtime.engine import Engine
    from gptedge.runtime.model import Model, Stream
    from gptedge.runtime.providers import choose_provider
    from gptedge.runtime.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptedge.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
