"""One exception hierarchy for skrr-export.

User errors (bad plan, bad flag, bad model folder, missing dependency) exit with code 2, accuracy failures
with code 1, interruptions with 130. Anything else is a bug: the command line prints it as one line with
exit code 3, and its traceback with ``--debug``.
"""


class SkrrError(Exception):
    """Base of every error skrr-export raises on purpose."""

    exit_code = 3


class UserError(SkrrError):
    """The input is wrong; the message says what was expected, what was found and what to do."""

    exit_code = 2


class ArgumentError(UserError):
    """A command-line flag is malformed, out of range, or contradicts another."""


class PlanError(UserError):
    """A plan file is malformed or does not fit the model."""


class ModelError(UserError):
    """A model folder, checkpoint or config cannot be used."""


class MissingDependencyError(UserError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python module '{module}', which is not installed; "
            f"install it with: pip install 'skrr-export[{extra}]'"
        )


class ArtifactError(UserError):
    """An artifact on disk (ONNX, data file, engine, output folder) is missing or unusable."""


class AccuracyError(SkrrError):
    """Outputs do not match the reference within tolerance, or contain NaN/Inf."""

    exit_code = 1


class InvariantError(SkrrError):
    """A guarantee skrr-export makes about its own artifacts does not hold (a bug to report)."""

    exit_code = 3


class Interrupted(SkrrError):
    """Ctrl-C: the message says what was kept (a calibration checkpoint) and what was removed."""

    exit_code = 130
