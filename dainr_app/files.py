"""Output files written whole: a temporary name beside the output, renamed onto it once complete."""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from typing import Iterator, Optional


def partial_name(target: str) -> str:
    """A hidden temporary name beside ``target`` of its own (random: processes in other PID namespaces writing
    into one folder do not meet), short enough for any name the file system takes as ``target``."""
    folder, name = os.path.split(target)
    stem = os.fsdecode(os.fsencode(name)[:160])  # (bytes: a name need not be UTF-8; a character cut is kept escaped)
    return os.path.join(folder, f".{stem}.{secrets.token_hex(6)}.partial")


@contextlib.contextmanager
def replaced_whole(path: str) -> Iterator[str]:
    """A temporary name beside ``path`` for the block to write; renamed onto ``path`` when the block succeeds.  A
    failed write (a full disk, a file size limit) is an OSError naming ``path``, which is left as it was; the
    temporary file is removed either way.  Through a symbolic link the file it names is replaced (the link
    stays), and a file replaced keeps its permissions, and its group and owner where this process may set them."""
    target = os.path.realpath(path)
    partial = partial_name(target)
    try:
        yield partial
        if os.path.isfile(target):
            shutil.copymode(target, partial)
            st = os.stat(target)
            with contextlib.suppress(OSError):  # (a group this user is not in: the file takes the user's)
                os.chown(partial, st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
        os.replace(partial, target)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(partial)


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` (``flock``, released when the block ends): processes that read a file there,
    change it and replace it whole, hold it so that none replaces the file with a copy taken before another's
    change (two `dainr replay -o` into one file each kept only their own group).  Where the folder cannot be
    locked (no read permission, a file system without ``flock`` on folders) the block runs unlocked, as before."""
    try:
        fd: Optional[int] = os.open(folder, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)
