"""manifest.json on disk: written last by the compiler, read first by the runtime, files verified by sha256.

The manifest's fields are ``schema.Manifest``; this module reads and writes the file and checks the
artifact's files against it: every listed file present inside the artifact with its recorded size
(cheap, always), and its sha256 (a full read: ``verify_files``, or started in the background with
``FileVerifier`` so that hashing the weights overlaps with reading them).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from xllm_compiler.artifact.schema import MANIFEST, FileEntry, Manifest
from xllm_compiler.errors import ArtifactError

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path, relative_paths: list[str]) -> dict[str, FileEntry]:
    """{path: FileEntry(sha256, bytes)} for the files an artifact lists."""
    return {rel: FileEntry(sha256_file(root / rel), (root / rel).stat().st_size) for rel in sorted(relative_paths)}


def write_manifest(root: Path, manifest: Manifest) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def read_manifest(root: Path | str, verify: bool = True) -> Manifest:
    """The manifest of artifact ``root``, validated, with every listed file present at its recorded size;
    with ``verify`` every file's sha256 checked too (else call ``verify_files`` or a ``FileVerifier``)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a compiled artifact")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    manifest = Manifest.from_json(data)
    for rel, entry in manifest.files.items():
        _check_present(root, rel, entry)
    if verify:
        verify_files(root, manifest, list(manifest.files))
    return manifest


def verify_files(root: Path, manifest: Manifest, rels: list[str]) -> None:
    """Check the sha256 of ``rels`` (hashed in parallel; hashlib releases the GIL)."""
    verifier = FileVerifier(root, manifest, rels)
    verifier.wait()


class FileVerifier:
    """Hashes files on background threads from construction on; ``wait`` raises the first mismatch."""

    def __init__(self, root: Path, manifest: Manifest, rels: list[str]):
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(len(rels), os.cpu_count() or 1)))
        self._futures: dict[str, Future] = {
            rel: self._pool.submit(_check_hash, root, rel, manifest.files[rel]) for rel in rels
        }
        self._pool.shutdown(wait=False)

    def wait(self, rels: list[str] | None = None) -> None:
        """Block until ``rels`` (default: all) are hashed; ArtifactError for the first that differs."""
        for rel in self._futures if rels is None else rels:
            self._futures[rel].result()


def _check_present(root: Path, rel: str, entry: FileEntry) -> None:
    target = (root / rel).resolve()
    if root.resolve() not in target.parents:
        raise ArtifactError(f"{MANIFEST} lists '{rel}', which lies outside the artifact")
    if not target.is_file():
        raise ArtifactError(f"artifact file {rel} is missing")
    size = target.stat().st_size
    if size != entry.bytes:
        raise ArtifactError(f"artifact file {rel} has {size} bytes, the manifest says {entry.bytes} (truncated?)")


def _check_hash(root: Path, rel: str, entry: FileEntry) -> None:
    if sha256_file(root / rel) != entry.sha256:
        raise ArtifactError(f"artifact file {rel} does not match its sha256 in the manifest (tampered or corrupt)")
