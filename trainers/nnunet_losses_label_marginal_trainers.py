"""Label-marginal trainers (Liu et al., "The hidden label-marginal biases of segmentation losses"):
nnU-Net's cross-entropy plus λ times a penalty between ground-truth and predicted class proportions,
in place of DC+CE.

nnU-Net imports this module under its bare name from the folder in ``nnUNet_extTrainer``: only
absolute imports work here.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_losses import LabelMarginalLoss
from nnunet_losses.training.loss_assembly import assemble_loss, loss_target_options


class nnUNetTrainerCEL1(nnUNetTrainer):
    """CE + λ·mean |ŷ - p̂| (λ = 1, the paper's tuned value), p̂ from softmax(τ·x). Labels (softmax,
    CE) and regions (sigmoid, BCE)."""

    penalty = "l1"
    lam = 1.0
    tau = 10.0

    def _build_loss(self):
        knee = {"kl_knee": self.kl_knee} if self.penalty == "kl" else {}
        return assemble_loss(self, LabelMarginalLoss(penalty=self.penalty, lam=self.lam, tau=self.tau, **knee,
                                                     **loss_target_options(self)))


class nnUNetTrainerCEKL(nnUNetTrainerCEL1):
    """CE + λ·KL(ŷ ‖ p̂) (λ = 0.1, the paper's tuned value). Labels and regions (Bernoulli KL per region).
    ``kl_knee`` = 0.5: the KL's log continued along its tangent below half the true proportion, so that a
    class predicted almost nowhere, at the wrong voxels, is not pushed there at the KL's unbounded
    derivative (measured on the 3D lesion, benchmarks/README.md); ``nnUNetTrainerCEKL_knee0`` is the
    paper's KL."""

    penalty = "kl"
    lam = 0.1
    kl_knee = 0.5
