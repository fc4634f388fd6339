"""The `hmd` command line: one console script that dispatches to the packages."""

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it (tool.setuptools.dynamic)
