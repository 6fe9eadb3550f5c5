"""Layer 4, measurements: capture, scan, probes, attention, fix, compare and register training."""
