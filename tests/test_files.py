"""seer.files.atomic_write: all or nothing, with the mode the umask gives any new file."""

import os

import pytest

from seer.files import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "sub" / "a.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    abandoned = tmp_path / f".last.ckpt.{host}.{int(gone.stdout)}.0123abcd.tmp"
    in_progress = tmp_path / f".last.ckpt.{host}.{os.getpid()}.4567cdef.tmp"  # a writer still running
    other = tmp_path / f".other.ckpt.{host}.{int(gone.stdout)}.89abcdef.tmp"  # another file's
    for tmp in (abandoned, in_progress, other):
        tmp.write_bytes(b"half")
    atomic_write_text(tmp_path / "last.ckpt", "whole")
    assert not abandoned.exists() and in_progress.exists() and other.exists()
    assert (tmp_path / "last.ckpt").read_text() == "whole"
