"""gptedge: a GPT from PyTorch to a laptop (train -> export -> quantize -> run).

The import package stays light on purpose: `import gptedge` pulls in no numpy,
no onnxruntime and no torch, so the CLI starts fast and a desktop app only pays
for the layer it uses (`gptedge.runtime` needs numpy + onnxruntime + tokenizers).
"""

__version__ = "0.1.0"

from gptedge.errors import GptEdgeError  # noqa: E402  (pure Python, no dependencies)

__all__ = ["GptEdgeError", "__version__"]
