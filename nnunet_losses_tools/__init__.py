"""nnU-Net-side tools of nnunet-losses: the ``nnunet-losses`` command and what it runs (trainer
discovery, partially labelled datasets, gradient diagnostics, evaluation and reports).

The losses themselves live in :mod:`nnunet_losses` (pure PyTorch) and know nothing of nnU-Net.
"""
