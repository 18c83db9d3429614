"""Where a job's input may come from: an upload streamed to the data directory (private to the server's user,
held to the upload cap, deleted after the retention), or a path that resolves (after following every symlink)
inside one of the directories the operator allowed. URLs (databases, object stores) are not taken from users."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import HTTPException

from backfill.errors import SpecError
from backfill.server.db import ServerDB, Upload, private_dir

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(path: str | None, what: str) -> None:
    """A `scheme://` location names a database or object store: only an operator's connection may do that."""
    if path and _URL.match(path):
        raise SpecError(
            f"The {what} {path.split('://')[0]}://… is a URL; this server reads only uploads and files in its allowed"
            " directories, and writes outputs itself. Upload the file instead."
        )


def resolve_allowed(path: str, allow_dirs: list[Path]) -> str:
    """The real path of `path` if it lies inside an allowed directory; SpecError otherwise.

    A relative path is taken relative to the first allowed directory. The check runs on the fully
    resolved path, so `..`, absolute paths and symlinks pointing outside are all refused.
    """
    if not allow_dirs:
        raise SpecError("This server takes no input paths (it was started without --allow-dir); upload the file instead.")
    if "\x00" in path:
        raise SpecError("The input path contains a NUL character.")
    candidate = Path(path) if os.path.isabs(path) else allow_dirs[0] / path
    real = os.path.realpath(candidate)
    for root in allow_dirs:
        base = os.path.realpath(root)
        if os.path.commonpath([real, base]) == base:
            if not os.path.isfile(real):
                raise SpecError(f"The input file {path} does not exist in the allowed directories.")
            return real
    raise SpecError(f"The input path {path} is outside the directories this server allows; upload the file or ask an operator.")


def upload_too_large(max_bytes: int) -> HTTPException:
    return HTTPException(413, f"The upload is over your cap max_upload_bytes = {max_bytes:,}; send a smaller file or ask an operator.")


async def save_upload(
    db: ServerDB, data_dir: Path, owner: str, filename: str, chunks: AsyncIterator[bytes], max_bytes: int | None = None
) -> Upload:
    """Stream a request body to a new file (mode 0600) under the data directory, chunk by chunk; over
    `max_bytes` it stops reading, deletes what it wrote and answers 413."""
    name = _SAFE.sub("_", os.path.basename(filename))[:100].lstrip(".") or "upload"
    upload_id = secrets.token_hex(8)
    directory = data_dir / "uploads" / owner
    private_dir(directory)
    path = directory / f"{upload_id}-{name}"
    size = 0
    tmp = path.with_name(path.name + ".part")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise upload_too_large(max_bytes)
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    upload = Upload(upload_id, owner, name, str(path), size, time.time())
    db.add_upload(upload)
    return upload


def expire_uploads(db: ServerDB, now: float, retention_days: Callable[[str], float | None]) -> int:
    """Delete each upload older than its owner's retention that no job still to run reads; returns how many."""
    removed = 0
    for up in db.uploads_before(now):
        days = retention_days(up.owner)
        if days is None or now - up.created < days * 86400 or db.input_in_use(up.path):
            continue
        Path(up.path).unlink(missing_ok=True)
        db.remove_upload(up.id)
        removed += 1
    return removed
