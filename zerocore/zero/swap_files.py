"""The folder and file of one run's NVMe optimizer state: checked, reserved, locked, removed.

[Note: NVMe swap folder]
A run keeps its state in `nvme_path/zerocore/rank{r}/run-{uid}/state.bin` (uid: the engine's id, the same on
every rank and new for every ZeroOptimizer), so two runs sharing one nvme_path never touch each other's files.
- Before anything is written, the path must exist, be a writable folder, and have room for the whole file
  (statvfs); the error says how many bytes are needed and how many are free.
- The file is reserved in full at construction (posix_fallocate) and is the only file written (checksums
  are kept in memory), so a disk that others fill up later cannot make a step fail for want of space. A file
  system that cannot keep a reservation (thin provisioning, copy-on-write) or a disk that fails still fails
  writes, which the swapper survives ([Note: NVMe optimizer state]).
- The run holds an exclusive flock on `run-{uid}/lock` for its whole life (taken before the folder gets that
  name). A `run-` folder under any `rank*` folder whose lock can be taken, or that has none, belongs to a run
  that died (the kernel drops a dead process's locks): the next start removes it (every rank looks at every
  rank's folders, so a run at a smaller world size cleans up after a larger one), and never reads it.
- Folders and files are created owner-only (0700 / 0600), and an existing `zerocore` or `rank*` folder must
  belong to this user and be writable by nobody else (else another user could swap files in under it).
- close() (and the exit hook) removes the run's folder, only in the process that made it (not in a fork).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import time
from typing import Optional

log = logging.getLogger("zerocore")

# A tmp- folder without a lock this much older than now was left by a run killed while it made the folder.
STALE_TMP_S = 60.0


def _check_private(path: str) -> None:
    """An existing zerocore folder must be a real folder of this user that no one else can write."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SwapFolderError(errno.EPERM, f"zerocore: {path!r} is not a folder owned by this user (uid "
                              f"{os.geteuid()}) and writable by it alone (owner uid {st.st_uid}, mode "
                              f"{oct(st.st_mode & 0o777)}): another user could replace the swap files under it. "
                              "Remove it, or point nvme_path at a folder of your own.")


class SwapFolderError(OSError):
    """nvme_path cannot hold this run's optimizer state (missing, not writable, or too small); `errno` says
    which, str() is the whole sentence."""

    def __str__(self) -> str:
        return self.strerror


def _describe_bytes(n: int) -> str:
    return f"{n} bytes ({n / 2**30:.2f} GiB)"


class SwapFolder:
    """This rank's run folder under nvme_path and the one preallocated state file in it."""

    def __init__(self, nvme_path: str, rank: int, uid: str, file_bytes: int):
        root = os.path.abspath(os.fspath(nvme_path))
        if not os.path.isdir(root):
            raise SwapFolderError(errno.ENOENT, f"zerocore: nvme_path {root!r} does not exist or is not a folder: "
                                  "create it (mkdir -p) on a fast local disk, or fix offload_optimizer.nvme_path")
        if not os.access(root, os.W_OK | os.X_OK):
            raise SwapFolderError(errno.EACCES, f"zerocore: nvme_path {root!r} is not writable by this process "
                                  f"(uid {os.geteuid()}): give it write permission or choose another folder")
        self.base = os.path.join(root, "zerocore")
        self.rank_dir = os.path.join(self.base, f"rank{rank}")
        for d in (self.base, self.rank_dir):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            _check_private(d)
        self._pid = os.getpid()
        self.removed_stale = sum(self._remove_dead_runs(os.path.join(self.base, name))
                                 for name in sorted(os.listdir(self.base)) if name.startswith("rank"))
        st = os.statvfs(self.rank_dir)
        free = st.f_bavail * st.f_frsize
        if file_bytes > free:
            raise SwapFolderError(errno.ENOSPC, f"zerocore: nvme_path {root!r} has {_describe_bytes(free)} free "
                                  f"but rank {rank}'s optimizer state needs {_describe_bytes(file_bytes)}: free "
                                  "space there, point nvme_path at a larger disk, or use more ranks")
        # Made under a temporary name and locked before it gets the name other runs scan for.
        self.dir = os.path.join(self.rank_dir, f"tmp-{uid}-{os.getpid()}")
        os.mkdir(self.dir, 0o700)
        self._lock_fd: Optional[int] = None
        try:
            # Read-only: a descriptor open for writing would stop the disk from being remounted (and a lock
            # needs none).
            self._lock_fd = os.open(os.path.join(self.dir, "lock"), os.O_CREAT | os.O_RDONLY | os.O_NOFOLLOW, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            final = os.path.join(self.rank_dir, f"run-{uid}")
            os.rename(self.dir, final)
            self.dir = final
            self.path = os.path.join(self.dir, "state.bin")
            self.file_bytes = file_bytes
            if file_bytes:
                self._reserve(self.path, file_bytes, root, free)
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _reserve(path: str, nbytes: int, root: str, free: int) -> None:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise SwapFolderError(e.errno, f"zerocore: cannot reserve {_describe_bytes(nbytes)} for the optimizer "
                                  f"state in {path!r} ({os.strerror(e.errno)}; {_describe_bytes(free)} were free): "
                                  "free space under nvme_path or choose another disk") from e
        finally:
            os.close(fd)

    @staticmethod
    def _remove_dead_runs(rank_dir: str) -> int:
        """Remove the run folders in rank_dir whose owner died (their lock is free); how many were removed."""
        removed = 0
        try:
            names = os.listdir(rank_dir)
        except OSError:
            return 0
        for name in names:
            folder = os.path.join(rank_dir, name)
            if not name.startswith(("run-", "tmp-")) or os.path.islink(folder) or not os.path.isdir(folder):
                continue
            try:
                young = name.startswith("tmp-") and time.time() - os.lstat(folder).st_mtime < STALE_TMP_S
            except FileNotFoundError:
                continue               # another rank removed it just now
            if young:
                continue               # (a run may be making it just now, before it took its lock)
            try:
                fd = os.open(os.path.join(folder, "lock"), os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                fd = None              # a run that died before it took its lock
            except OSError:
                continue
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue       # a live run owns it
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
                log.warning("zerocore: removed %s, the NVMe optimizer state of a run that ended without cleaning "
                            "up (it is never read)", folder)
            finally:
                if fd is not None:
                    os.close(fd)
        return removed

    def remove(self) -> None:
        """Delete the run's folder and release its lock (idempotent; in a forked child it only lets go)."""
        if getattr(self, "dir", None) is not None and getattr(self, "_pid", None) == os.getpid():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
