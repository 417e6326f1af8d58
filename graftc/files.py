"""File plumbing shared by artifacts, checkpoints and caches: atomic writes, one-line write errors, digests."""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from graftc.errors import GraftError


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed over it: readers (another run,
    a resume) see the old file or the new one, never a part. A failed write (a full disk, a file-size limit)
    removes the temporary file, leaves `path` as it was, and is a GraftError naming `path`."""
    from safetensors import SafetensorError

    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # unique: runs may share a folder
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:  # on disk before the rename, so a power cut cannot leave a renamed but empty file
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_failed(path: Path, exc: Exception) -> GraftError:
    """One line for a write that failed: the path and the system's reason ("No space left on device")."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", reason)  # safetensors wraps the OS's message
    return GraftError(f"cannot write {path}: {found[1] if found else reason}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
