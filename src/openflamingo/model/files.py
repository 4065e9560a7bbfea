"""Writing directories so that a crash never leaves half of one (checkpoints, converted language models)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """A temporary sibling of `directory` to write into, renamed to `directory` (replacing it) once the block
    completes: a crash never leaves half a directory."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
