"""The one family of user-facing errors: every problem with what a user gave us is an `OpdgraphError`.

Config files, model files, data rows, run directories, checkpoints, devices and tokenizers each have a subclass, and
every message says where (`file:line`, `file:row N` or a path) and what to do. The CLI prints an OpdgraphError in
plain text and exits 2 (`--debug` shows the traceback); any other exception is a bug of ours and keeps its
traceback. Torch-free: the compiler core raises these too.

They subclass ValueError so code that validated with ValueError keeps working while it moves over.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class OpdgraphError(ValueError):
    """A problem with the user's input or environment; str() is the whole message a person reads."""


class RunDirectoryError(OpdgraphError):
    """A run directory cannot be used as asked (already holds a run, locked, missing, not a directory)."""


class CheckpointError(OpdgraphError):
    """A checkpoint is missing, damaged or does not match the run that resumes it."""


class DeviceError(OpdgraphError):
    """The requested device or backend is not available on this machine."""


class ReporterError(OpdgraphError):
    """An experiment tracker of `[log] report_to` cannot be used (its package is missing, or it refused to start)."""


class TrainingStopped(OpdgraphError):
    """Training cannot go on (e.g. too many consecutive skipped steps); the message says why and what to try."""
