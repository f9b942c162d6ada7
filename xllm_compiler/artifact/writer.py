"""Write an artifact atomically: everything goes to a hidden folder beside OUT_DIR, renamed at the end.

A failed or interrupted compile therefore leaves no OUT_DIR (and an existing one untouched); an
existing non-empty OUT_DIR is refused unless ``force``, before any work is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx

from xllm_compiler.artifact.graph_format import serialize_graph
from xllm_compiler.errors import OutputDirError
from xllm_compiler.interface import ARENA_PREFIX
from xllm_compiler.oserrors import NO_SPACE_ERRNOS, USER_ERRNOS, as_os_error

WEIGHTS_FILE = "weights.safetensors"
GRAPHS_DIR = "graphs"


def check_output_dir(out_dir: Path, force: bool, model_dir: Path | None = None) -> None:
    """Refuse, before any work is done, an OUT_DIR that is a file, that lies under a file, that we may
    not create, that is or holds the model folder, or that is a non-empty folder without ``force``."""
    out_dir = Path(out_dir)
    with _as_output_dir_error(out_dir):
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputDirError(f"output path {out_dir} exists and is not a directory")
        parent = _nearest_existing(out_dir.absolute().parent)
        if not parent.is_dir():
            raise OutputDirError(f"cannot create the output directory {out_dir}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            why = "is on a read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "is not writable"
            raise OutputDirError(f"cannot create the output directory {out_dir}: {parent} {why}")
        if model_dir is not None:
            out, model = out_dir.resolve(), Path(model_dir).resolve()
            if out == model or out in model.parents:
                raise OutputDirError(f"output directory {out_dir} is or contains the model directory {model_dir}")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
            raise OutputDirError(
                f"output directory {out_dir} exists and is not empty (--force, or force=True in Python, replaces it)"
            )


@contextlib.contextmanager
def staged_output(out_dir: Path, force: bool, model_dir: Path | None = None) -> Iterator[Path]:
    """Yield a staging folder; on normal exit it becomes OUT_DIR, on any exception it vanishes and an
    existing OUT_DIR is left as it was. An OSError of the user's making in OUT_DIR (permissions, a full
    disk) becomes an OutputDirError naming the folder."""
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, force, model_dir)
    with _as_output_dir_error(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with _as_output_dir_error(out_dir):
            yield staging
            _apply_umask(staging)
            check_output_dir(out_dir, force, model_dir)
            _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a file or a folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def _as_output_dir_error(out_dir: Path) -> Iterator[None]:
    """Re-raise an OSError the user can fix (see oserrors) that concerns OUT_DIR, its ancestors or its
    hidden siblings as an OutputDirError naming OUT_DIR; any other error passes through unchanged."""
    try:
        yield
    except Exception as exc:
        error = as_os_error(exc)
        if error is None or error.errno not in USER_ERRNOS:
            raise
        out_dir = Path(out_dir).absolute()
        if error.errno in NO_SPACE_ERRNOS:
            raise OutputDirError(f"cannot write the output directory {out_dir}: {error.strerror}") from exc
        if error.filename is None or not _concerns(out_dir, Path(os.fsdecode(error.filename)).absolute()):
            raise
        folder = _nearest_existing(Path(os.fsdecode(error.filename)).absolute())
        reason = f"{folder} is a file, not a folder" if not folder.is_dir() else f"{error.strerror} in {folder}"
        raise OutputDirError(f"cannot write the output directory {out_dir}: {reason}") from exc


def _concerns(out_dir: Path, path: Path) -> bool:
    """Whether ``path`` is OUT_DIR, inside it, one of its ancestors, or inside a hidden sibling
    (``.NAME.partial-*`` staging, ``.NAME.old-*`` retired)."""
    if path == out_dir or out_dir in path.parents or path in out_dir.parents:
        return True
    return any(p.parent == out_dir.parent and p.name.startswith(f".{out_dir.name}.") for p in [path, *path.parents])


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first and put back if
    the rename fails, so it is only ever replaced whole."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired_parent = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    retired = retired_parent / out_dir.name
    out_dir.rename(retired)
    try:
        staging.rename(out_dir)
    except BaseException:
        retired.rename(out_dir)
        shutil.rmtree(retired_parent, ignore_errors=True)
        raise
    shutil.rmtree(retired_parent, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    """mkdtemp and safetensors create owner-only files; give the artifact the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def referenced_weights(graphs: list[fx.GraphModule]) -> dict[str, torch.Tensor]:
    """Every tensor a get_attr node of ``graphs`` names, once (arena buffers are not weights)."""
    weights: dict[str, torch.Tensor] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target not in weights and not node.target.startswith(ARENA_PREFIX):
                weights[node.target] = _fetch(gm, node.target)
    return weights


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)


def weights_file(rank: int, tp: int) -> str:
    """weights.safetensors, or weights.rank<r>.safetensors for each rank of a tensor-parallel artifact."""
    return WEIGHTS_FILE if tp == 1 else f"weights.rank{rank}.safetensors"


def write_weights(root: Path, weights: dict[str, torch.Tensor], filename: str = WEIGHTS_FILE) -> str:
    """Write ``filename``; tensors sharing storage are stored as separate copies (safetensors rule)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in weights.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    save_file(tensors, str(root / filename))
    return filename


def write_graph(root: Path, name: str, gm: fx.GraphModule) -> str:
    """graphs/NAME.json; returns its path relative to the artifact root."""
    rel = f"{GRAPHS_DIR}/{name}.json"
    (root / GRAPHS_DIR).mkdir(exist_ok=True)
    (root / rel).write_text(json.dumps(serialize_graph(gm), separators=(",", ":")))
    return rel
