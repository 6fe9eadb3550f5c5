"""The models shipped inside the package: ``demo`` / ``demo-reg4`` (a ViT-S/16 pair trained on the built-in synthetic
data, without and with 4 registers) and the calibration ``phantom``, all in ``artifactscan/weights/``.

They are self-describing checkpoints (:mod:`artifactscan.models.checkpoint`), so the loader builds them from their
own metadata; this module only makes their folder known by name.
"""

from __future__ import annotations

from pathlib import Path

from artifactscan.models.registry import register_weights_folder

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

register_weights_folder(WEIGHTS_DIR)
