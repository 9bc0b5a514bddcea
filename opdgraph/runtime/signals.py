"""SIGINT (Ctrl-C) and SIGTERM during `opdgraph run`: stop at the end of the current training step.

While the run starts (loading models, the eval before training) there is nothing to save, so a signal stops it at
once: `Interrupted` (a KeyboardInterrupt) is raised where the signal lands, the run directory's lock is released on
the way out and the CLI exits 128 + signal (130 for SIGINT, 143 for SIGTERM) without a traceback.

During training (`graceful` set by the run loop) the first signal only records a request: the loop finishes the
step, writes its records and a checkpoint (`[checkpoint] on_signal`), prints the command that resumes and returns
with `stopped_by` set. A second signal stops at once (Interrupted): a checkpoint being written then removes its
temporary folder, and anything a kill leaves is cleaned up at the next start.

Under torchrun each rank sends its requests with the step's loss in the one all-reduce every step already does, so
every rank stops after the same step (opdgraph.runtime.run).
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal that stops the run at once; `signum` gives the exit code (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequests:
    """Installed for the whole run (`with StopRequests() as stops:`); the run loop reads `signum`."""

    def __init__(self):
        self.signum: int | None = None
        self.graceful = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def flags(self) -> list[float]:
        """One 0/1 entry per signal in SIGNALS, to be summed over ranks."""
        return [1.0 if self.signum == signum else 0.0 for signum in SIGNALS]

    def _handle(self, signum: int, frame) -> None:
        if not self.graceful or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        # os.write, not print: the handler may interrupt a print to the same stream, which print cannot re-enter.
        os.write(2, f"\nopdgraph: {signal_name(signum)} received: stopping at the end of this training step "
                    f"(send it again to stop at once)\n".encode())


def chosen_signal(own: int | None, summed_flags: list[float]) -> int | None:
    """The signal a rank stops for: its own, else one another rank saw (SIGTERM first), else None."""
    if own is not None:
        return own
    seen = [signum for signum, count in zip(SIGNALS, summed_flags) if count > 0]
    return max(seen) if seen else None
