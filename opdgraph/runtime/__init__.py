"""runtime package (see module docstrings)."""
