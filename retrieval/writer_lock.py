"""``WriterLock``: one writer at a time for a directory that several processes, on one machine or
on several (a ReadWriteMany volume: NFS, EFS), write.

The lock is a POSIX record lock (``fcntl.lockf``, ``F_SETLK``) on a small file in that
directory. Why this kind:

- NFSv4 implements POSIX locks in its protocol (LOCK / LOCKU, held under the client's lease),
  so they hold between machines; EFS speaks NFSv4.1. ``flock`` on Linux NFS is emulated with
  the same POSIX locks, with less clear semantics; lock files written with O_EXCL and a PID
  would need leases and clocks of our own. SQLite takes the same kind of lock.
- The kernel drops a dead process's locks, SIGKILL included (on NFS the client sends the
  unlock); a machine that dies loses them when its NFSv4 lease runs out on the server. Nothing
  is left to expire by hand, and nothing ever blocks the next writer for good.

POSIX locks belong to a process, not to a file descriptor: two threads of one process do not
exclude each other, and closing any descriptor of the file drops the process's lock. So each
``WriterLock`` also holds a thread lock, keeps its one descriptor open, and a process makes one
``WriterLock`` per file. Waiting polls (``F_SETLK``, every ``POLL_SECONDS``) until a deadline:
every wait is bounded.

After taking the lock the holder writes who it is (``pid N on HOST since T``) into the file, so
that a writer that waits too long can say whom it waited for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: how often a waiting writer tries the lock again
POLL_SECONDS = 0.05


class LockTimeout(TimeoutError):
    """The lock was not free within the time given; ``holder`` says who had it, if known."""

    def __init__(self, path: Path, seconds: float, holder: str) -> None:
        super().__init__(f"{path} stayed locked for {seconds:g} s (held by {holder})")
        self.path, self.seconds, self.holder = path, seconds, holder


class WriterLock:
    """An exclusive lock on ``path`` (created if missing), between threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._thread = threading.Lock()
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the lock within ``timeout`` seconds (0: one try); False if it stayed taken."""
        deadline = time.monotonic() + timeout
        if not self._thread.acquire(timeout=max(timeout, 0.0)):
            return False
        try:
            fd = self._open()
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                left = deadline - time.monotonic()
                if left <= 0:
                    self._thread.release()
                    return False
                time.sleep(min(POLL_SECONDS, left))
            self._sign(fd)
            return True
        except BaseException:
            if self._thread.locked():
                self._thread.release()
            raise

    def release(self) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: released but never acquired")
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """``with lock.hold(30):`` the lock for the block; LockTimeout if it stays taken."""
        if not self.acquire(timeout):
            raise LockTimeout(self.path, timeout, self.holder())
        try:
            yield
        finally:
            self.release()

    def holder(self) -> str:
        """Who took the lock last, as the holder wrote it ("unknown" if it did not)."""
        try:
            if self._fd is not None:  # never open and close another descriptor of the file
                # here: closing it would drop a lock another thread of this process holds
                text = os.pread(self._fd, 512, 0)
            else:
                text = self.path.read_bytes()[:512]
        except OSError:
            return "unknown"
        return text.decode(errors="replace").strip() or "unknown"

    def close(self) -> None:
        """Close the file, unless a thread holds or waits for the lock (then it stays open:
        closing would drop the lock under that thread)."""
        if not self._thread.acquire(timeout=0):
            return
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            self._thread.release()

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self._fd

    @staticmethod
    def _sign(fd: int) -> None:
        """Write who holds the lock (best effort: the lock is what counts, not the text)."""
        text = f"pid {os.getpid()} on {socket.gethostname()} since " \
               f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text, 0)
        except OSError:
            pass


#: file system types whose files other machines write too (as /proc/self/mounts names them;
#: EFS mounts as nfs4)
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
                                 "fuse.glusterfs", "lustre", "gpfs", "fuse.sshfs", "9p"})


def network_filesystem(path: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the network file system ``path`` lies on (``nfs4``...), None for a local
    one or where the mount table cannot be read."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the deepest mount holding the path
            best, kind = point, fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None
