"""``python -m artifactscan.analysis.training --_worker CONFIG --out DIR``: one variant of ``train_reg``."""

from artifactscan.analysis.training.orchestration import release_inherited_sigint
from artifactscan.analysis.training.worker import main

if __name__ == "__main__":
    release_inherited_sigint()  # the process's own signal state: here, not in main(), which a test may call
    raise SystemExit(main())
