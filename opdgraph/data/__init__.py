"""data package (see module docstrings)."""
