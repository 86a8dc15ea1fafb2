"""Package manifest: schema-versioned, with the sha256 of every file and a digest of itself."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from hpedge.runtime import MANIFEST, SCHEMA, sha256


def finalize_manifest(root: Path, manifest: dict[str, Any], hashes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the sha256 of every file under ``root`` (except the manifest) and the manifest digest.

    ``hashes`` (kept by the caller across calls) remembers each file's digest with its size and modification
    time: a file already hashed and unchanged since is not read again."""
    files = {}
    hashes = {} if hashes is None else hashes
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            st = p.stat()
            key = (st.st_size, st.st_mtime_ns)
            if rel not in hashes or hashes[rel][0] != key:
                hashes[rel] = (key, sha256(p))
            files[rel] = hashes[rel][1]
    body = {**manifest, "schema": SCHEMA, "files": files}
    body.pop("manifest_sha256", None)
    body["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (root / MANIFEST).write_text(json.dumps(body, indent=2))
    return body


def write_archive(root: Path, archive: Path) -> None:
    """A single-file ``.tar`` of the package (written next to it, atomically)."""
    from hpedge.io import atomic_file

    with atomic_file(archive) as tmp:
        with tarfile.open(tmp, "w") as tar:
            tar.add(root, arcname=root.name)
