"""File writing shared by the CLIs and host scripts (provisioning exports, credentials, backups state)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str, mode: int = 0o600) -> bool:
    """Write ``text`` to ``path`` with ``mode`` via temp file + fsync + rename; a reader never sees a
    half-written file. Returns False (and leaves the file untouched) when the content is the same, so
    a caller can reload a broker only when something changed.

    A replaced file keeps its owner and group: the deploy gives Mosquitto's password file to group
    mosquitto, and a root cron/timer re-export must not turn it into root:root (unreadable by the
    broker at its next reload)."""
    path = Path(path)
    owner: tuple[int, int] | None = None
    try:
        st = path.stat()
        if path.read_text(encoding="utf-8") == text and (st.st_mode & 0o777) == mode:
            return False
        owner = (st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True
