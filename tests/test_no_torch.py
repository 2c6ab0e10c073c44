"""gptedge.runtime runs where torch cannot even be imported (a desktop app ships numpy + onnxruntime + tokenizers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name in ("onnx", "transformers", "optimum"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
import json
import gptedge.runtime
from gptedge.runtime import Model, SamplingParams
model = Model.load(sys.argv[1], provider="auto")
result = model.generate("Hello", temperature=0.0, max_new_tokens=8, stop_token_ids=())
pieces = list(model.stream("你好", temperature=0.9, seed=1, max_new_tokens=8))
ppl = model.perplexity("Hello world! The quick brown fox.")
top = model.next_tokens("Hello", 3)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "transformers"))
print(json.dumps({"tokens": result.token_ids, "provider": model.provider, "heavy": heavy, "ppl": ppl, "top": len(top)}))
"""


def test_runtime_works_without_torch(runtime_bundle: Path, runtime_model) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(runtime_bundle)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["provider"] == "cpu" and out["top"] == 3 and out["ppl"] > 1
    expected = runtime_model.generate("Hello", temperature=0.0, max_new_tokens=8, stop_token_ids=()).token_ids
    assert out["tokens"] == expected


def test_cli_runtime_commands_do_not_import_torch(runtime_bundle: Path) -> None:
    code = (
        "import sys, gptedge.cli; rc = gptedge.cli.main(['generate', sys.argv[1], 'Hi', '--temperature', '0', "
        "'--max-new-tokens', '4']); print('torch' in sys.modules, rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(runtime_bundle)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False 0"
