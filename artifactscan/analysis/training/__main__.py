"""``python -m artifactscan.analysis.training --_worker CONFIG --out DIR``: one variant of ``train_reg``."""

from artifactscan.analysis.training.worker import main

if __name__ == "__main__":
    raise SystemExit(main())
