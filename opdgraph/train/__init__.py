"""train package (see module docstrings)."""
