"""Progress reporting and cancellation for engine code.

Engine functions take ``progress(fraction, message)`` and ``cancel() -> bool`` callables; :class:`Reporter` wraps
both so that engine code calls one object::

    rep = Reporter(progress, cancel)
    for i, item in enumerate(items):
        rep(i / len(items), f"item {i}")      # raises Cancelled when cancel() is True
        ...
    sub = rep.sub(0.5, 1.0)                   # a reporter for the second half of the work
"""

from .errors import Cancelled

__all__ = ["Reporter", "Cancelled"]


class Reporter:
    def __init__(self, progress=None, cancel=None, start=0.0, end=1.0):
        if isinstance(progress, Reporter):
            cancel = cancel or progress._cancel
            start, end = progress._map(start), progress._map(end)
            progress = progress._progress
        self._progress = progress
        self._cancel = cancel
        self.start = float(start)
        self.end = float(end)

    def _map(self, fraction):
        fraction = min(max(float(fraction), 0.0), 1.0)
        return self.start + (self.end - self.start) * fraction

    def check(self):
        """Raise :class:`Cancelled` if the user asked to cancel."""
        if self._cancel is not None and self._cancel():
            raise Cancelled("Cancelled by the user")

    def __call__(self, fraction, message=""):
        self.check()
        if self._progress is not None:
            self._progress(self._map(fraction), message)

    def sub(self, start, end):
        """Reporter for the part [start, end] of this reporter's range."""
        return Reporter(self, start=start, end=end)
