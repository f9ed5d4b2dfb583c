"""Robustness at the edges (issue 15): atomic writes and special files, damaged run folders,
divergence, one writer per run folder, crafted files, determinism across BLAS thread counts, CLI edges."""

import os
import stat
import subprocess
import sys
import threading

import pytest

from kto_np import files

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX special files")


# ----------------------------------------------------------------------------------------------
# item 3: atomic writes never replace what is not a regular file


@POSIX
def test_atomic_write_writes_through_a_fifo_and_keeps_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []

    def read():
        with open(fifo, "rb") as stream:
            received.append(stream.read())

    reader = threading.Thread(target=read, daemon=True)  # (blocked for ever if the FIFO were replaced)
    reader.start()
    files.write_text(fifo, "hello\n")
    reader.join(timeout=10)
    assert received == [b"hello\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


@POSIX
def test_atomic_write_writes_through_a_character_device(tmp_path):
    device = tmp_path / "fakenull"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a second /dev/null
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here ({exc})")
    files.write_json(device, {"a": 1})
    with files.atomic_write(device, "wb") as f:
        f.write(b"x" * 1000)
    assert stat.S_ISCHR(os.lstat(device).st_mode), "the device node was replaced by a regular file"
    assert sorted(os.listdir(tmp_path)) == ["fakenull"]


@POSIX
def test_atomic_write_follows_a_symlink_and_refuses_a_socket(tmp_path):
    import socket  # noqa: PLC0415

    target = tmp_path / "target.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    files.write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(ValueError, match="neither a regular file"):
            files.write_text(sock_path, "x")
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_atomic_write_removes_stale_temporaries_of_dead_processes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs
    stale = tmp_path / f".out.json.kto_np.{child.pid}.abcd1234.tmp"
    stale.write_text("half a file")
    alive = tmp_path / f".other.kto_np.{os.getpid()}.abcd1234.tmp"  # ours, still being written
    alive.write_text("in progress")
    foreign = tmp_path / f".notes.{child.pid}.backup.tmp"  # not our naming
    foreign.write_text("someone's")
    files.write_json(tmp_path / "out.json", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["out.json", alive.name, foreign.name])
