"""How nnU-Net finds our trainers: the folder for ``nnUNet_extTrainer``.

nnU-Net 2.8 looks a trainer name up in its own trainer folder first, then in every folder listed in
the environment variable ``nnUNet_extTrainer`` (``os.pathsep``-separated), read at each lookup. The
folder is the installed package ``nnunet_losses.trainers`` (``trainers/`` of the repository).

Shell::

    export nnUNet_extTrainer=$(nnunet-losses trainer-path --append)

Python (e.g. ``nnUNetPredictor`` in a pipeline), before the first trainer lookup::

    from nnunet_losses.training.discovery import enable_trainers
    enable_trainers()
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

ENV_VAR = "nnUNet_extTrainer"
TRAINER_PACKAGE = "nnunet_losses.trainers"


def trainer_folder() -> str:
    """Absolute path of the folder holding our trainer modules (without importing them)."""
    spec = importlib.util.find_spec(TRAINER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"expected the package {TRAINER_PACKAGE!r} to be installed with nnunet-losses, got none; "
            "reinstall with `pip install nnunet-losses` (or `pip install -e .` in a checkout)"
        )
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def with_trainer_folder(current: Optional[str], folder: Optional[str] = None) -> str:
    """``current`` (a value of ``nnUNet_extTrainer``, may be None or empty) with ``folder`` (default: our
    trainer folder) appended (``os.pathsep``-separated), unless it is already there."""
    folder = trainer_folder() if folder is None else os.path.abspath(folder)
    paths = [p for p in (current or "").split(os.pathsep) if p.strip()]
    if any(os.path.abspath(p) == folder for p in paths):
        return os.pathsep.join(paths)
    return os.pathsep.join(paths + [folder])


def enable_trainers() -> str:
    """Add our trainer folder to ``os.environ['nnUNet_extTrainer']`` (after any folders already
    there) so that nnU-Net in this process and its child processes finds the trainers; returns the
    new value. nnU-Net reads the variable at every lookup, so calling this after importing nnunetv2
    is fine. Idempotent."""
    value = with_trainer_folder(os.environ.get(ENV_VAR))
    os.environ[ENV_VAR] = value
    return value
