"""What a training run imports: nnU-Net imports it inside every ``nnUNetv2_train`` process through the
trainers of ``trainers/``. It turns our losses into ``trainer.loss`` (:mod:`.loss_assembly`), reads
partial label sets (:mod:`.label_sets`), estimates the heuristic ε (:mod:`.heuristic_epsilon`),
resolves experiments by name (:mod:`.names`) and tells nnU-Net where the trainers are
(:mod:`.discovery`). It never imports :mod:`nnunet_losses.commands`."""
