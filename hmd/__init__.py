"""The `hmd` command line: one console script that dispatches to the packages."""
