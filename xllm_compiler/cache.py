"""The compile cache: a second compile of the same checkpoint with the same options reuses the first.

An entry is a finished artifact, keyed by everything that could change it: the checkpoint's sha256,
the options, every pass's name, version and options, the bucket list, and the torch, project and
format versions. Each entry holds its own ``entry.json`` with the sha256 of every file; an entry whose
files do not match is deleted and rebuilt, never used. Entries are filled with hard links where the
cache and the artifact share a file system (no second copy of the weights), copies otherwise.

The checkpoint's sha256 is itself cached per file by (path, size, mtime): an unchanged 400 MB
checkpoint is not re-read to find out it is unchanged, while any edit changes its stat and its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xllm_compiler.artifact.manifest import MANIFEST, sha256_file

ENTRY_INDEX = "entry.json"
STAT_INDEX = "file-hashes.json"


def default_cache_dir() -> Path:
    """$XLLM_CACHE_DIR, else $XDG_CACHE_HOME/xllm_compiler, else ~/.cache/xllm_compiler."""
    if os.environ.get("XLLM_CACHE_DIR"):
        return Path(os.environ["XLLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xllm_compiler"


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _place(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``, or copy when they are on different file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class CompileCache:
    """Finished artifacts by key, under ``root/entries/<key>``; ``root=None`` disables the cache."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _entry(self, key: str) -> Path:
        return self.root / "entries" / key

    def file_sha256(self, path: Path) -> str:
        """sha256 of a source file, remembered by (path, size, mtime_ns) across compiles."""
        if not self.enabled:
            return sha256_file(path)
        index_path = self.root / STAT_INDEX
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError):
            index = {}
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = index.get(str(path.resolve()))
        if entry and entry.get("stat") == stamp:
            return entry["sha256"]
        digest = sha256_file(path)
        index[str(path.resolve())] = {"stat": stamp, "sha256": digest}
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.root, delete=False, suffix=".tmp") as tmp:
            json.dump(index, tmp)
        os.replace(tmp.name, index_path)
        return digest

    def lookup(self, key: str) -> Path | None:
        """The entry for ``key`` if every file it lists is present and matches its recorded hash, else
        None; a damaged entry is deleted (and the compile rebuilds it)."""
        if not self.enabled:
            return None
        entry = self._entry(key)
        try:
            index = json.loads((entry / ENTRY_INDEX).read_text())
            files = index["files"]
            intact = index["key"] == key and sorted(files) == [f for f in _files(entry) if f != ENTRY_INDEX]
            intact = intact and all(
                (entry / rel).stat().st_size == record["bytes"] and sha256_file(entry / rel) == record["sha256"]
                for rel, record in files.items()
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            intact = False
        if intact:
            return entry
        self.discard(key)
        return None

    def discard(self, key: str) -> None:
        shutil.rmtree(self._entry(key), ignore_errors=True)

    def store(self, key: str, artifact: Path) -> None:
        """Record a finished artifact under ``key``, atomically; a concurrent writer's entry wins.

        The entry hard-links the artifact's files (no second copy of the weights); editing the
        artifact in place therefore damages the entry, which ``lookup`` then detects. File hashes
        come from the artifact's own (just written) manifest; only the manifest is hashed.
        """
        if not self.enabled or self._entry(key).exists():
            return
        entries = self.root / "entries"
        entries.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=entries))
        try:
            known = {rel: e["sha256"] for rel, e in json.loads((artifact / MANIFEST).read_text())["files"].items()}
            files = {}
            for rel in _files(artifact):
                _place(artifact / rel, staging / rel)
                digest = known.get(rel) or sha256_file(staging / rel)
                files[rel] = {"sha256": digest, "bytes": (staging / rel).stat().st_size}
            (staging / ENTRY_INDEX).write_text(json.dumps({"key": key, "files": files}, indent=1))
            os.replace(staging, self._entry(key))
        except OSError:
            pass  # the cache is an optimisation: a failure to fill it never fails the compile
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def restore(self, entry: Path, target: Path, skip: set[str] = frozenset()) -> None:
        """Fill ``target`` (a staging folder) with the entry's files, except ``skip``, by hard link (or
        copy across file systems). Like uv's cache, artifacts made from one entry share files: edit an
        artifact's file in place and ``load()`` of the others refuses it (hash), and the entry is
        rebuilt at the next lookup."""
        for rel in _files(entry):
            if rel != ENTRY_INDEX and rel not in skip:
                _place(entry / rel, target / rel)
