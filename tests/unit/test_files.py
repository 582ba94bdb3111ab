"""ingest.files.write_atomic: all or nothing, unchanged content is not rewritten, owner kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingest.files import write_atomic


def test_writes_then_reports_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert write_atomic(target, "a\n", 0o640) is True
    assert target.read_text() == "a\n" and target.stat().st_mode & 0o777 == 0o640
    inode = target.stat().st_ino
    assert write_atomic(target, "a\n", 0o640) is False
    assert target.stat().st_ino == inode  # not rewritten
    assert write_atomic(target, "a\n", 0o600) is True  # a mode change alone is a change
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left behind


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_replacing_keeps_owner_and_group(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("old\n")
    os.chown(target, 0, 65534)  # root:nogroup, like root:mosquitto on a host
    assert write_atomic(target, "new\n", 0o640) is True
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 65534, 0o640)
    assert target.read_text() == "new\n"
