"""Exceptions raised by the library.

Library code raises these and never exits the process; only the CLI turns them into one red line and a
non-zero exit code (``--debug`` shows the traceback). Each message says what went wrong *and* what to do.

Exit codes (docs/reliability.md): 0 done; 1 a user error (every class here unless it says otherwise); 2 an internal
error (any other exception: a bug); 3 a gate failed (:class:`GateFailedError`); 130 interrupted
(:class:`RunInterrupted`).
"""

from __future__ import annotations


class ArtifactScanError(Exception):
    """Base class: an expected failure caused by the user's input or environment."""

    exit_code = 1


class InputError(ArtifactScanError):
    """A path, image folder or option value that cannot be used."""


class ModelLoadError(ArtifactScanError):
    """A model name, checkpoint or architecture that cannot be turned into a ViT."""


class NotAViTError(ModelLoadError):
    """The model loaded but has no transformer blocks / prefix tokens artifactscan can hook."""


class CheckpointMismatchError(ModelLoadError):
    """A state dict whose keys or shapes do not match the requested architecture."""


class UntrustedCheckpointError(ModelLoadError):
    """A pickled module that would need arbitrary code execution to load."""


class OfflineError(ModelLoadError):
    """Pretrained weights were requested but the hub cannot be reached."""


class TrainingError(ArtifactScanError):
    """A training configuration or resume folder that cannot be used."""


class OutputLockedError(InputError):
    """An output folder another artifactscan run is writing to (its lock is held)."""


class NonFiniteError(ArtifactScanError):
    """NaN or Inf weights, or non-finite token norms: the numbers would be meaningless (``--allow-nonfinite``)."""


class CheckpointMetadataError(ModelLoadError):
    """A checkpoint whose artifactscan metadata is malformed: ``checkpoint metadata invalid: <field>: <why>``."""

    def __init__(self, field: str, why: str, where: str = ""):
        self.field, self.why = field, why
        super().__init__(f"{where + ': ' if where else ''}checkpoint metadata invalid: {field}: {why}")


class ResourceError(ArtifactScanError):
    """A run that would not fit (e.g. the activation memory of one batch exceeds the memory available)."""


class GateFailedError(ArtifactScanError):
    """A quality gate the user asked for failed (``norms --fail-above``): exit code 3, not a user error."""

    exit_code = 3


class RunInterrupted(ArtifactScanError):
    """The run was stopped (SIGINT / SIGTERM) after saving what can be resumed: exit code 130."""

    exit_code = 130
