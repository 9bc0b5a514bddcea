"""rollout package (see module docstrings)."""
