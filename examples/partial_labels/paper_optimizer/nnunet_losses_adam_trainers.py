"""Every trainer of nnunet-losses with Adam instead of nnU-Net's SGD: ``<trainer>Adam``, e.g.
``nnUNetTrainerDiceIEpsAdam``. The partial-label experiment trains with these by default
(``synthetic_experiment.py --optimizer adam``): Tilborghs et al. start from No New-Net's training
setup, which uses Adam, and the heuristic ε needs it (see optimizer_choice.py and the project README).

Nothing is rewritten: each class combines our trainer (its ``_build_loss``) with nnU-Net's own
``nnUNetTrainerVanillaAdam1en3`` (its ``configure_optimizers``: Adam, lr 1e-3, nnU-Net's poly
schedule) by multiple inheritance. The same one line works for any other pair, e.g.::

    class nnUNetTrainerMimeAdamW(nnUNetTrainerMime, nnUNetTrainerAdam): pass

nnU-Net imports this module under its bare name when this folder is in ``nnUNet_extTrainer``; the
experiment adds it there for its own runs.
"""

from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerVanillaAdam1en3

import nnunet_losses.trainers

ADAM_SUFFIX = "Adam"

for _name in nnunet_losses.trainers.TRAINER_NAMES:
    _loss_trainer = getattr(nnunet_losses.trainers, _name)
    globals()[_name + ADAM_SUFFIX] = type(_name + ADAM_SUFFIX, (_loss_trainer, nnUNetTrainerVanillaAdam1en3), {
        "__module__": __name__,
        "__doc__": f"{_name}'s loss with nnU-Net's nnUNetTrainerVanillaAdam1en3 optimizer (Adam, lr 1e-3).",
    })
del _name, _loss_trainer
