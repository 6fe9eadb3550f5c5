"""Training library behind ``artifactscan train-reg``: train the same ViT with and without register tokens.

Why this exists: the paper's fix for high-norm artifact tokens is a handful of extra learnable "register" tokens
(timm's ``reg_tokens=``: inserted after CLS, no position embedding, discarded at the output). The only convincing way
to show what registers change is a *controlled* pair: the same architecture, the same seed, the same initial weights
for every shared parameter, the same data in the same order — the register tokens are the only difference. Then
``artifactscan norms`` scans both and the difference in their token-norm statistics is attributable to registers.

Design points (each one exists to keep that comparison honest or the run recoverable):

* **Identical init.** The register model copies every shared parameter from a freshly built 0-register model made
  from the same seed, so the two models start from the same point (only ``reg_token`` is new).
* **Data order from the step number.** Batch ``k`` is a pure function of ``(seed, k)``; the sampler keeps no state,
  which makes a resumed run see exactly the batches an uninterrupted run would, and lets DDP ranks shard a global
  batch without a ``DistributedSampler`` object (rank ``r`` takes every ``world``-th item of the global batch).
* **Resume = bit-identical on CPU.** ``last.pt`` stores model, optimiser, scheduler, RNG states (as tensors, so the
  file loads with ``weights_only=True``) and the step; resuming a killed run ends at the same weights.
* **Self-describing checkpoints.** Every checkpoint is written with :func:`artifactscan.models.checkpoint.save_checkpoint`
  (arch, arch_kwargs incl. ``reg_tokens``, data_config, step), so later commands need no ``--arch``.
* **Side by side on CPU.** On a CPU with ≥ 2 cores, the variants of ``train_reg`` run as parallel single-threaded
  processes: small ViTs scale badly across threads, so two 1-thread runs use two cores best.

Public API: :class:`TrainConfig`, :data:`PRESETS`, :func:`get_preset`, :func:`parse_registers`, :func:`build_model`,
:func:`train_model`, :func:`train_reg`, :func:`resume`, :func:`evaluate_checkpoint`; results are
:class:`TrainResult` and :class:`TrainRegResult`.

:mod:`.config` (what a run computes), :mod:`.model`, :mod:`.data`, :mod:`.distributed`, :mod:`.checkpointing`,
:mod:`.loop` (one model) and :mod:`.orchestration` (``train_reg``: the variants side by side); :mod:`.worker` is the
child-process entry point.
"""

from artifactscan.analysis.training.checkpointing import export_half
from artifactscan.analysis.training.config import (
    PRESETS,
    STEPS_ENV,
    TrainConfig,
    get_preset,
    parse_registers,
    resolve_config,
    steps_from_environment,
)
from artifactscan.analysis.training.data import ImageFolderData, StepBatchSampler, build_datasets, scan_image_folder
from artifactscan.analysis.training.loop import TrainResult, evaluate, train_model
from artifactscan.analysis.training.model import build_model, lr_factor
from artifactscan.analysis.training.orchestration import (
    RegVariant,
    TrainRegResult,
    evaluate_checkpoint,
    resume,
    train_reg,
)

__all__ = ["ImageFolderData", "PRESETS", "RegVariant", "STEPS_ENV", "StepBatchSampler", "TrainConfig",
           "TrainRegResult", "TrainResult", "build_datasets", "build_model", "evaluate", "evaluate_checkpoint",
           "export_half", "get_preset", "lr_factor", "parse_registers", "resolve_config", "resume",
           "scan_image_folder", "steps_from_environment", "train_model", "train_reg"]
