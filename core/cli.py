"""`gptedge` command line: one dispatcher, subcommands imported lazily.

Only the chosen subcommand's module is imported, and those modules import their
heavy dependencies (torch, onnx, onnxruntime) inside their `run` functions, so
`gptedge --help` and `gptedge generate --help` start in a fraction of a second
and the runtime commands never import torch.

Each subcommand module provides `add_arguments(parser, command)` and
`run(args, command) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from gptedge import __version__
from gptedge.errors import GptEdgeError
from gptedge.text import configure_streams

# command -> (module, one-line help). Declared once; `--help` reads it without importing anything.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gptedge.train.cli", "train or fine-tune a GPT (default data: the Python standard library's source)"),
    "export": ("gptedge.export.cli",
               "export a gptedge checkpoint, a local Hugging Face folder or a GGUF file to a verified bundle"),
    "quantize": ("gptedge.quantize.cli", "quantize a bundle to INT8/INT4, gated by a measured quality check"),
    "generate": ("gptedge.runtime.cli", "generate text from a prompt, streamed to the terminal"),
    "chat": ("gptedge.runtime.cli", "multi-turn chat with history truncated to the context"),
    "next": ("gptedge.runtime.cli", "table of the most likely next tokens with probabilities"),
    "eval": ("gptedge.runtime.cli", "perplexity of a bundle on a text file"),
    "embed": ("gptedge.runtime.cli", "vectors of texts from an embedding bundle, as JSON lines"),
    "info": ("gptedge.runtime.cli", "describe a bundle: architecture, dtype, quantization, quality report, sizes"),
    "bench": ("gptedge.runtime.cli", "measure load time, time to first token and decode tokens/s of a bundle"),
    "serve": ("gptedge.runtime.serve.cli",
              "serve bundles over an OpenAI-compatible HTTP API with a chat page (extra: serve)"),
    "demo": ("gptedge.demo", "train -> export -> quantize -> generate on the embedded default corpus, in one folder"),
}


# A module that only an optional install brings -> what to install, so a missing extra is one line, not a traceback.
EXTRAS: dict[str, str] = {
    "torch": "pip install torch==2.13.0 (or the build for your machine), then pip install 'gptedge[all]'",
    "onnx": "pip install 'gptedge[quantize]' (or 'gptedge[all]' to train and export too)",
    "onnx_ir": "pip install 'gptedge[quantize]'",
    "onnxscript": "pip install 'gptedge[export]'",
    "safetensors": "pip install 'gptedge[export]'",
    "gguf": "pip install 'gptedge[export]'",
    "tqdm": "pip install 'gptedge[all]'",
    "jinja2": "pip install 'gptedge[chat]'",
    "starlette": "pip install 'gptedge[serve]'",
    "uvicorn": "pip install 'gptedge[serve]'",
    "llguidance": "pip install 'gptedge[serve]'",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The install hint for a module an optional extra provides, or None for anything else (a real bug)."""
    return EXTRAS.get((exc.name or "").split(".")[0])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it tells something: not None/False, and not already in the help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(c) for c in COMMANDS)
    listing = "\n".join(f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="gptedge",
        description="Take a GPT from PyTorch to a laptop: train, export to ONNX, quantize, run.",
        epilog=f"commands:\n{listing}\n\nRun `gptedge COMMAND --help` for the options of one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gptedge {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_streams()  # UTF-8 into pipes and files whatever the locale (gptedge.text)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top.parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.error(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    module_name, help_ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(
            prog=f"gptedge {command}", description=help_[0].upper() + help_[1:] + ".",
            formatter_class=_HelpFormatter,
        )
        module.add_arguments(parser, command)
        args = parser.parse_args(rest)
        return int(module.run(args, command) or 0)
    except GptEdgeError as exc:
        print(f"gptedge {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc)
        if hint is None:
            raise
        print(f"gptedge {command}: error: this command needs {exc.name}, which is not installed: {hint}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptedge {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gptedge info B | head -1`: the reader left; stop quietly, like any Unix tool
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
