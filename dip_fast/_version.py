"""The package version, in one place (read by setup.py and pyproject.toml)."""

__version__ = "0.1.0"
