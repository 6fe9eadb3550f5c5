"""``artifactscan.probes``: the probe of artifact signatures, re-exported from :mod:`artifactscan.analysis.probes`."""

from artifactscan.analysis.probes import *  # noqa: F401,F403
from artifactscan.analysis.probes import __all__ as _probes_all
from artifactscan.render.outputs import write_probe_outputs
from artifactscan.render.text import render_probe

__all__ = [*_probes_all, "render_probe", "write_probe_outputs"]
