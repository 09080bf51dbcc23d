"""What every subcommand (and benchmarks/) writes, written one way: Markdown tables, JSON (NaN as null,
written atomically), PNG figures through matplotlib's file-only backend, and every command's output
assembled out of sight (a hidden sibling, the modes of the user's umask) and renamed or moved into
place at the end, so that a failed or interrupted command leaves nothing."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from ..nnunet_io import UserInputError

PathLike = Union[str, os.PathLike]
_ALIGNMENT = {"l": "---", "r": "---:"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    """A Markdown table of strings; ``align`` is one letter per column, ``l`` or ``r`` (default: all ``l``)."""
    align = align or "l" * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(_ALIGNMENT[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Table(NamedTuple):
    """A table of strings: its header and rows (unpacks as ``header, rows``)."""

    header: list
    rows: list

    def markdown(self, align: Optional[str] = None) -> str:
        return markdown_table(self.header, self.rows, align)


def write_markdown(text: str, path: PathLike) -> Path:
    """``text`` and a final newline to ``path``."""
    Path(path).write_text(text + "\n")
    return Path(path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _nan_as_null(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _nan_as_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_as_null(v) for v in value]
    return value


def write_json(data, path: PathLike) -> Path:
    """``data`` as indented, strict JSON (NaN written as null, numpy values as Python ones) to ``path``,
    through a temporary file renamed over it: an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(_nan_as_null(data), indent=2, default=_json_default))
    os.replace(temporary, path)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: figures go to files, no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: PathLike, dpi: int = 80) -> Path:
    """Lay out, save and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# folders assembled out of sight: a failed or interrupted command leaves nothing
# ----------------------------------------------------------------------------------------------
WORK_FOLDER_MARK = ".incomplete-"  # .<target name>.incomplete-<pid>-<random>: a folder being assembled


@contextlib.contextmanager
def folder_renamed_into_place(target: PathLike, option: str = "target") -> Iterator[str]:
    """A hidden sibling of ``target`` (a NEW folder) to write into, renamed to ``target`` when the block
    ends; on any error or interrupt it is removed instead, so a failure leaves nothing behind. What it
    holds gets the permissions the user's umask gives; left-overs of interrupted runs are removed first."""
    target = Path(target)
    with _work_folder(target, option) as work:
        yield str(work)
        apply_umask(work)
        os.rename(work, target)


@contextlib.contextmanager
def files_moved_into_place(target: PathLike, option: str = "--output") -> Iterator[Path]:
    """A hidden sibling of the output folder ``target`` to write into. When the block ends its files
    replace those of the same names in ``target`` (created, with missing parents, when it does not
    exist); on any error or interrupt nothing of it stays. ``option`` names ``target`` in errors."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{option}: expected an output folder, got the existing file {str(target)!r}")
    with _work_folder(target, option) as work:
        yield work
        apply_umask(work)
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work, target)
            return
        for entry in sorted(work.iterdir()):
            destination = target / entry.name
            if entry.is_dir() and destination.is_dir():
                shutil.rmtree(destination)
            os.replace(entry, destination)


@contextlib.contextmanager
def _work_folder(target: Path, option: str) -> Iterator[Path]:
    """The hidden work folder next to ``target`` (next to its nearest existing ancestor when its
    parent does not exist yet), removed unless the block moved it away."""
    anchor = target.parent
    while not anchor.is_dir() and anchor != anchor.parent:
        anchor = anchor.parent
    remove_stale_work_folders(anchor, target.name)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}{WORK_FOLDER_MARK}{os.getpid()}-", dir=anchor))
    except OSError as error:
        raise UserInputError(f"{option}: expected a folder you can write in, got {str(anchor)!r} "
                             f"({error.strerror or error})") from None
    try:
        yield work
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def remove_stale_work_folders(parent: PathLike, name: str) -> list:
    """Remove the work folders of ``name`` in ``parent`` left by runs that were killed (their process
    is gone); those of running processes are kept. Returns the removed paths."""
    removed = []
    for candidate in Path(parent).glob(f".{glob.escape(name)}{WORK_FOLDER_MARK}*"):
        pid = candidate.name[len(name) + 1 + len(WORK_FOLDER_MARK):].split("-", 1)[0]
        if candidate.is_dir() and not (pid.isdigit() and _process_is_running(int(pid))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: PathLike) -> None:
    """Give ``folder`` and everything in it the modes a new file or folder gets under the user's umask
    (``tempfile.mkdtemp`` makes 0700 folders, ``shutil.copy2`` copies the source's modes)."""
    mask = current_umask()
    folder_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(folder, folder_mode)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
