"""Files: their sha256 (model cards, data checksums, integrity checks) and writing them whole or not at all."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (model files, images, the gate)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, content: bytes | str | Callable[[Path], None]) -> Path:
    """Written whole or not at all: a temporary file beside ``path``, synced, then renamed over it.

    A crash leaves the old file or the new one, never half of one, and a failed write
    leaves nothing behind (the folder is synced too, see :func:`move_atomically`). ``content`` is bytes, text (UTF-8), or a function that writes
    the temporary path (e.g. a DICOM dataset's ``save_as``). The temporary name starts
    with a dot and ends with a random suffix, so folder scans by extension skip it.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    temporary = Path(name)
    try:
        if callable(content):
            content(temporary)
        else:
            temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        move_atomically(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def move_atomically(source: Path, target: Path) -> Path:
    """A file already written (e.g. received from the network) made durable under its final name: synced, renamed
    (on the same file system), and the folder synced, so that the rename survives a power loss too."""
    with open(source, "rb") as written:
        os.fsync(written.fileno())
    os.replace(source, target)
    folder = os.open(Path(target).parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return Path(target)
