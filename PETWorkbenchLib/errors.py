"""Exceptions shared by every engine; their messages are shown to users as they are."""


class PETWorkbenchError(Exception):
    """Base class of all errors PETWorkbench reports to a user."""


class InputError(PETWorkbenchError, ValueError):
    """The input data or an argument is unusable; the message names the problem and the value."""


class ModelError(PETWorkbenchError):
    """Model weights are missing, corrupt or do not match their configuration."""


class Cancelled(PETWorkbenchError):
    """The user cancelled the operation."""


class EngineError(PETWorkbenchError):
    """An engine command running in the worker process failed; carries the engine's own message."""

    def __init__(self, message, kind="EngineError", log=""):
        super().__init__(message)
        self.kind = kind
        self.log = log
