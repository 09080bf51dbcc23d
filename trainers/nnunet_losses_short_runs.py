"""Short runs of any trainer without writing a class: ``-tr <trainer>_<E>ep_<I>it`` trains E epochs of
I iterations (and I // 5 validation iterations, at least 1), e.g. ``nnUNetTrainerMime_3ep_10it`` or
``nnUNetTrainer_3ep_10it``. The name differs from the full run's, so its output folder does too, and
``nnUNetv2_predict -tr`` finds the same class again by that name.

nnU-Net asks every module in this folder for the trainer name; this one answers through a module
``__getattr__`` (PEP 562).
"""

from nnunet_losses.training.short_runs import short_run_trainer


def __getattr__(name: str) -> type:
    return short_run_trainer(name)
