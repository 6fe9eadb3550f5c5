"""Layer 1, foundations: errors, the JSON results base, streaming statistics, thresholds, progress and ranks."""
