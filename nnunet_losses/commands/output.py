"""What every subcommand (and benchmarks/) writes, written one way: Markdown tables, JSON (NaN as null,
written atomically), PNG figures through matplotlib's file-only backend, and a folder assembled out of
sight and renamed into place."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

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


@contextlib.contextmanager
def folder_renamed_into_place(target: PathLike) -> Iterator[str]:
    """A hidden sibling of ``target`` to write into, renamed to ``target`` when the block ends; on any
    error it is removed instead, so a failure leaves nothing behind."""
    parent, name = os.path.split(os.fspath(target))
    work = tempfile.mkdtemp(prefix=f".{name}.incomplete-", dir=parent)
    try:
        yield work
        os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
