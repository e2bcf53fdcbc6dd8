"""Atomic file writes (temp file in the target's directory + os.replace), created with the user's umask.

One helper for every output a run writes (results.json, config.yaml, report.md, PNGs, GIFs, checkpoints,
caches): a same-directory rename is atomic on POSIX, so a reader or a crash never sees a half-written file
under the real name. tempfile.mkstemp creates its file 0600 whatever the umask is (it exists for private
temp files), and os.replace keeps that mode, so each temp file is chmod'ed to what open() would have given
(0666 & ~umask): a teammate or TA on a shared file system can read the outputs when the umask allows it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7); elsewhere the
    classic set-and-restore (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open(path, "w") creates: 0666 minus the umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[str]:
    """Yield a temp file name next to `path` (mode 0666 & ~umask); after the block it replaces `path`
    atomically, on an exception it is removed and `path` is untouched. fsync=True flushes the data to disk
    before the rename (checkpoints: survive a power loss, not only a kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=path.suffix)
    try:
        try:
            os.fchmod(fd, file_mode())
        finally:
            os.close(fd)
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
