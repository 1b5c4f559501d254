"""The package version (one place; the package, manifests and reports read it)."""

__version__ = "0.1.0"
