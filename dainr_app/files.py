"""Output files written whole: a temporary name beside the output, renamed onto it once complete."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def replaced_whole(path: str) -> Iterator[str]:
    """A temporary name beside ``path`` for the block to write; renamed onto ``path`` when the block succeeds.  A
    failed write (a full disk, a file size limit) is an OSError naming ``path``, which is left as it was; the
    temporary file is removed either way.  Through a symbolic link the file it names is replaced (the link
    stays), and a file replaced keeps its permissions."""
    target = os.path.realpath(path)
    partial = f"{target}.partial-{os.getpid()}"
    try:
        yield partial
        if os.path.isfile(target):
            shutil.copymode(target, partial)
        os.replace(partial, target)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(partial)
