"""Atomic writes: a file is written under a temporary name in its folder, then renamed.

A crash or a full disk therefore never leaves a half-written output and never destroys
an earlier complete file of the same name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile

from ..errors import OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    ``OSError`` (permission, disk full) is turned into :class:`OutputError` naming ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-",
                                   suffix=suffix if suffix is not None else
                                   os.path.splitext(path)[1], dir=folder)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({_why(e)})") from None
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the usual permissions (umask)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"{path}: cannot write ({_why(e)})") from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def _remove(p):
    with contextlib.suppress(OSError):
        os.remove(p)


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "disk full"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return e.strerror or str(e)
