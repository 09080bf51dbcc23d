"""The rooms of docs/architecture.md and the one-way arrows between them, read from the code's own
imports (module level and inside functions, absolute and relative): a lower room never imports a
higher one, and no room reaches into another room's private (``_``) modules."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]

# room -> the rooms it may import (besides itself); listed bottom-up as in docs/architecture.md
ALLOWED = {
    "losses": set(),
    "nnunet_io": set(),
    "training": {"losses", "nnunet_io"},
    "commands": {"losses", "nnunet_io", "training", "trainers"},  # the top floor
    "trainers": {"losses", "training"},
    "package": {"losses"},  # nnunet_losses/__init__.py: the public loss API only
}
# the only part of nnU-Net the losses may use (batch reductions under DDP)
LOSSES_MAY_IMPORT_FROM_NNUNET = {"nnunetv2.utilities.ddp_allgather"}


def room_of_module(dotted: str) -> str | None:
    """The room of an absolute module name of ours, None for anything else."""
    parts = dotted.split(".")
    if parts[0] != "nnunet_losses":
        return None
    if len(parts) == 1:
        return "losses"  # `import nnunet_losses` is the losses' public API
    return parts[1] if parts[1] in ALLOWED else None


def room_of_file(path: Path) -> tuple[str, str]:
    """(room, dotted module name) of a source file of the package or the trainer folder."""
    relative = path.relative_to(REPOSITORY).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "trainers":
        parts = ["nnunet_losses", "trainers"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    dotted = ".".join(parts)
    return ("package" if dotted == "nnunet_losses" else room_of_module(dotted)), dotted


def imported_modules(source: str, dotted: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module an import statement of ``source`` names, as absolute names, with its line."""
    package = dotted if is_package else dotted.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, node.lineno))
            # `from package import module` imports a module too
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def violations(path: Path, source: str) -> list[str]:
    room, dotted = room_of_file(path)
    problems = {}  # one problem per import statement
    for module, line in imported_modules(source, dotted, path.name == "__init__.py"):
        if line in problems:
            continue
        where = f"{path.relative_to(REPOSITORY)}:{line} imports {module}"
        target = room_of_module(module)
        if room == "losses" and module.startswith("nnunetv2") and not module.startswith(
                tuple(LOSSES_MAY_IMPORT_FROM_NNUNET)):
            problems[line] = f"{where}: the losses use nothing of nnU-Net but its all-gather"
        elif room == "losses" and module.split(".")[0] in {"matplotlib", "sklearn", "tqdm", "SimpleITK"}:
            problems[line] = f"{where}: the losses are pure PyTorch"
        elif target is None or target == room:
            continue
        elif target not in ALLOWED[room]:
            problems[line] = f"{where}: room {room!r} may import {sorted(ALLOWED[room])} only"
        elif any(part.startswith("_") and not part.startswith("__") for part in module.split(".")[2:]):
            problems[line] = f"{where}: a private module of room {target!r}"
    return list(problems.values())


SOURCES = sorted((REPOSITORY / "nnunet_losses").rglob("*.py")) + sorted((REPOSITORY / "trainers").glob("*.py"))


def test_every_source_file_is_in_a_room():
    assert len(SOURCES) > 20
    assert [str(p) for p in SOURCES if room_of_file(p)[0] is None] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_imports_run_down_the_rooms(path):
    assert violations(path, path.read_text()) == []


@pytest.mark.parametrize("relative, source, expected", [
    ("nnunet_losses/losses/mime.py", "from ..training import loss_assembly\n", "room 'losses' may import"),
    ("nnunet_losses/losses/dice.py", "def f():\n    from nnunet_losses.commands import report\n",
     "room 'losses' may import"),
    ("nnunet_losses/losses/dice.py", "from nnunetv2.training.loss.dice import SoftDiceLoss\n", "nothing of nnU-Net"),
    ("nnunet_losses/losses/dice.py", "import matplotlib.pyplot\n", "pure PyTorch"),
    ("nnunet_losses/training/label_sets.py", "from ..commands.derive import x\n", "room 'training' may import"),
    ("nnunet_losses/nnunet_io.py", "from .training import label_sets\n", "room 'nnunet_io' may import"),
    ("trainers/nnunet_losses_mime_trainers.py", "from nnunet_losses.commands import cli\n",
     "room 'trainers' may import"),
    ("nnunet_losses/training/names.py", "from nnunet_losses.trainers import TRAINER_NAMES\n",
     "room 'training' may import"),
    ("nnunet_losses/commands/report.py", "from ..losses._inputs import prepare\n", "private module"),
    ("nnunet_losses/__init__.py", "from .training import discovery\n", "room 'package' may import"),
])
def test_the_check_finds_each_kind_of_violation(relative, source, expected):
    (problem,) = violations(REPOSITORY / relative, source)
    assert expected in problem and relative in problem


def test_importing_the_package_loads_neither_nnunet_nor_the_other_rooms():
    # a fresh interpreter: this process has imported everything already
    import subprocess
    import sys

    code = ("import sys, nnunet_losses; "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('nnunetv2', 'matplotlib'))} | "
            "{m for m in sys.modules if m.startswith(('nnunet_losses.training', 'nnunet_losses.commands'))}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_architecture_page_lists_every_module_of_the_tree():
    page = (REPOSITORY / "docs" / "architecture.md").read_text()
    tree = page.split("```")[1]
    for path in SOURCES:
        if path.name == "__init__.py" and path.parent.name not in ("nnunet_losses",):
            continue
        name = path.name
        if path.parent.name == "trainers" and name.startswith("nnunet_losses_"):
            continue  # the trainer modules are named as a family on the page
        assert re.search(rf"\b{re.escape(name)}\b", tree), f"docs/architecture.md does not show {name}"
    for room in ("losses/", "training/", "commands/", "trainers/", "nnunet_io.py"):
        assert room in tree
    # and every module the page names exists
    for name in re.findall(r"\b([a-z_]+\.py)\b", tree):
        assert any(p.name == name for p in SOURCES) or name.startswith("nnunet_losses_"), name


def test_every_room_imports():
    for name in ("nnunet_losses.losses", "nnunet_losses.nnunet_io", "nnunet_losses.training.loss_assembly",
                 "nnunet_losses.commands.cli", "nnunet_losses.trainers"):
        importlib.import_module(name)
