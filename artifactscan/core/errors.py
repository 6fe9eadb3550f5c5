"""Exceptions raised by the library.

Library code raises these and never exits the process; only ``cli.py`` turns them into one red line and a
non-zero exit code (``--debug`` shows the traceback). Each message says what went wrong *and* what to do.
"""

from __future__ import annotations


class ArtifactScanError(Exception):
    """Base class: an expected failure caused by the user's input or environment."""


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
