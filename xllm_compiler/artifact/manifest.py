"""manifest.json: what an artifact holds, how it was made, and the sha256 of every file in it.

Written last by the compiler and read first by the runtime, which refuses an artifact whose format
version it does not know or any of whose files is missing or differs from its recorded hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from xllm_compiler.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path, relative_paths: list[str]) -> dict[str, dict[str, Any]]:
    """{path: {sha256, bytes}} for the files an artifact lists."""
    return {
        rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size} for rel in sorted(relative_paths)
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of artifact ``root``, with its format version and file hashes verified."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a compiled artifact")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {version!r} is not supported by this runtime (expects {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path} lists no files")
    for rel, entry in files.items():
        _verify_file(root, rel, entry)
    return manifest


def _verify_file(root: Path, rel: str, entry: Any) -> None:
    target = (root / rel).resolve()
    if root.resolve() not in target.parents:
        raise ArtifactError(f"{MANIFEST} lists '{rel}', which lies outside the artifact")
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ArtifactError(f"{MANIFEST} has a malformed entry for '{rel}'")
    if not target.is_file():
        raise ArtifactError(f"artifact file {rel} is missing")
    size = target.stat().st_size
    if size != entry.get("bytes"):
        raise ArtifactError(
            f"artifact file {rel} has {size} bytes, the manifest says {entry.get('bytes')} (truncated?)"
        )
    if sha256_file(target) != entry["sha256"]:
        raise ArtifactError(f"artifact file {rel} does not match its sha256 in the manifest (tampered or corrupt)")
