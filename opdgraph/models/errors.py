"""The one error type model loading raises, so callers (CLI, runtime) can report bad model inputs cleanly."""

from opdgraph.errors import OpdgraphError


class ModelLoadError(OpdgraphError):
    """A model source (directory, file, config dict, tokenizer) cannot be loaded; the message says what and where."""
