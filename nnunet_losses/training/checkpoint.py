"""Extra entries in nnU-Net's checkpoints (the heuristic ε, resolved hyperparameters), written without
ever leaving a truncated file."""

from __future__ import annotations

import os
from typing import Union

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


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
