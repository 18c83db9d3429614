"""Where a job's input may come from: an upload streamed to the data directory, or a path that resolves
(after following every symlink) inside one of the directories the operator allowed."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from backfill.errors import SpecError
from backfill.server.db import ServerDB, Upload

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


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


async def save_upload(db: ServerDB, data_dir: Path, owner: str, filename: str, chunks: AsyncIterator[bytes]) -> Upload:
    """Stream a request body to a new file under the data directory, chunk by chunk (any size)."""
    name = _SAFE.sub("_", os.path.basename(filename))[:100].lstrip(".") or "upload"
    upload_id = secrets.token_hex(8)
    directory = data_dir / "uploads" / owner
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{upload_id}-{name}"
    size = 0
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            async for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    upload = Upload(upload_id, owner, name, str(path), size, time.time())
    db.add_upload(upload)
    return upload
