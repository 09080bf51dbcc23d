"""What the nnU-Net trainers of ``trainers/`` share: turning one of our losses into the loss nnU-Net's
training loop calls (targets, ignore label, regions, ``torch.compile``, deep supervision), the
heuristic ε of ``nnUNetTrainerDiceIEps``, and the short-run trainer variants.

The trainer modules themselves are imported by nnU-Net under bare module names from the folder in
``nnUNet_extTrainer``, so everything they share lives here, in an ordinary importable package.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from tqdm import tqdm

from nnunet_losses import estimate_epsilon
from nnunet_losses_tools.label_sets import ANNOTATED_LABELS_KEY, AnnotatedTable, check_label_maps

# ----------------------------------------------------------------------------------------------
# from one of our losses to the loss nnU-Net's training loop calls
# ----------------------------------------------------------------------------------------------


def loss_target_options(trainer: nnUNetTrainer) -> dict:
    """The keywords that fit one of our losses to the trainer's targets.

    Label datasets: softmax, and nnU-Net's ignore label (in the ``(B, 1, ...)`` label map) passed as
    ``ignore_label``. Region datasets: sigmoid; nnU-Net puts the ignore label in an extra last channel
    of the region target instead, which :func:`assemble_loss` turns into ``loss_mask``.
    """
    label_manager = trainer.label_manager
    if label_manager.has_regions:
        return {"activation": "sigmoid"}
    return {"activation": "softmax", "ignore_label": label_manager.ignore_label}


def refuse_regions(trainer: nnUNetTrainer, why: str) -> None:
    """Stop at start-up (``_build_loss``) when a softmax-only loss meets a region dataset."""
    if trainer.label_manager.has_regions:
        raise ValueError(
            f"{type(trainer).__name__}: expected a dataset with mutually exclusive labels (softmax outputs), got a "
            f"region dataset (dataset.json 'labels' with regions and 'regions_class_order', sigmoid outputs): {why}"
        )


class RegionIgnoreChannel(nn.Module):
    """Calls ``loss`` with nnU-Net's region target split into regions and mask.

    With regions and an ignore label, nnU-Net's data pipeline appends the ignore label as the LAST
    channel of the region target (``ConvertSegmentationToRegionsTransform``); voxels where it is set
    do not count (the same convention as nnU-Net's ``DC_and_BCE_loss``).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        keep = y[:, -1:] == 0
        if loss_mask is not None:
            keep = keep & loss_mask.bool()
        return self.loss(x, y[:, :-1], loss_mask=keep)


class TrainerLossCall(nn.Module):
    """Calls ``call(loss, x, y, loss_mask)``: lets one trainer method decide how its loss is called
    (the missing-label trainers pass their per-sample label sets there)."""

    def __init__(self, loss: nn.Module, call: Callable):
        super().__init__()
        self.loss = loss
        self.call = call

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.call(self.loss, x, y, loss_mask)


class PerScaleDeepSupervision(nn.Module):
    """Deep supervision with one loss per output scale (nnU-Net's ``DeepSupervisionWrapper`` applies a
    single loss to every scale; the heuristic ε differs per scale). Same weights, same skipping of
    zero-weight outputs."""

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(losses) != len(weights):
            raise ValueError(f"losses: expected one loss per weight ({len(weights)}), got {len(losses)}")
        self.losses = nn.ModuleList(losses)
        self.weight_factors = tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(w * loss(x, y) for w, loss, x, y in zip(self.weight_factors, self.losses, outputs, targets)
                   if w != 0.0)


def num_output_scales(trainer: nnUNetTrainer) -> int:
    """How many outputs the loss sees: one per deep-supervision scale, or 1 without deep supervision."""
    return len(trainer._get_deep_supervision_scales()) if trainer.enable_deep_supervision else 1


def deep_supervision_weights(trainer: nnUNetTrainer) -> Optional[np.ndarray]:
    """nnU-Net's deep-supervision weights (``nnUNetTrainer._build_loss``), None without deep supervision.

    ``1/2^i`` per scale i, the lowest resolution output weighted 0 -- or 1e-6 under DDP without
    ``torch.compile``, where a zero weight leaves parameters without gradient and DDP fails -- then
    normalised to sum 1.
    """
    if not trainer.enable_deep_supervision:
        return None
    weights = np.array([1 / (2**i) for i in range(num_output_scales(trainer))])
    weights[-1] = 1e-6 if (trainer.is_ddp and not trainer._do_i_compile()) else 0
    return weights / weights.sum()


def assemble_loss(trainer: nnUNetTrainer, loss: Union[nn.Module, Sequence[nn.Module]]) -> nn.Module:
    """Turn one of our losses into ``trainer.loss``, as ``nnUNetTrainer._build_loss`` does for DC+CE.

    ``loss`` is one module for every output scale, or a sequence with one module per scale
    (:func:`num_output_scales`). Each is adapted to nnU-Net's region target with the ignore label
    (:class:`RegionIgnoreChannel`), compiled where nnU-Net compiles (``trainer._do_i_compile()``),
    and the result wrapped for deep supervision with nnU-Net's weights.
    """
    per_scale = not isinstance(loss, nn.Module)
    losses = list(loss) if per_scale else [loss]
    if per_scale and len(losses) != num_output_scales(trainer):
        raise ValueError(
            f"loss: expected one loss per output scale ({num_output_scales(trainer)}), got {len(losses)}"
        )
    label_manager = trainer.label_manager
    if label_manager.has_regions and label_manager.ignore_label is not None:
        losses = [RegionIgnoreChannel(item) for item in losses]
    if trainer._do_i_compile():
        losses = [torch.compile(item) for item in losses]
    weights = deep_supervision_weights(trainer)
    if weights is None:
        return losses[0]
    if per_scale:
        return PerScaleDeepSupervision(losses, weights)
    return DeepSupervisionWrapper(losses[0], weights)


class MissingLabelTrainer(nnUNetTrainer):
    """Base of the marginal and leaf Dice trainers: their loss call is :meth:`call_missing_label_loss`.

    A partially labelled dataset (dataset.json ``"annotated_labels"``, see
    :mod:`nnunet_losses_tools.label_sets`) has its label sets checked when training starts (an error
    names the case), compared with the label maps of the fold's partially annotated cases (a label with
    voxels that the set marks as not annotated is an error naming case and label), and turned into an
    :class:`AnnotatedTable`; every training and validation batch
    then gets its ``(B, C)`` ``annotated`` table from nnU-Net's ``batch['keys']``, the same table at
    every deep-supervision scale. nnU-Net's own ``train_step`` / ``validation_step`` run unchanged
    (AMP, gradient clipping, the online pseudo-Dice). Without the key the loss gets ``annotated=None``:
    its "class c annotated in sample b iff present" fallback.
    """

    annotated_table: Optional[AnnotatedTable] = None  # None: no label sets, the losses' fallback
    batch_annotated: Optional[torch.Tensor] = None  # the current batch's table, set around each step

    def on_train_start(self):
        # before nnU-Net's start (dataloaders, worker processes): bad label sets fail fast
        self.annotated_table = self._build_annotated_table()
        if self.annotated_table is not None:
            self._check_label_maps(self.annotated_table)
        super().on_train_start()

    def _build_annotated_table(self) -> Optional[AnnotatedTable]:
        if ANNOTATED_LABELS_KEY not in self.dataset_json:
            self.print_to_log_file(f"No '{ANNOTATED_LABELS_KEY}' in dataset.json: every class counts as annotated "
                                   "in a sample iff present there (annotated iff present).")
            return None
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = self.preprocessed_dataset_folder
        identifiers = infer_dataset_class(folder).get_identifiers(folder)
        table = AnnotatedTable(self.dataset_json, identifiers, self.label_manager.num_segmentation_heads,
                               self.label_manager)
        partial = int((~table(identifiers).all(dim=1)).sum())
        self.print_to_log_file(f"Label sets from dataset.json '{ANNOTATED_LABELS_KEY}': {partial} of the "
                               f"{len(identifiers)} training cases are partially annotated.")
        return table

    def _check_label_maps(self, table: AnnotatedTable) -> None:
        """Read the label maps of this fold's partially annotated cases (training and validation split)
        and stop if one has voxels of a label its set marks as not annotated (:func:`check_label_maps`).
        Unchecked, the softmax losses would refuse the contradiction mid-training, whenever a batch first
        draws that case; with regions it would silently drop the case's terms of a region that is there."""
        # Every DDP rank scans (only the few partially annotated cases): each then raises the same error
        # and exits, where a rank-0-only scan would leave the other ranks waiting at nnU-Net's barrier.
        train_cases, validation_cases = self.do_split()  # nnU-Net's split (sets self.dataset_class)
        fold_cases = sorted(set(train_cases) | set(validation_cases))
        dataset = self.dataset_class(self.preprocessed_dataset_folder, identifiers=list(fold_cases))
        scanned = check_label_maps(self.dataset_json, table.label_sets, lambda case: dataset.load_case(case)[1],
                                   cases=fold_cases, label_manager=self.label_manager,
                                   progress=self.local_rank == 0)
        shown = ", ".join(scanned[:10]) + (f", ... ({len(scanned) - 10} more)" if len(scanned) > 10 else "")
        self.print_to_log_file(
            f"Label maps checked against their label sets: {len(scanned)} partially annotated case(s) of fold "
            f"{self.fold} ({shown or 'none'}), no contradiction.")

    @contextlib.contextmanager
    def _label_sets_of(self, batch: dict):
        """Makes the batch's table available to :meth:`call_missing_label_loss` during one step."""
        if self.annotated_table is not None:
            self.batch_annotated = self.annotated_table(batch["keys"], self.device)
        try:
            yield
        finally:
            self.batch_annotated = None

    def train_step(self, batch: dict) -> dict:
        with self._label_sets_of(batch):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._label_sets_of(batch):
            return super().validation_step(batch)

    def call_missing_label_loss(self, loss: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One output scale's loss with the current batch's label sets (None: the loss's fallback)."""
        return loss(x, y, loss_mask=loss_mask, annotated=self.batch_annotated)


# ----------------------------------------------------------------------------------------------
# the heuristic ε (Tilborghs et al. §2.3) of nnUNetTrainerDiceIEps
# ----------------------------------------------------------------------------------------------
EPSILON_CHECKPOINT_KEY = "heuristic_epsilon"


def _target_scales(target) -> list:
    return list(target) if isinstance(target, (list, tuple)) else [target]


def estimate_heuristic_epsilon(batches: Iterator[dict], num_batches: int, num_classes: int,
                               ignore_label: Optional[int], region_ignore_channel: bool,
                               device: Union[str, torch.device] = "cpu", progress: bool = True) -> List[torch.Tensor]:
    """ε per output scale: each class's mean voxel count per training patch, over ``num_batches``
    batches of an nnU-Net dataloader (``batch['target']``: one tensor, or one per deep-supervision
    scale), averaged over DDP ranks when a process group exists.

    ``region_ignore_channel``: the region targets carry nnU-Net's ignore channel last (dropped; the
    regions are 0 on ignored voxels). Label maps skip ``ignore_label`` voxels. ``device``: where the
    DDP all-reduce runs (the trainer's device: NCCL reduces CUDA tensors only).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"epsilon_batches: expected an int >= 1, got {num_batches!r}")
    totals: Optional[List[torch.Tensor]] = None
    samples = 0
    for _ in tqdm(range(num_batches), desc="heuristic epsilon", disable=not progress):
        targets = _target_scales(next(batches)["target"])
        if region_ignore_channel:
            targets = [t[:, :-1] for t in targets]
        batch_size = targets[0].shape[0]
        # estimate_epsilon gives the batch mean; weight it by the batch size (DDP ranks may differ)
        sums = [estimate_epsilon([t], num_classes, ignore_label) * batch_size for t in targets]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
        samples += batch_size
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        packed = torch.cat([torch.stack(totals).flatten(), torch.tensor([float(samples)], dtype=torch.float64)])
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        samples = float(packed[-1])
        totals = list(packed[:-1].view(len(totals), num_classes).unbind(0))
    return [total / samples for total in totals]


def epsilon_as_json(per_scale: Sequence[torch.Tensor]) -> str:
    """One scale per row, one value per class; exact (JSON floats round-trip)."""
    return json.dumps([[float(v) for v in scale] for scale in per_scale])


def add_to_checkpoint(trainer: nnUNetTrainer, filename: str, key: str, value) -> None:
    """Add ``key: value`` to a checkpoint ``nnUNetTrainer.save_checkpoint`` has just written.

    Rewritten through a temporary file and ``os.replace``, so an interruption leaves either the
    old or the new file, never a truncated one.
    """
    if trainer.local_rank != 0 or trainer.disable_checkpointing or not os.path.isfile(filename):
        return
    checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    checkpoint[key] = value
    temporary = filename + ".partial"
    torch.save(checkpoint, temporary)
    os.replace(temporary, filename)


def read_from_checkpoint(filename_or_checkpoint: Union[str, dict], key: str):
    """``checkpoint[key]`` or None; memory-maps a file instead of reading the weights again."""
    if isinstance(filename_or_checkpoint, dict):
        return filename_or_checkpoint.get(key)
    return torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False, mmap=True).get(key)


# ----------------------------------------------------------------------------------------------
# short runs: <trainer>_<E>ep_<I>it
# ----------------------------------------------------------------------------------------------
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
