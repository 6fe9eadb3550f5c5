"""The package version, in the layer everything can import from."""

__version__ = "0.3.0.dev0"  # unreleased: CHANGELOG.md; results record it (artifactscan_version)
