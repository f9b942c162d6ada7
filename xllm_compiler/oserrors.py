"""Which operating-system errors are the user's to fix, and how to say so in one line.

A read-only folder, a full disk or a file where a folder should be are not our bugs: the CLI exits 2
naming the path instead of reporting an internal error. safetensors reports the same errors as its own
exception type with the errno in the text; ``as_os_error`` turns those back into an OSError.
"""

from __future__ import annotations

import errno
import os
import re

#: An OSError with one of these errnos and a file name is the user's to fix. ENOENT is not among them:
#: every path a user names is checked by name first (ConfigError, ArtifactError, OptionsError), so a
#: missing file that gets this far is one we expected to exist, which is our bug.
USER_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)
#: Out of space: the user's to fix whichever file was being written.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_SAFETENSORS_ERRNO = re.compile(r"\(os error (\d+)\)")
_SAFETENSORS_PATH = re.compile(r'at path "([^"]*)"')


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` if it is an OSError; the OSError inside a safetensors I/O error; else None."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ != "SafetensorError":
        return None
    code = _SAFETENSORS_ERRNO.search(str(exc))
    if code is None:
        return None
    path = _SAFETENSORS_PATH.search(str(exc))
    number = int(code.group(1))
    return OSError(number, os.strerror(number), path.group(1) if path else None)


def user_os_error(exc: BaseException) -> str | None:
    """The one-line message for an OSError the user can fix, else None (it stays an internal error)."""
    error = as_os_error(exc)
    if error is None or error.errno not in USER_ERRNOS:
        return None
    if error.filename is not None:
        return f"cannot access {error.filename}: {error.strerror}"
    # Without a path only a full disk is still clearly the user's.
    return error.strerror if error.errno in NO_SPACE_ERRNOS else None
