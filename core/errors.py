"""One error hierarchy for every layer, so callers (and the CLI) catch one base class.

Every message says what went wrong *and what to do about it*; the CLI prints
`str(error)` as one line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class GptEdgeError(Exception):
    """Base class of every error gptedge raises on purpose."""

    exit_code = 2


class UsageError(GptEdgeError, ValueError):
    """An argument or option has a value gptedge cannot use (bad sampling value, empty prompt...).

    `field` names the argument the check is about (a SamplingParams field, "threads", "truncate", ...), set where
    the check is made: the server answers with it as the OpenAI `param` and the command line names its option,
    whatever the message's wording.
    """

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DataError(GptEdgeError):
    """Training data is missing, empty, unreadable or too small for the requested config."""


class CheckpointError(GptEdgeError):
    """A checkpoint or Hugging Face folder is missing, unsafe, incompatible or of an unknown kind."""


class BundleError(GptEdgeError):
    """A bundle is missing, malformed, tampered with, from an unknown format version, or unsafe."""


class ExportError(GptEdgeError):
    """Export failed, including failing its own verification against PyTorch."""


class QuantizeError(GptEdgeError):
    """Quantization failed or did not pass its quality gate."""


class ProviderError(GptEdgeError):
    """An execution provider was asked for that cannot run this bundle."""


class ContextLengthError(UsageError):
    """A request needs more positions than the model's context allows."""


class OutputExistsError(GptEdgeError):
    """The output path exists and --force was not given."""


class OutputBusyError(GptEdgeError):
    """Another process is writing the same output folder right now."""


class TrainingDiverged(GptEdgeError):
    """The training loss stopped being a finite number; nothing from the diverged steps is saved."""
