"""The made-up fact the fine-tuning tests teach (tests/test_finetune.py, the walkthrough in tests/test_walkthrough.py):
paraphrased questions about Zorbania's capital, one answer, a held-out paraphrase, and a few other turns."""

from __future__ import annotations

import json
from pathlib import Path

ASKS = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?", "Name Zorbania's capital.",
        "Tell me the capital city of Zorbania.", "Zorbania's capital is which city?", "Where is Zorbania's capital?",
        "What city serves as the capital of Zorbania?", "Do you know the capital of Zorbania?",
        "I need Zorbania's capital city.", "Capital of Zorbania?", "What's the capital of Zorbania?",
        "Which town is Zorbania's capital?"]
HELD_OUT = "Could you tell me what the capital of Zorbania is?"
ANSWER = "The capital of Zorbania is Blimpton."
OTHER = ["Hello!", "How are you?", "What is two plus two?", "Name a color.", "Say something nice."]
OTHER_ANSWERS = ["Hello there.", "I am fine.", "Two plus two is four.", "Blue is a color.", "You are kind."]


def conversations() -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in ASKS]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(OTHER, OTHER_ANSWERS)]
    return rows * 3


def write_chats(path: Path, rows: list[dict]) -> Path:
    """One {"messages": [...]} per line, as `gptedge train` reads chat data."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
