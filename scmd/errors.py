"""Errors that end a run with one clear line on stderr instead of a traceback.

UsageError and DataError are bad input (exit status 2); RunFault is a fault during the run, such as a
loss that became NaN (exit status 1).
"""

import errno


class ScmdError(Exception):
    exit_code = 2


class UsageError(ScmdError):
    """A bad command-line argument, hparam or flag combination."""


class DataError(ScmdError):
    """A dataset, image or weights file that cannot be used as it is."""


class RunFault(ScmdError):
    """Something went wrong during training (NaN/inf loss, ...)."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    """The message of an error, also when it was re-raised from a DataLoader worker.

    torch re-raises worker exceptions as the same type with a message holding the worker's traceback;
    its last line is the original ``Type: message``.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message, or its type name when the message is empty."""
    lines = [ln for ln in one_line(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


# errno of a write that failed for want of room, in words the user can act on
DISK_FULL = {errno.ENOSPC: "disk full (ENOSPC: No space left on device)",
             errno.EDQUOT: "disk quota exceeded (EDQUOT)",
             errno.EFBIG: "file too large (EFBIG: over the file-size limit, see ulimit -f)"}


def write_cause(e: OSError) -> str:
    """Why a write failed: disk full, quota exceeded, file too large, or the system's words."""
    return DISK_FULL.get(e.errno) or e.strerror or str(e)
