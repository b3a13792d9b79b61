"""Small file helpers shared by every room of the core: atomic writes.

A file written here is complete or absent: the bytes go to a temporary file in
the same directory, are flushed to disk, and the file is renamed into place.
The file gets the mode an ordinary ``open(path, "w")`` would give it
(0o666 less the process umask; ``mkstemp`` alone would leave it 0600).
Imports nothing from the project.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def current_umask() -> int:
    """The process umask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write via a temporary file in the same directory, then rename.

    On any error (a full disk included) the temporary file is removed and the
    previous content of ``path``, if any, is left as it was.
    """
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj: Any, **dumps_kwargs: Any) -> None:
    """``json.dumps(obj, **dumps_kwargs)`` and a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")
