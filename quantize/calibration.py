"""Calibration feeds for the static recipe, built by the runtime's own Engine rather than by hand.

quantize_static runs the float graph on full input sets. What those inputs are (position ids, the
in-place cache's seqlens_k / total_sequence_length, the concat cache's mask and empty pasts, which
logits to compute) is the Engine's contract with the graph, so the feeds come from
`Engine.prefill_feed`: a change to that contract reaches calibration without a second copy to keep in
step. No session is needed to build them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from gptedge.runtime.bundle import BundleSpec
from gptedge.runtime.engine import Engine


def calibration_feeds(spec: BundleSpec, windows: list[np.ndarray]) -> Iterable[dict[str, np.ndarray]]:
    """The graph's full input set for prefilling each window from an empty cache, as the Engine feeds it.

    Logits are requested for every position so the head's input range covers the whole window.
    """
    engine = Engine(None, spec)  # type: ignore[arg-type]  # prefill_feed only reads the spec
    for ids in windows:
        yield engine.prefill_feed(np.asarray(ids, np.int64))


__all__ = ["calibration_feeds"]
