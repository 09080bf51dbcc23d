"""Short runs of any trainer without writing a class: ``<trainer>_<E>ep_<I>it`` trains E epochs of I
iterations (``trainers/nnunet_losses_short_runs.py`` answers nnU-Net's lookup of such a name)."""

from __future__ import annotations

import contextlib
import io
import re
from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# One underscore: nnU-Net splits its output folders "<trainer>__<plans>__<configuration>" on "__".
SHORT_RUN_PATTERN = re.compile(r"^(?P<base>[A-Za-z]\w*?)_(?P<epochs>[1-9]\d*)ep_(?P<iterations>[1-9]\d*)it$")


def validation_iterations(iterations: int) -> int:
    """Validation batches per epoch of a short run: nnU-Net's ratio (250 training : 50 validation)."""
    return max(1, iterations // 5)


def make_short_run_trainer(base: type, epochs: int, iterations: int, name: Optional[str] = None) -> type:
    """A subclass of ``base`` that trains ``epochs`` epochs of ``iterations`` iterations (and
    ``iterations // 5`` validation iterations, at least 1), named ``<base>_<E>ep_<I>it``."""
    if not (isinstance(base, type) and issubclass(base, nnUNetTrainer)):
        raise TypeError(f"base: expected a subclass of nnUNetTrainer, got {base!r}")
    for label, value in (("epochs", epochs), ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}: expected an int >= 1, got {value!r}")

    class ShortRun(base):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = validation_iterations(iterations)

    ShortRun.__name__ = ShortRun.__qualname__ = name or f"{base.__name__}_{epochs}ep_{iterations}it"
    ShortRun.__module__ = base.__module__
    ShortRun.__doc__ = (f"{base.__name__} for {epochs} epochs of {iterations} iterations (short run; output folder "
                        f"separate from a full run).")
    return ShortRun


def short_run_trainer(name: str) -> type:
    """The trainer class a short-run name ``<trainer>_<E>ep_<I>it`` stands for.

    The base trainer is found the way nnU-Net finds any trainer (its own folder, then the folders
    of ``nnUNet_extTrainer``), so every trainer nnU-Net can find has short runs. Raises
    AttributeError (a module ``__getattr__`` answers with it) when ``name`` is not such a name or
    its base trainer does not exist.
    """
    match = SHORT_RUN_PATTERN.match(name)
    if match is None:
        raise AttributeError(f"{name!r} is not a short-run trainer name (<trainer>_<epochs>ep_<iterations>it)")
    base_name = match["base"]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates every lookup
        try:
            base = recursive_find_trainer_class_by_name(base_name)
        except RuntimeError as error:
            raise AttributeError(f"{name!r}: no trainer named {base_name!r} ({error})") from None
    return make_short_run_trainer(base, int(match["epochs"]), int(match["iterations"]), name)
