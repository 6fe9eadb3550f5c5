"""Start-up and shutdown cost of a process that imports torch and timm: the cyclic garbage collector's share.

Why this module exists: on a scan of a few hundred images the fixed cost of the process, not the images, decides the
wall time, and much of that fixed cost is Python's cyclic garbage collector walking objects that are never garbage.
Measured on the 2-core CI machine (whole processes, ``python -c``; docs/data-path.md):

- ``import timm`` builds ~10^6 objects (torch, torchvision, ``torch._dynamo``, sympy); the collections triggered
  while they are made cost ~0.4 s of its ~2.4 s.
- At interpreter exit the last collections walk them all again: ~0.6 s (``import timm`` then exit: 3.0 s; with
  :func:`gc.freeze` before exit: 2.4 s).

So the command line runs a *start-up phase*: the collector is off from the start of a command until its model is
loaded (:func:`end_startup`, which the command line registers in ``models.loading.after_load`` and
``inputs.sources.in_decoding_workers``: the library only calls back), then everything made so far is frozen out of
its way (:func:`gc.freeze`: the permanent generation, never walked again) and it runs as usual; when the command is
done the heap is frozen again before exit. The library on its own never does either: frozen objects are never
collected, which a notebook must not inherit, so outside the command line nothing calls this module.
"""

from __future__ import annotations

import gc

_startup_phase = False  # True from begin_startup() to end_startup(): the command line's start-up, collector off


def begin_startup() -> None:
    """The command line, before its imports: collector off until :func:`end_startup`."""
    global _startup_phase
    _startup_phase = True
    gc.disable()


def end_startup() -> None:
    """End of the start-up phase, if one is running: freeze what start-up made, collector back on. Called once the
    model is loaded (imports and model construction are start-up) and, to be sure, when the command ends."""
    global _startup_phase
    if _startup_phase:
        _startup_phase = False
        gc.freeze()
        gc.enable()


def freeze_heap() -> None:
    """Move every object the collector tracks into its permanent generation, so that interpreter shutdown does not
    walk them again. For the end of the ``artifactscan`` process only, once its command has finished."""
    gc.freeze()
