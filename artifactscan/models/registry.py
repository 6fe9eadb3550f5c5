"""What the loader can build beyond timm: architectures, checkpoint extensions and shipped weights register here.

The loader (:mod:`artifactscan.models.loading`) knows nothing about the phantom, the demo weights or the test-time
register; they register themselves in this module when imported, and ``artifactscan/models/__init__.py`` imports
them, so they are registered before anything in ``artifactscan.models`` is used, whatever was imported first.
Later loaders add themselves the same way.

- **Architectures**: a name and a builder ``(**arch_kwargs) -> nn.Module`` for models timm does not define.
- **Checkpoint extensions**: a key of a checkpoint's ``meta.extra`` and a function ``(loaded, data) -> None`` that
  installs what the key records on the freshly loaded model (e.g. ``test_time_register``).
- **Weights folders**: folders of ``NAME.safetensors`` files that load by ``NAME`` (``demo``, ``phantom`` ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from artifactscan.core.errors import ModelLoadError

ArchitectureBuilder = Callable[..., Any]
CheckpointExtension = Callable[[Any, Any], None]

_architectures: dict[str, ArchitectureBuilder] = {}
_extensions: dict[str, CheckpointExtension] = {}
_weights_folders: list[Path] = []


def register_architecture(name: str, builder: ArchitectureBuilder) -> None:
    """Make ``name`` buildable by the loader (a checkpoint whose metadata names this ``arch``)."""
    _architectures[name] = builder


def architecture_builder(name: str) -> ArchitectureBuilder | None:
    """The registered builder for ``name``, or ``None`` when timm should build it."""
    return _architectures.get(name)


def registered_architectures() -> list[str]:
    return sorted(_architectures)


def register_checkpoint_extension(key: str, install: CheckpointExtension) -> None:
    """Run ``install(loaded, meta.extra[key])`` on every checkpoint loaded with ``key`` in its metadata."""
    _extensions[key] = install


def install_checkpoint_extensions(loaded: Any, extra: dict[str, Any]) -> None:
    """Apply every registered extension a checkpoint's ``meta.extra`` records, in registration order."""
    for key, install in _extensions.items():
        if key in extra:
            install(loaded, extra[key])


def unknown_artifactscan_arch(name: str) -> ModelLoadError:
    return ModelLoadError(f"architecture {name!r} looks like an artifactscan one but none is registered under that "
                          f"name (known: {', '.join(registered_architectures()) or 'none'})")


def register_weights_folder(folder: Path) -> None:
    """Every ``NAME.safetensors`` in ``folder`` loads by ``NAME``; earlier folders win on a clash."""
    if folder not in _weights_folders:
        _weights_folders.append(folder)


def builtin_weights() -> dict[str, Path]:
    """``NAME -> file`` over the registered weights folders, sorted by file name within each folder."""
    found: dict[str, Path] = {}
    for folder in _weights_folders:
        for path in sorted(folder.glob("*.safetensors")):
            found.setdefault(path.name.removesuffix(".safetensors"), path)
    return found
