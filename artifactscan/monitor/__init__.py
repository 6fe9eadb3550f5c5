"""Watch artifact tokens emerge while a ViT trains: the public surface of the monitor.

    from artifactscan.monitor import ArtifactMonitor
    monitor = ArtifactMonitor(images="val_subset/", every=500, out="runs/my-vit/artifacts")
    for step, batch in enumerate(loader):
        ...                          # the training step
        monitor.step(model, step)    # measures when step % every == 0
    monitor.close()

A thin re-export module above the layers (as ``artifactscan.report``): the measurement is
:mod:`artifactscan.analysis.monitor`, the records :mod:`artifactscan.analysis.monitor_records`. Importing it imports
no training framework; the adapters for Lightning and the Hugging Face Trainer live beside it.
"""

from artifactscan.analysis.monitor import ArtifactMonitor, ArtifactsAboveThreshold
from artifactscan.analysis.monitor_records import MonitorHistory, MonitorLayer, MonitorUpdate, read_monitor
from artifactscan.analysis.monitor_setup import MonitorSetupError

__all__ = ["ArtifactMonitor", "ArtifactsAboveThreshold", "MonitorHistory", "MonitorLayer", "MonitorSetupError",
           "MonitorUpdate", "read_monitor"]
