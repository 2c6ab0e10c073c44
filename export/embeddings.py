"""Embedding bundles: a graph that returns one pooled vector per text instead of logits.

Decoder embedding models (Qwen3-Embedding, gte-Qwen2, ...) are families gptedge already imports; what differs is
the end of the graph. `Pooler` runs the model's blocks and final norm over a right-padded batch and pools the
hidden states as the model declares: the last real token ("last", Qwen3-Embedding), the mean over real tokens
("mean") or the first token ("first"), L2-normalised when the model says so. Causal attention is why right
padding needs no mask inside the blocks: a real token never attends to the pads after it; the mask only chooses
what is pooled.

The pooling, normalisation and the query/document prompts come from sentence-transformers' files when the folder
has them (modules.json, 1_Pooling/config.json, config_sentence_transformers.json), else from the options.
The graph is checked against the PyTorch Pooler before anything is written (cosine >= MIN_COSINE per text).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptedge.errors import CheckpointError, ExportError, UsageError
from gptedge.export.graph import OPSET, GraphStats, computed_rotary_tables, op_counts, tidy
from gptedge.runtime.bundle import EMBEDDING_INPUTS as INPUTS
from gptedge.runtime.bundle import EMBEDDING_OUTPUT as OUTPUT
from gptedge.runtime.bundle import POOLINGS
from gptedge.train.model import GPT

MIN_COSINE = 0.99999


class Pooler(nn.Module):
    """[B, S] token ids and their mask (1 for real tokens, right-padded) -> [B, C] pooled hidden states."""

    def __init__(self, model: GPT, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.model, self.pooling, self.normalize = model, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(input_ids)[0]  # [B, S, C]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, S, 1]
        if self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1  # [B]
            pooled = torch.gather(hidden, 1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        elif self.pooling == "mean":
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def sentence_transformers_config(folder: Path) -> dict[str, Any] | None:
    """Pooling, normalisation and prompts from a sentence-transformers folder; None when it is not one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        pooling_dir = next(m["path"] for m in modules if m.get("type", "").endswith("models.Pooling"))
        pooling = json.loads((folder / pooling_dir / "config.json").read_text(encoding="utf-8"))
        extra_file = folder / "config_sentence_transformers.json"
        extra = json.loads(extra_file.read_text(encoding="utf-8")) if extra_file.is_file() else {}
    except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: the sentence-transformers files (modules.json, its Pooling module's "
                              f"config.json) are unreadable ({exc}); restore them or pass --pooling") from None
    modes = {"last": pooling.get("pooling_mode_lasttoken"), "mean": pooling.get("pooling_mode_mean_tokens"),
             "first": pooling.get("pooling_mode_cls_token")}
    chosen = [mode for mode, on in modes.items() if on]
    if len(chosen) != 1:
        raise CheckpointError(f"{folder}: the Pooling module asks for {chosen or 'no mode'}; gptedge pools by one of "
                              f"{', '.join(POOLINGS)}")
    normalize = any(m.get("type", "").endswith("models.Normalize") for m in modules)
    prompts = extra.get("prompts") if isinstance(extra.get("prompts"), dict) else {}
    return {"pooling": chosen[0], "normalize": normalize, "prompts": {k: v for k, v in prompts.items()
                                                                     if isinstance(v, str)}}


def embedding_settings(source: Path, pooling: str | None, normalize: bool | None) -> dict[str, Any]:
    """What the bundle records: the folder's sentence-transformers settings, overridden by explicit options."""
    found = sentence_transformers_config(source) if source.is_dir() else None
    settings = found or {"pooling": "last", "normalize": True, "prompts": {}}
    if pooling is not None:
        if pooling not in POOLINGS:
            raise UsageError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}", field="pooling")
        settings["pooling"] = pooling
    if normalize is not None:
        settings["normalize"] = bool(normalize)
    settings["source"] = "sentence-transformers" if found else "options"
    return settings


def export_embedding_graph(model: GPT, settings: dict[str, Any], path: Path) -> GraphStats:
    """Trace the Pooler (standard ops: any provider runs it) and save `path` + `path.data`."""
    import onnx

    pooler = Pooler(model, settings["pooling"], settings["normalize"]).eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=model.config.exact_context)
    start = time.perf_counter()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                pooler, (ids, mask), None, dynamo=True, opset_version=OPSET, input_names=list(INPUTS),
                output_names=[OUTPUT], dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), optimize=True,
                verify=False, report=False)
    finally:
        registry_log.setLevel(level)
    proto = tidy(program.model_proto)
    computed_rotary_tables(proto, model)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return GraphStats(time.perf_counter() - start, len(proto.graph.node), op_counts(proto))


def verify_embeddings(model: GPT, settings: dict[str, Any], path: Path, texts_ids: list[list[int]]) -> dict[str, Any]:
    """The graph's vectors against the PyTorch Pooler's on a right-padded batch of texts of different lengths."""
    from gptedge.export.verify import session

    lengths = [len(t) for t in texts_ids]
    ids = np.zeros((len(texts_ids), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, t in enumerate(texts_ids):
        ids[row, : len(t)], mask[row, : len(t)] = t, 1
    ours = session(path).run([OUTPUT], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)
    with torch.no_grad():
        ref = Pooler(model.float(), settings["pooling"], settings["normalize"])(
            torch.from_numpy(ids), torch.from_numpy(mask)).double().numpy()
    alone = []
    with torch.no_grad():  # each text alone, unpadded: padding must not change a vector
        for t in texts_ids:
            one = torch.tensor([t])
            alone.append(Pooler(model.float(), settings["pooling"], settings["normalize"])(
                one, torch.ones_like(one)).double().numpy()[0])
    cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(ours, [*alone])]
    result = {"min_cosine": min(cosines), "max_abs_diff": float(np.abs(ours - ref).max()), "texts": len(texts_ids),
              "lengths": lengths}
    if result["min_cosine"] < MIN_COSINE:
        raise ExportError(f"the embedding graph disagrees with PyTorch (cosine {result['min_cosine']:.6f} < "
                          f"{MIN_COSINE}); nothing was written")
    return result
