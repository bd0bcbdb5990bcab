"""Digests of the stored bytes of a file's frame arrays, remembered per file version so they are read once.

An HDF5 file receives rewards and caches in place, so its size and modification time cannot say that its
frames changed; only their bytes can. Hashing them costs one read of the stored (still compressed) bytes,
about 1 GB/s here. The result is remembered under the user's cache folder, keyed by the file's identity
(device, inode, size, modification and change times: the change time cannot be set back by `touch` or
`cp -p`), with the versions of any other file the frames come from (external links), so later runs on the
same versions read nothing. When vlmlabel itself rewrites the file
(rewards or cache added, frames untouched), ``carry`` files the digest under the new version too.
The memo is best effort: where it cannot be read or written, the digest is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from vlmlabel.files import atomic

CACHE_ENV = "VLMLABEL_CACHE_DIR"


def memo_folder() -> Path:
    """$VLMLABEL_CACHE_DIR, else $XDG_CACHE_HOME/vlmlabel or ~/.cache/vlmlabel, then ``digests/``."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlmlabel"
    return Path(base) / "digests"


def _version(path: Path) -> str:
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:32]


def _entry(version: str, what: str) -> Path:
    return memo_folder() / f"{version}-{hashlib.sha256(what.encode()).hexdigest()[:16]}"


def remembered(path: Path, what: str, compute: Callable[[], tuple[bytes, list[Path]]]) -> str:
    """The digest of ``what`` (the arrays read) in the file at ``path``: from the memo, or computed and kept.

    ``compute`` also names the other files the bytes came from (external links, virtual datasets): the memo
    holds their versions too, and is used only while they are unchanged."""
    version = version_of(path)
    entry = _entry(version, what) if version is not None else None
    if entry is not None and entry.is_file():
        try:
            kept = json.loads(entry.read_text())
            if all(version_of(Path(other)) == seen for other, seen in kept["others"].items()):
                return str(kept["digest"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    data, others = compute()
    digest = hashlib.sha256(data).hexdigest()[:32]
    if entry is not None:
        record = {"digest": digest, "others": {str(o): version_of(o) for o in others}}
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(entry, json.dumps(record).encode())
        except OSError:
            pass
    return digest


def version_of(path: Path) -> str | None:
    """The file's current version, taken before vlmlabel rewrites it (None: it does not exist)."""
    try:
        return _version(path)
    except OSError:
        return None


def carry(before: str | None, path: Path) -> None:
    """vlmlabel rewrote the file at ``path`` without touching its frames: what was known of the version
    ``before`` holds for the new one."""
    if before is None:
        return
    try:
        after = _version(path)
        for entry in memo_folder().glob(f"{before}-*"):
            atomic.write_bytes(memo_folder() / f"{after}-{entry.name.split('-', 1)[1]}", entry.read_bytes())
    except OSError:
        pass
