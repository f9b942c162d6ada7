"""The compile cache: a second compile of the same checkpoint with the same options reuses the first.

An entry is a finished artifact, keyed by everything that could change it: the checkpoint's sha256,
the options, every pass's name, version and options, the bucket list, and the torch, project and
format versions. Each entry holds its own ``entry.json`` with the sha256 of every file; an entry whose
files do not match is discarded and rebuilt, never used, and ``lookup`` says what was wrong so that the
compile report can.

Artifacts never share files with the cache: ``store`` and ``restore`` copy, as a reflink where the file
system can (btrfs, XFS: instant, and the blocks are shared copy-on-write, so writing one side never
changes the other) and a plain copy otherwise. Hard links, as uv uses, would save the copy but let a
damaged entry break every artifact made from it, or one edited artifact break the entry.

The cache holds at most ``max_bytes`` (``$XLLM_CACHE_MAX_SIZE``, default 20 GiB: four float32 or eight
bfloat16 1B-parameter artifacts); each store first evicts the least recently used entries (a hit counts
as a use) to make room, and an artifact larger than the whole limit is not cached. A lock per key
(``root/locks/<key>.lock``) makes a second compile of the same key wait for the first and hit.

The checkpoint's sha256 is itself cached per file by (path, size, mtime): an unchanged 400 MB
checkpoint is not re-read to find out it is unchanged, while any edit changes its stat and its hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from xllm_compiler.artifact.manifest import read_manifest, sha256_file
from xllm_compiler.errors import ArtifactError, OptionsError
from xllm_compiler.sizes import format_bytes, parse_size

ENTRY_INDEX = "entry.json"
STAT_INDEX = "file-hashes.json"
ENTRIES_DIR = "entries"
LOCKS_DIR = "locks"
MAX_SIZE_ENV = "XLLM_CACHE_MAX_SIZE"
#: A few 1B-parameter models in a couple of variants each (a float32 1B artifact is about 5 GB, bfloat16
#: 2.5 GB); a miss costs one recompile, so a limit the user never has to think about beats a larger one.
DEFAULT_MAX_BYTES = 20 * 2**30
#: Linux's FICLONE ioctl (_IOW(0x94, 9, int)); the fcntl module names it only from Python 3.12.
_FICLONE = 0x40049409


def default_cache_dir() -> Path:
    """$XLLM_CACHE_DIR, else $XDG_CACHE_HOME/xllm_compiler, else ~/.cache/xllm_compiler."""
    if os.environ.get("XLLM_CACHE_DIR"):
        return Path(os.environ["XLLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xllm_compiler"


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``: a reflink where the file system can, else a plain copy.

    FICLONE is explicit and all-or-nothing: it shares every block copy-on-write or fails at once
    (ext4, tmpfs, across file systems), and shutil then copies. os.copy_file_range may clone too, but
    falls back to a byte copy without saying so, returns short counts to loop over, and its rules across
    file systems changed between kernels; shutil.copyfile on Python 3.11 (sendfile) never clones.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform == "linux":
        import fcntl  # not on Windows

        with open(source, "rb") as src, open(target, "wb") as dst, contextlib.suppress(OSError):
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return
    shutil.copyfile(source, target)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _mark_used(entry: Path) -> None:
    """Record a use in the mtime of the entry's index, to the nanosecond: the kernel's own file times are
    coarse (milliseconds), too coarse to order a store and a hit right after it."""
    now = time.time_ns()
    os.utime(entry / ENTRY_INDEX, ns=(now, now))


def _problem(entry: Path, key: str) -> str | None:
    """What is wrong with the entry folder ``entry`` of ``key``, or None when every file matches its index."""
    try:
        index = json.loads((entry / ENTRY_INDEX).read_text())
        named = index["key"]
        files = {rel: (int(record["bytes"]), str(record["sha256"])) for rel, record in index["files"].items()}
    except FileNotFoundError:
        return f"{ENTRY_INDEX} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{ENTRY_INDEX} is unreadable ({type(exc).__name__})"
    if named != key:
        return f"{ENTRY_INDEX} names another key ({str(named)[:12]})"
    on_disk = set(_files(entry)) - {ENTRY_INDEX}
    if missing := sorted(set(files) - on_disk):
        return f"{missing[0]} is missing"
    if extra := sorted(on_disk - set(files)):
        return f"{extra[0]} is not listed in {ENTRY_INDEX}"
    try:
        for rel, (size, _) in files.items():
            if (entry / rel).stat().st_size != size:
                return f"{rel} has {(entry / rel).stat().st_size} bytes, {size} expected"
        for rel, (_, digest) in files.items():
            if sha256_file(entry / rel) != digest:
                return f"{rel}: sha256 mismatch"
    except OSError as exc:
        return f"{exc.filename}: {exc.strerror}"
    return None


@dataclass(frozen=True)
class Lookup:
    """What ``lookup`` found: an intact entry, or none. ``damaged`` says what was wrong with an entry that
    was there but failed its check; it has been discarded, and the compile rebuilds it."""

    entry: Path | None = None
    damaged: str | None = None

    def report(self, key: str) -> dict[str, Any]:
        """The compile report's "cache" section for a compile that builds (``damaged`` only when it was)."""
        return {"key": key, "hit": False, **({"damaged": self.damaged} if self.damaged else {})}


@dataclass(frozen=True)
class EntryInfo:
    """One entry as ``xllm-cache info`` lists it."""

    key: str
    path: Path
    bytes: int
    last_used: float
    """Seconds since the epoch: when it was stored or last hit (the mtime of its entry.json)."""
    source: str
    """The checkpoint folder of the compile that made it."""
    model: str
    """The architecture, from its manifest."""
    dtype: str


def _describe(entry: Path) -> EntryInfo:
    """An entry's size, last use and origin, read without hashing anything (and without failing on damage)."""
    try:
        files = json.loads((entry / ENTRY_INDEX).read_text())["files"]
        size = sum(int(record["bytes"]) for record in files.values())
        last_used = (entry / ENTRY_INDEX).stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        size = sum((entry / rel).stat().st_size for rel in _files(entry))
        last_used = entry.stat().st_mtime
    try:
        manifest = read_manifest(entry, verify=False)
        source, model, dtype = manifest.source.path, manifest.model.architecture, manifest.model.dtype
    except (OSError, ArtifactError):
        source = model = dtype = "?"
    return EntryInfo(entry.name, entry, size, last_used, source, model, dtype)


class CompileCache:
    """Finished artifacts by key, under ``root/entries/<key>``; ``root=None`` disables the cache.

    ``max_bytes`` bounds the entries' total size; None reads ``$XLLM_CACHE_MAX_SIZE`` (default 20 GiB).
    """

    def __init__(self, root: Path | None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else None
        if max_bytes is None:
            value = os.environ.get(MAX_SIZE_ENV) if root is not None else None
            max_bytes = parse_size(value, MAX_SIZE_ENV) if value else DEFAULT_MAX_BYTES
        if max_bytes <= 0:
            raise OptionsError(f"the compile cache's size limit must be positive, not {max_bytes}")
        self.max_bytes = max_bytes

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise RuntimeError("the compile cache is disabled")
        return self.root

    def _entry(self, key: str) -> Path:
        return self._root / ENTRIES_DIR / key

    def lock_path(self, key: str) -> Path:
        return self._root / LOCKS_DIR / f"{key}.lock"

    def _lock(self, key: str) -> FileLock | None:
        """``key``'s lock (not yet held), or None where the cache folder cannot be written."""
        try:
            self.lock_path(key).parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        return FileLock(self.lock_path(key))

    def file_sha256(self, path: Path) -> str:
        """sha256 of a source file, remembered by (path, size, mtime_ns) across compiles."""
        if not self.enabled:
            return sha256_file(path)
        index_path = self._root / STAT_INDEX
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
        self._root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.root, delete=False, suffix=".tmp") as tmp:
            json.dump(index, tmp)
        os.replace(tmp.name, index_path)
        return digest

    @contextlib.contextmanager
    def locked(
        self, key: str, waiting: Callable[[Path], contextlib.AbstractContextManager] = contextlib.nullcontext
    ) -> Iterator[None]:
        """Hold ``key``'s lock for the body (lookup, build, store): a second compile of the same key waits,
        inside ``waiting(lock_file)`` (the compile shows it as a stage), and then finds the first one's entry.

        The lock is an flock (filelock): the kernel releases it when its holder exits, however it exits,
        so a crashed compile never leaves a stale lock; a live holder is waited for as long as it takes
        (Ctrl-C stops the wait). A disabled cache, or one whose folder cannot be written, takes no lock.
        """
        lock = self._lock(key) if self.enabled else None
        if lock is not None:
            try:
                lock.acquire(blocking=False)
            except Timeout:
                with waiting(self.lock_path(key)):
                    lock.acquire()
            except OSError:  # a lock file we cannot create: compile unlocked, as without a cache
                lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def lookup(self, key: str) -> Lookup:
        """The entry for ``key`` if every file it lists is present and matches its recorded hash (and its
        use is recorded, for eviction); a damaged entry is discarded and the result says what was wrong."""
        if not self.enabled or not self._entry(key).exists():
            return Lookup()
        problem = _problem(self._entry(key), key)
        if problem is None:
            with contextlib.suppress(OSError):
                _mark_used(self._entry(key))
            return Lookup(self._entry(key))
        self.discard(key)
        return Lookup(damaged=problem)

    def discard(self, key: str) -> None:
        """Delete an entry; it is renamed away first, so that no lookup ever sees half of it."""
        trash = self._entry(key).with_name(f".discard-{uuid.uuid4().hex}")
        try:
            self._entry(key).rename(trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def store(self, key: str, artifact: Path) -> None:
        """Record a copy of a finished artifact under ``key``, atomically; a concurrent writer's entry wins.

        Least recently used entries are evicted first to make room; an artifact larger than the whole
        limit is not cached (with a warning). File hashes come from the artifact's own (just written)
        manifest; only the manifest is hashed.
        """
        if not self.enabled or self._entry(key).exists():
            return
        size = sum((artifact / rel).stat().st_size for rel in _files(artifact))
        if size > self.max_bytes:
            warnings.warn(
                f"xllm_compiler: not caching {artifact}: its {format_bytes(size)} alone exceed the compile cache's "
                f"limit of {format_bytes(self.max_bytes)} (set {MAX_SIZE_ENV})",
                stacklevel=2,
            )
            self.evict()
            return
        self.evict(self.max_bytes - size)
        entries = self._root / ENTRIES_DIR
        entries.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=entries))
        try:
            known = {rel: e.sha256 for rel, e in read_manifest(artifact, verify=False).files.items()}
            files = {}
            for rel in _files(artifact):
                _copy(artifact / rel, staging / rel)
                digest = known.get(rel) or sha256_file(staging / rel)
                files[rel] = {"sha256": digest, "bytes": (staging / rel).stat().st_size}
            (staging / ENTRY_INDEX).write_text(json.dumps({"key": key, "files": files}, indent=1))
            _mark_used(staging)
            os.replace(staging, self._entry(key))
        except OSError:
            pass  # the cache is an optimisation: a failure to fill it never fails the compile
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def restore(self, entry: Path, target: Path, skip: Collection[str] = frozenset()) -> None:
        """Fill ``target`` (a staging folder) with copies of the entry's files, except ``skip``."""
        for rel in _files(entry):
            if rel != ENTRY_INDEX and rel not in skip:
                _copy(entry / rel, target / rel)

    def entries(self) -> list[EntryInfo]:
        """Every entry, most recently used first."""
        folder = self._root / ENTRIES_DIR if self.enabled else None
        if folder is None or not folder.is_dir():
            return []
        found = [_describe(p) for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def _remove_unless_in_use(self, key: str) -> bool:
        """Discard ``key`` unless a compile holds its lock (it may be copying from the entry)."""
        lock = self._lock(key)
        if lock is None:
            return False
        try:
            lock.acquire(blocking=False)
        except OSError:  # Timeout included: held by another compile
            return False
        try:
            self.discard(key)
        finally:
            lock.release()
        return True

    def evict(self, limit: int | None = None) -> list[str]:
        """Discard least recently used entries until at most ``limit`` bytes (default: ``max_bytes``) remain;
        entries in use by another compile are kept. Returns the keys evicted."""
        limit = self.max_bytes if limit is None else limit
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        evicted: list[str] = []
        for entry in reversed(entries):
            if total <= limit:
                break
            if self._remove_unless_in_use(entry.key):
                total -= entry.bytes
                evicted.append(entry.key)
        return evicted

    def clear(self, prefix: str = "") -> tuple[list[str], list[str]]:
        """Discard every entry whose key starts with ``prefix`` (with none, the checkpoint hashes too);
        returns (removed, kept because in use)."""
        removed: list[str] = []
        in_use: list[str] = []
        if not prefix and self.enabled:
            (self._root / STAT_INDEX).unlink(missing_ok=True)
            # Half-stored entries of killed compiles (a running compile's only goes uncached).
            for partial in (self._root / ENTRIES_DIR).glob(".*"):
                shutil.rmtree(partial, ignore_errors=True)
        for entry in self.entries():
            if entry.key.startswith(prefix):
                (removed if self._remove_unless_in_use(entry.key) else in_use).append(entry.key)
        return removed, in_use
