"""The defaults every command and every library entry point share: one table, read by both.

The CLI's options and the library's keyword arguments take their defaults from here (as torch-fidelity's flags and
``calculate_metrics`` read one ``DEFAULTS``), so ``artifactscan norms`` and ``artifactscan.scan()`` never disagree.
"""

from __future__ import annotations

#: Images per forward pass, for every command. One value: 64 for probe and compare had no measured reason, and a
#: measurement does not depend on it (results are batch-size independent; only memory and speed change).
BATCH_SIZE = 32

#: The outlier rule: the separated-group rule per layer (core/thresholds.py), or a number.
THRESHOLD = "auto"

#: DataLoader processes decoding images ('auto': half the cores on the CPU, all but one with CUDA, at most 8).
WORKERS = "auto"

#: Where the model runs ('auto': CUDA when available).
DEVICE = "auto"

#: Images that keep a per-image map for the figures (norm maps, attention maps, discovery panels).
MAPS = 6

#: Register neurons a test-time register moves (``fix --top-k``, ``discover --compare fix --top-k``).
TOP_K = 4

#: The block a single-block measurement reads (probe, discover): the last.
BLOCK = -1
