"""Copy the benchmark tables from benchmarks/results/*.md into README.md and the pages of docs/.

    python scripts/benchmark_tables.py            (rewrite the marked blocks)
    python scripts/benchmark_tables.py --check    (exit 1 if a block differs from its results file)

A block is the text between `<!-- results: NAME.md -->` and `<!-- end results -->`; NAME.md is a file a benchmark
script wrote. Nothing in a block is typed by hand, so a number in the docs is always one a script measured
(tests/test_docs.py runs --check).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+\.md) -->\n)(?P<body>.*?)(<!-- end results -->)", re.S)


def render(text: str) -> str:
    def fill(match: re.Match) -> str:
        table = (RESULTS / match["name"]).read_text(encoding="utf-8").strip() + "\n"
        return match[1] + table + match[4]

    return BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    stale = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(path)
            if "--check" not in argv:
                path.write_text(new, encoding="utf-8")
    if stale and "--check" in argv:
        print("stale benchmark tables (run python scripts/benchmark_tables.py): "
              + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
