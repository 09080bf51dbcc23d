"""What a training run imports: nnU-Net imports it inside every ``nnUNetv2_train`` process through the
trainers of ``trainers/``. It turns our losses into ``trainer.loss`` (:mod:`.loss_assembly`; Dice + CE
as nnU-Net combines them: :mod:`.compound`), reads partial label sets (:mod:`.label_sets`), counts the
classes of the trainer's own training batches for the heuristic ε and the balanced mimes
(:mod:`.class_counts`), resolves experiments by name (:mod:`.names`) and tells nnU-Net where the
trainers are (:mod:`.discovery`). It never imports :mod:`nnunet_losses.commands`."""
