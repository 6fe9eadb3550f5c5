"""Layer 5, presentation: terminal text, figures, the HTML report and a measurement's output files."""
