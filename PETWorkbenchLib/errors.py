"""Exceptions shared by every engine; their messages are shown to users as they are.

Each class carries (``exit_code``) the code the ``petworkbench`` command ends with (README "Exit codes"):

====  ==============================================================================================
0     success
1     internal error (a bug): one line, the traceback only with ``--debug``
2     bad input: a file or an argument is unusable (:class:`InputError`)
3     model problem: weights missing, damaged or not matching their configuration (:class:`ModelError`)
4     the machine: disk full, read-only or unwritable folder, out of memory (:class:`ResourceError`)
5     a batch finished but some studies failed (the summary lists them)
130   cancelled (Ctrl-C, SIGTERM, the Cancel button)
====  ==============================================================================================
"""

import errno


class PETWorkbenchError(Exception):
    """Base class of all errors PETWorkbench reports to a user."""

    exit_code = 1


class InputError(PETWorkbenchError, ValueError):
    """The input data or an argument is unusable; the message names the problem and the value."""

    exit_code = 2


class ModelError(PETWorkbenchError):
    """Model weights are missing, corrupt or do not match their configuration."""

    exit_code = 3


class ResourceError(PETWorkbenchError):
    """The machine cannot do it: disk full, read-only or unwritable folder, out of memory."""

    exit_code = 4


class Cancelled(PETWorkbenchError):
    """The user cancelled the operation."""

    exit_code = 130


class EngineError(PETWorkbenchError):
    """An engine command running in the worker process failed; carries the engine's own message."""

    def __init__(self, message, kind="EngineError", log=""):
        super().__init__(message)
        self.kind = kind
        self.log = log


EXIT_BUG, EXIT_PARTIAL = 1, 5      # the two codes no exception class carries

_OS_REASONS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EIO: "an I/O error",
               errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "it is a folder",
               errno.EFBIG: "the file is larger than allowed (or the disk is full)"}
if hasattr(errno, "EDQUOT"):
    _OS_REASONS[errno.EDQUOT] = "the disk quota is exceeded"


def os_error_reason(err):
    """Short words for an OSError ("the disk is full"), without Python's '[Errno 28]' noise."""
    return _OS_REASONS.get(getattr(err, "errno", None)) or (getattr(err, "strerror", None) or str(err)).lower()


def is_out_of_memory(err):
    """True for MemoryError and torch's allocation failures (CPU and CUDA)."""
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text)


def as_user_error(err, action="running"):
    """Map an exception to a PETWorkbenchError with one clear line, or None when it is a bug (exit code 1)."""
    if isinstance(err, PETWorkbenchError):
        return err
    if isinstance(err, KeyboardInterrupt):
        return Cancelled("Cancelled (interrupted); files that were not finished were not written")
    if is_out_of_memory(err):
        return ResourceError(f"Out of memory while {action}: crop the volume, use a smaller patch batch, or a "
                             "machine with more memory")
    if isinstance(err, OSError) and getattr(err, "errno", None) in _OS_REASONS:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return ResourceError(f"Cannot write or read{where}: {os_error_reason(err)}")
    return None

