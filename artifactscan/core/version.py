"""The package version, in the layer everything can import from."""

__version__ = "0.1.0"
