"""What users import keeps working: the top-level functions and the documented module paths."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import inspect
from artifactscan.fix import fix as fix_from_module
from artifactscan.compare import compare as compare_from_module, scan_run
from artifactscan.probes import probe as probe_from_module
from artifactscan.report import write_scan_outputs
from artifactscan.thresholds import AutoRule, auto_threshold
from artifactscan import plots
import artifactscan.thresholds
from artifactscan import compare, fix, load_model, probe, scan
assert all(inspect.isfunction(f) for f in (compare, fix, load_model, probe, scan, scan_run, write_scan_outputs))
assert fix is fix_from_module and compare is compare_from_module and probe is probe_from_module
assert callable(plots.save_scan_figures) and callable(plots.plot_compare)
print("ok")
"""


def test_documented_imports_in_a_fresh_interpreter():
    """Importing the documented modules first must not turn `artifactscan.fix` / `.compare` back into modules."""
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
