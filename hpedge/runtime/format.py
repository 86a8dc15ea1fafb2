"""The package format that export, check, build and the runtime share: file layout, manifest schema, hashes.

A package is a folder whose ``manifest.json`` (schema :data:`SCHEMA`) lists every other file with its sha256
and carries a digest of itself; ``parity/reference.safetensors`` holds the held-out inputs and PyTorch's
outputs that ``hpedge check`` compares against (see :func:`save_reference`).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.io import atomic_file

SCHEMA = "hpedge-package/2"
MANIFEST = "manifest.json"
REFERENCE = "parity/reference.safetensors"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    mf = root / MANIFEST
    if not root.is_dir():
        raise HpedgeError(f"package {root} not found (expected a folder with {MANIFEST})", HpedgeError.USAGE)
    if not mf.exists():
        raise HpedgeError(f"{root} is not an hpedge package: {MANIFEST} is missing", HpedgeError.CHECK_FAILED)
    try:
        data = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise HpedgeError(f"{mf} is corrupt: {e}", HpedgeError.CHECK_FAILED) from None
    if isinstance(data, dict) and data.get("schema") == "hpedge-package/1":
        raise HpedgeError(f"{root} was written by an older hpedge (hpedge-package/1: one fp32 text graph); export it again",
                          HpedgeError.CHECK_FAILED)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise HpedgeError(f"{mf}: unknown package schema {data.get('schema') if isinstance(data, dict) else None!r}",
                          HpedgeError.CHECK_FAILED)
    return data


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file listed must exist with its sha256; the manifest's own digest must match its content."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise HpedgeError(f"{root / MANIFEST} lists no files", HpedgeError.CHECK_FAILED)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if manifest.get("manifest_sha256") != digest:
        raise HpedgeError(f"{root / MANIFEST} was modified after packaging (digest mismatch)", HpedgeError.CHECK_FAILED)
    for rel, expected in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            raise HpedgeError(f"package file {rel} is missing", HpedgeError.CHECK_FAILED)
        if sha256(p) != expected:
            raise HpedgeError(f"package file {rel} does not match its sha256 (tampered or corrupt)", HpedgeError.CHECK_FAILED)


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
    with atomic_file(root / MANIFEST) as tmp:  # a reader sees the old manifest or the new one, never half of it
        tmp.write_text(json.dumps(body, indent=2))
    return body


def write_archive(root: Path, archive: Path) -> None:
    """A single-file ``.tar`` of the package (written next to it, atomically)."""
    with atomic_file(archive) as tmp:
        with tarfile.open(tmp, "w") as tar:
            tar.add(root, arcname=root.name)


def save_reference(root: Path, feeds: list[dict[str, Any]], outputs: list[Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write :data:`REFERENCE` under ``root``: held-out transformer inputs and PyTorch's outputs for them
    (``{i}/{input}``, ``{i}/out``), plus ``extra`` (``text/ids/...``: held-out token ids, ``text/prompt_embeds``
    and ``text/pooled``: PyTorch's prompt embeddings; ``vae/latents`` and ``vae/image``: PyTorch's decode).
    Returns the manifest's ``reference`` entry."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {f"{i}/{k}": np.ascontiguousarray(v) for i, f in enumerate(feeds) for k, v in f.items()}
    tensors.update({f"{i}/out": np.ascontiguousarray(o) for i, o in enumerate(outputs)})
    tensors.update({k: np.ascontiguousarray(v) for k, v in (extra or {}).items()})
    path = root / REFERENCE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return {"file": REFERENCE, "samples": len(feeds),
            "what": "held-out transformer inputs captured from real denoising runs and the PyTorch model's outputs"}


IMPLEMENTATION = "parity/implementation.safetensors"


def save_implementation_reference(root: Path, variant: str, prompt: str, latents: Any, image: Any,
                                  generation: dict[str, Any]) -> dict[str, Any]:
    """Write :data:`IMPLEMENTATION` under ``root``: one sample's initial noise and stock diffusers' image driving
    the package's ``variant`` graphs (:mod:`hpedge.export.driver`; the image stored in float16, 1e-4 of the
    tight gate's scale). Returns the manifest's ``parity.implementation`` entry."""
    import numpy as np
    from safetensors.numpy import save_file

    path = root / IMPLEMENTATION
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": np.ascontiguousarray(latents, np.float32), "image": np.ascontiguousarray(image, np.float16)},
              str(path))
    keep = ("steps", "guidance", "height", "width", "max_sequence_length")
    return {"file": IMPLEMENTATION, "variant": variant, "prompt": prompt,
            "generation": {k: generation[k] for k in keep},
            "what": "stock diffusers' call driving this package's graphs: the runtime must match it to rounding"}


def load_implementation_reference(root: Path, entry: dict[str, Any]) -> tuple[Any, Any]:
    """(initial noise, driven image as float32) of :func:`save_implementation_reference`."""
    from safetensors.numpy import load_file

    t = load_file(str(root / entry["file"]))
    return t["latents"], t["image"].astype("float32")


def load_reference(root: Path, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
    """(transformer feeds, PyTorch's outputs for them, the other components' entries) from a package."""
    ref = manifest["components"]["transformer"].get("reference")
    if not ref:
        raise HpedgeError(f"{root} has no parity reference (written by an older hpedge); export it again",
                          HpedgeError.CHECK_FAILED)
    from safetensors.numpy import load_file

    t = load_file(str(root / ref["file"]))
    n = ref["samples"]
    feeds = [{k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(f"{i}/") and not k.endswith("/out")}
             for i in range(n)]
    extra = {k: v for k, v in t.items() if not k.split("/", 1)[0].isdigit()}
    return feeds, [t[f"{i}/out"] for i in range(n)], extra
