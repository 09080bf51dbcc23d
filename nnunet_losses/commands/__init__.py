"""The ``nnunet-losses`` command and its offline analysis: one module per subcommand (gradients,
evaluation, report, derive-partial, trainer-path) plus the synthetic datasets, reading nnU-Net data
through :mod:`nnunet_losses.nnunet_io`. The top floor: it may import every other room, none imports it."""
