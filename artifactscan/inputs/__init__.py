"""Layer 2, inputs: image files, the built-in synthetic data set, image sources and batching."""
