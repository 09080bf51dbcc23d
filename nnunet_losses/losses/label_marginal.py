r"""Label-marginal penalties (Liu et al., "The hidden label-marginal biases of segmentation losses"):
cross-entropy plus an explicit penalty between ground-truth and predicted class proportions."""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._autograd import differentiable_gradient
from ._inputs import check_range, compute_dtype, prepare
from ._options import ACTIVATIONS, check_ignore_label, check_option, check_scalar, type_or_dtype
from ._overlap_sums import overlap_sums_ground_truth
from ._reductions import channel_dot, masked_mean, spatial_sum

PENALTIES = ("l1", "kl", "dice_bias")
DEFAULT_LAMBDA = {"l1": 1.0, "kl": 0.1, "dice_bias": 0.01}
_LOG_FLOOR = 1e-8  # keeps log(p̂) finite when a predicted class proportion underflows to 0


def marginal_penalty(y_hat: torch.Tensor, p_hat: torch.Tensor, *, penalty: str = "l1", activation: str = "softmax",
                     valid: Optional[torch.Tensor] = None, kl_knee: float = 0.0) -> torch.Tensor:
    r"""The penalty :math:`R(\hat y, \hat p)` on ``(B, C)`` class proportions, averaged over images.

    * ``"l1"``: :math:`\frac{1}{BC}\sum_{b,c} |\hat y_{b,c} - \hat p_{b,c}|` -- averaged over classes as in
      the authors' code (λ = 1 was tuned with it); the paper's Table 1 writes the sum over classes,
      which is C times larger. :math:`\partial R/\partial \hat p = \mathrm{sign}(\hat p - \hat y)/(BC)`.
    * ``"kl"``: :math:`\frac{1}{B}\sum_b \sum_c \hat y \log(\hat y / \hat p)` (0 log 0 = 0, :math:`\hat p`
      floored at 1e-8), :math:`\partial R/\partial \hat p = -\hat y/(B \hat p)`. With sigmoid regions
      (proportions that need not sum to 1) the Bernoulli KL of each region,
      :math:`\hat y\log\frac{\hat y}{\hat p} + (1-\hat y)\log\frac{1-\hat y}{1-\hat p}`, summed over regions.
      ``kl_knee`` κ in [0, 1] (0: the paper's KL, above) continues :math:`\log \hat p` below :math:`k = κ\hat y`
      along its tangent, :math:`\log k + (\hat p - k)/k`: the KL unchanged where :math:`\hat p \ge κ\hat y`, its
      derivative below the knee the constant :math:`-1/(Bκ)`, so that a class predicted almost nowhere gets a push that
      fades with :math:`\hat p` (as L1's) instead of the KL's full :math:`τλ\hat y/B` wherever
      softmax(τx) is largest (benchmarks/README.md, *CE + KL on the 3D lesion*). Regions: the same for
      :math:`1-\hat p` with :math:`k = κ(1-\hat y)`.
    * ``"dice_bias"``: the Dice loss's hidden bias (paper eq. 1, DB),
      :math:`\frac{1}{BC}\sum_{b,c} \log(\hat p + \hat y)`.

    ``valid``: optional ``(B,)`` bool, images to average over (those with at least one counted voxel).

    Example:
        >>> y_hat, p_hat = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.5]])
        >>> float(marginal_penalty(y_hat, p_hat, penalty="l1"))            # (0.25 + 0.25) / 2
        0.25
        >>> round(float(marginal_penalty(y_hat, p_hat, penalty="kl")), 6)  # 0.75 ln 1.5 + 0.25 ln 0.5
        0.130812
    """
    check_option("penalty", penalty, PENALTIES)
    check_option("activation", activation, ACTIVATIONS)
    _check_proportions("y_hat", y_hat, y_hat)
    _check_proportions("p_hat", p_hat, y_hat)
    _check_valid(valid, y_hat.shape[0])
    return _marginal_penalty(y_hat, p_hat, penalty, activation, valid, _check_kl_knee(kl_knee, penalty))


def _check_proportions(name: str, value: object, like: object) -> None:
    """``y_hat`` / ``p_hat``: floating-point ``(B, C)`` class proportions (shaped like ``like``), in [0, 1]."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point (B, C) tensor of class proportions, got {type_or_dtype(value)}")
    if value.ndim != 2 or value.numel() == 0:
        raise ValueError(f"{name}: expected a (B, C) tensor with B, C >= 1, got shape {tuple(value.shape)}")
    if value.shape != like.shape:
        raise ValueError(f"{name}: expected the shape of y_hat {tuple(like.shape)}, got shape {tuple(value.shape)}")
    check_range(value, f"{name}: expected class proportions in [0, 1]", lambda lo, hi: (lo >= 0) & (hi <= 1))


def _check_valid(valid: object, batch: int) -> None:
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid: expected None or a ({batch},) bool tensor, got {type_or_dtype(valid)}")
    if valid.shape != (batch,):
        raise ValueError(f"valid: expected shape ({batch},) (one per image of y_hat), got shape {tuple(valid.shape)}")


def _check_kl_knee(kl_knee, penalty):
    kl_knee = check_scalar("kl_knee", kl_knee)
    if kl_knee > 1:
        raise ValueError(f"kl_knee: expected a fraction of the true proportion in [0, 1], got {kl_knee!r}")
    if kl_knee and penalty != "kl":
        raise ValueError(f"kl_knee: expected 0 with penalty {penalty!r} (the knee continues the KL's log), got {kl_knee!r}")
    return kl_knee


def _guarded_log(p, y, kl_knee):
    """``log p`` for the KL's ``y log p``: floored at 1e-8 (kl_knee 0), or continued along its tangent
    below the knee ``kl_knee * y`` (itself at least 1e-8)."""
    if not kl_knee:
        return p.clamp_min(_LOG_FLOOR).log()
    knee = (kl_knee * y).clamp_min(_LOG_FLOOR)
    # the clamp keeps the branch torch.where leaves out finite: log(0)'s gradient there would turn 0 into NaN
    return torch.where(p >= knee, p.clamp_min(_LOG_FLOOR).log(), knee.log() + (p - knee) / knee)


def _marginal_penalty(y_hat, p_hat, penalty, activation, valid, kl_knee):
    if penalty == "l1":
        per_image = (y_hat - p_hat).abs().mean(1)
    elif penalty == "kl":
        per_image = (torch.xlogy(y_hat, y_hat) - y_hat * _guarded_log(p_hat, y_hat, kl_knee)).sum(1)
        if activation == "sigmoid":
            rest_y, rest_p = 1 - y_hat, 1 - p_hat
            per_image = per_image + (torch.xlogy(rest_y, rest_y) - rest_y * _guarded_log(rest_p, rest_y, kl_knee)).sum(1)
    else:  # dice_bias
        per_image = (p_hat + y_hat).clamp_min(_LOG_FLOOR).log().mean(1)
    return per_image.mean() if valid is None else masked_mean(per_image, valid)


def _check_label_marginal_options(penalty, lam, tau, activation, kl_knee):
    check_option("penalty", penalty, PENALTIES)
    check_option("activation", activation, ACTIVATIONS)
    lam = DEFAULT_LAMBDA[penalty] if lam is None else check_scalar("lam", lam)
    return lam, check_scalar("tau", tau, positive=True), _check_kl_knee(kl_knee, penalty)


def label_marginal_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    penalty: str = "l1",
    lam: Optional[float] = None,
    tau: float = 10.0,
    activation: str = "softmax",
    ignore_label: Optional[int] = None,
    kl_knee: float = 0.0,
) -> torch.Tensor:
    r"""Cross-entropy plus a label-marginal penalty (Liu et al., eq. 5): :math:`CE + λ R(\hat y, \hat p)`.

    Per image b and class c, over the counted voxels only (:math:`n_b` of them):

    .. math::
        \hat y_{b,c} = \frac{1}{n_b}\sum_i y_{b,c,i}, \qquad
        \hat p_{b,c} = \frac{1}{n_b}\sum_i \mathrm{softmax}(τ x)_{b,c,i}

    (temperature τ only for :math:`\hat p`, paper App. C, τ = 10; background included). :math:`R` is
    :func:`marginal_penalty` (``"l1"``, ``"kl"`` or ``"dice_bias"``, the paper's DiceBiasCE).
    ``lam=None`` takes the paper's tuned weights: 1.0 for l1, 0.1 for kl, and 0.01 for dice_bias
    (its accuracy dropped for λ ≥ 0.1). Images with no counted voxel are left out of the penalty.
    ``kl_knee`` (``"kl"`` only): see :func:`marginal_penalty`; 0, the default, is the paper's KL.

    CE is nnU-Net's: the mean over counted voxels of the cross-entropy of the logits (softmax,
    equal to ``RobustCrossEntropyLoss`` with the ignore label), or of binary cross-entropy with
    logits over voxels and regions (sigmoid). With ``lam=0`` the loss is exactly that CE. (With
    regions *and* a mask, nnU-Net's ``DC_and_BCE_loss`` divides the masked sum over all regions by the
    voxel count only, C times the mean it takes without a mask; we take the mean in both cases.)
    Range: :math:`[0, \infty)` for l1 and kl.

    Example:
        >>> x = torch.zeros(1, 2, 1, 2)                      # s = 0.5: CE = log 2, p̂ = (0.5, 0.5)
        >>> y = torch.tensor([[[[0, 0]]]])                   # ŷ = (1, 0): L1 = (0.5 + 0.5) / 2
        >>> round(float(label_marginal_loss(x, y)), 4), round(0.6931 + 0.5, 4)
        (1.1931, 1.1931)
    """
    lam, tau, kl_knee = _check_label_marginal_options(penalty, lam, tau, activation, kl_knee)
    return _label_marginal(x, y, loss_mask, penalty, lam, tau, activation, ignore_label, kl_knee)


def _label_marginal(x, y, loss_mask, penalty, lam, tau, activation, ignore_label, kl_knee):
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    mask = prepared.mask
    softmax = activation == "softmax"
    keep = torch.is_grad_enabled() and x.requires_grad  # inside the Function grad mode is always off
    ce_sum, sharpened_sums = _CrossEntropyAndMarginals.apply(
        x, prepared.labels, prepared.target, mask, softmax, None if lam == 0 else tau, keep)
    regions = 1 if softmax else x.shape[1]  # sigmoid: mean over voxels and regions
    if mask is None:
        ce = ce_sum / (x.shape[0] * x[0, 0].numel() * regions)
    else:
        ce = ce_sum / (mask.sum().clamp_min(1) * regions)
    if lam == 0:
        return ce

    if mask is not None:
        counted = spatial_sum(mask)  # (B, 1)
    else:
        counted = torch.full((x.shape[0], 1), float(x[0, 0].numel()), dtype=prepared.dtype, device=x.device)
    valid = counted[:, 0] > 0
    counted = counted.clamp_min(1)
    p_hat = sharpened_sums / counted
    y_hat = overlap_sums_ground_truth(prepared, x.shape[1]) / counted
    return ce + lam * _marginal_penalty(y_hat, p_hat, penalty, activation, valid, kl_knee)


# The sharpened probabilities are computed slice by slice along the voxels (kept for the backward when
# a gradient is wanted, recomputed otherwise): on the CPU a slice of about this many elements (16 MiB
# in float32, a few slices per batch) is measured fastest -- smaller ones multiply the operator calls,
# larger ones miss the cache and page-fault fresh memory. Elsewhere (CUDA) four slices keep the
# temporaries at a quarter of the logits; torch.compile sees one slice.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(x: torch.Tensor, voxels: int):
    if torch.compiler.is_compiling():
        length = voxels
    elif x.device.type != "cpu":  # four slices: the slices' temporaries stay small, launches few
        length = -(-voxels // 4)
    else:
        length = _CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1])
    length = max(1, length)
    return [slice(start, min(start + length, voxels)) for start in range(0, voxels, length)]


def _needs_shift(tau: float, channels: int, dtype: torch.dtype) -> bool:
    """Whether ``exp(τ log s)`` needs the shift by its channel maximum: ``log s <= 0`` cannot overflow,
    and the largest ``log s`` of a voxel is at least ``-log C``, so the largest term is at least
    ``C^-τ``, far above the denormals (``sqrt(tiny)``) unless τ log C is large (> 43 in float32)."""
    return tau * math.log(channels) > -0.5 * math.log(torch.finfo(dtype).tiny)


def _sharpened(log_probs: torch.Tensor, tau: float, shift: bool) -> torch.Tensor:
    """``softmax(τ x) = softmax(τ log s)`` from a slice of log-probabilities ``log s`` (log s differs
    from x by a per-voxel constant, which softmax ignores), in four in-place passes on one new tensor:
    ``torch.softmax`` over the channel axis of such a voxel slice (strided) took 4x longer on the CPU."""
    q = torch.mul(log_probs, tau)
    if torch.is_grad_enabled():  # retraced for a double backward: out of place, as autograd needs
        return torch.softmax(q, 1)
    if shift:
        q.sub_(q.amax(1, keepdim=True))
    exp_flushing_subnormals_(q)
    return q.div_(q.sum(1, keepdim=True))


def exp_flushing_subnormals_(t: torch.Tensor) -> torch.Tensor:
    """``t.exp_()`` with the results below the smallest normal number (2^-126 in float32) set to 0.

    On the CPU, ``exp`` of an argument whose result is subnormal or 0 (< -87.34 in float32) leaves the
    vectorised kernel for a scalar path, about 20x slower for its whole vector, and the subnormal
    results slow every later multiply by q (4x for ``addcmul_``); ``τ log s`` is often that small
    (s < 1.6e-4 with τ = 10: 3 % of the elements of 3·N(0, 1) logits). Flushing them changes each
    q by less than 2^-126 before normalisation (the normaliser is at least C^-τ, see
    :func:`_needs_shift`), far below what any sum of the loss resolves."""
    floor, at_floor = _exp_floor(t.dtype)
    t.clamp_min_(floor).exp_()
    return F.threshold_(t, at_floor, 0.0)  # every result <= at_floor (< 1.0002 x the smallest normal) is 0


@functools.lru_cache(maxsize=None)
def _exp_floor(dtype: torch.dtype) -> Tuple[float, float]:
    """An argument just above log(smallest normal) of ``dtype`` (the vectorised exp's own cut-off lies
    within a few ulps of it, so a margin of 1e-4 keeps clear of it), and its exp in ``dtype``."""
    floor = torch.tensor(math.log(torch.finfo(dtype).tiny) + 1e-4, dtype=dtype)
    return floor.item(), floor.exp().item()


class _CrossEntropyAndMarginals(torch.autograd.Function):
    r"""The cross-entropy sum and the per-(b, c) sums of the sharpened probabilities, straight from the
    logits, with a closed-form backward.

    Returns ``Σ_i m_i CE_i`` (a scalar; sigmoid: summed over regions too) and ``Σ_i m_i q_{b,c,i}`` with
    :math:`q = \mathrm{softmax}(τ x)` (sigmoid: :math:`σ(τ x)`), or None when ``tau`` is None. With
    :math:`s` = softmax(x) (sigmoid: σ(x)), incoming gradients :math:`g^{CE}` and :math:`g_{b,c}`:

    * softmax: :math:`∂/∂x_c = g^{CE} m (s_c Σ_k t_k - t_c) + τ m q_c (g_c - Σ_k g_k q_k)`
      (:math:`Σ_k t_k = 1` and :math:`t_c = [c = l]` for a label map l);
    * sigmoid: :math:`∂/∂x_c = g^{CE} m (s_c - t_c) + τ m g_c q_c (1 - q_c)`.

    When the logits will need a gradient (``keep``) the forward keeps the log-probabilities
    (``log_softmax``, as ``F.cross_entropy``) and :math:`q = \mathrm{softmax}(τ \log s)`, which it
    computes from them slice by slice; the backward turns the log-probabilities into the gradient in
    place and frees each slice of q once used (two logits-sized tensors at the peak, against three for
    nnU-Net's CE). A second backward (``retain_graph``) recomputes both from the saved logits; under
    ``create_graph=True`` the backward differentiates the forward retraced with autograd (exact second
    derivatives, :func:`~._autograd.differentiable_gradient`). Sigmoid
    keeps nothing: the backward writes σ(x) into the gradient. Label maps are gathered /
    scatter-added, never one-hot.
    """

    @staticmethod
    def forward(ctx, x, labels, target, mask, softmax: bool, tau: Optional[float], keep: bool):
        ctx.set_materialize_grads(False)
        keep = keep and not torch.compiler.is_compiling()
        with torch.autocast(x.device.type, enabled=False):  # sums stay float32 under autocast
            ce, sums, log_probs, kept_sharpened = _ce_and_marginals(x, labels, target, mask, softmax, tau, keep)
        ctx.save_for_backward(x, labels, target, mask)
        ctx.softmax, ctx.tau = softmax, tau
        # attributes, not saved tensors: the backward consumes them in place
        ctx.log_probs = log_probs if keep else None
        ctx.sharpened = kept_sharpened if keep and sums is not None and softmax else None
        return ce, sums

    @staticmethod
    def backward(ctx, grad_ce, grad_sums):
        if torch.is_grad_enabled():  # create_graph=True: a gradient with second derivatives
            x, labels, target, mask = ctx.saved_tensors
            ctx.log_probs = ctx.sharpened = None
            grad = differentiable_gradient(
                lambda x: _ce_and_marginals(x, labels, target, mask, ctx.softmax, ctx.tau, keep=False)[:2],
                x, (grad_ce, grad_sums))
            return grad, None, None, None, None, None, None
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _CrossEntropyAndMarginals._backward(ctx, grad_ce, grad_sums)

    @staticmethod
    def _backward(ctx, grad_ce, grad_sums):
        x, labels, target, mask = ctx.saved_tensors
        dtype = compute_dtype(x)
        batch, channels = x.shape[:2]
        voxels = x[0, 0].numel()
        tau = ctx.tau
        weights = None if mask is None else mask.reshape(batch, 1, voxels).to(dtype)
        flat_target = None if target is None else target.reshape(batch, channels, voxels)
        # g^CE m: () or (B, 1, N); τ g: (B, C, 1)
        scale = None if grad_ce is None else grad_ce.to(dtype) if weights is None else grad_ce.to(dtype) * weights
        tau_g = None if grad_sums is None or tau is None else grad_sums.to(dtype).unsqueeze(-1) * tau
        if ctx.softmax:
            grad, ctx.log_probs = ctx.log_probs, None  # the forward's log-probabilities, used up here
            sharpened, ctx.sharpened = ctx.sharpened, None  # and its slices of q
            if grad is None:  # not kept (no_grad forward, torch.compile) or a second backward
                grad = torch.log_softmax(x, 1, dtype=dtype).reshape(batch, channels, voxels)
            _softmax_backward(grad, sharpened, x, labels, flat_target, weights, scale, tau_g, tau)
        else:
            grad = torch.empty((batch, channels, voxels), dtype=dtype, device=x.device)
            _sigmoid_backward(grad, x, flat_target, weights, scale, tau_g, tau)
        return grad.view(x.shape).to(x.dtype), None, None, None, None, None, None


def _ce_and_marginals(x, labels, target, mask, softmax, tau, keep):
    """The forward of :class:`_CrossEntropyAndMarginals`: ``(Σ m CE, Σ m q (B, C) or None,
    log-probabilities or None, the slices of q or None)``; differentiable by autograd when grad mode
    is on (the double backward retraces it)."""
    batch, channels = x.shape[:2]
    voxels = x[0, 0].numel()
    weights = None if mask is None else mask.reshape(batch, 1, voxels).to(compute_dtype(x))
    sums = None if tau is None else x.new_zeros((batch, channels, 1), dtype=compute_dtype(x))  # added to in place
    log_probs = kept_sharpened = None
    if softmax:
        ce, log_probs, kept_sharpened = _softmax_forward(x, labels, target, weights, sums, tau, keep)
    else:
        ce = _sigmoid_forward(x, target, weights, sums, tau)
    return ce, None if sums is None else sums[..., 0], log_probs, kept_sharpened


def _softmax_forward(x, labels, target, weights, sums, tau, keep):
    """Softmax half of :class:`_CrossEntropyAndMarginals`' forward: ``Σ m CE`` and, into ``sums``,
    ``Σ m q`` slice by slice; returns ``(ce, log-probabilities (B, C, N), the slices of q or None)``."""
    dtype = compute_dtype(x)
    batch, channels = x.shape[:2]
    voxels = x[0, 0].numel()
    shift = tau is not None and _needs_shift(tau, channels, dtype)
    kept_sharpened = [] if keep else None  # the slices of q, for the backward (no third exp pass)
    log_probs = torch.log_softmax(x, 1, dtype=dtype).reshape(batch, channels, voxels)
    if labels is not None:
        voxel_ce = log_probs.gather(1, labels.reshape(batch, 1, voxels))  # log s at the label
    else:
        voxel_ce = channel_dot(log_probs, target.reshape(batch, channels, voxels).to(dtype))
    ce = -(voxel_ce if weights is None else voxel_ce.mul_(weights)).sum()
    if sums is not None:
        for part in _chunks(x, voxels):
            q = _sharpened(log_probs[..., part], tau, shift)
            if kept_sharpened is not None:
                kept_sharpened.append(q)
            if weights is None:
                sums.add_(q.sum(-1, keepdim=True))
            else:
                sums.baddbmm_(q, weights[..., part].transpose(1, 2))
    return ce, log_probs, kept_sharpened


def _sigmoid_forward(x, target, weights, sums, tau):
    """Sigmoid half of :class:`_CrossEntropyAndMarginals`' forward: ``Σ m BCE`` over voxels and regions
    and, into ``sums``, ``Σ m σ(τ x)``, slice by slice."""
    dtype = compute_dtype(x)
    batch, channels = x.shape[:2]
    voxels = x[0, 0].numel()
    logits = x.reshape(batch, channels, voxels)
    flat_target = target.reshape(batch, channels, voxels)
    ce_parts = []
    for part in _chunks(x, voxels):
        z = logits[..., part].to(dtype)
        m = None if weights is None else weights[..., part]
        voxel_ce = F.binary_cross_entropy_with_logits(z, flat_target[..., part].to(dtype), reduction="none")
        ce_parts.append(voxel_ce.sum() if m is None else torch.einsum("bcn,bon->", voxel_ce, m))
        if sums is not None:
            q = torch.mul(z, tau).sigmoid_()
            sums.add_(q.sum(-1, keepdim=True) if m is None else torch.bmm(q, m.transpose(1, 2)))
    return torch.stack(ce_parts).sum() if ce_parts else x.new_zeros((), dtype=dtype)


def _softmax_backward(grad, sharpened, x, labels, flat_target, weights, scale, tau_g, tau):
    """Softmax half of the backward, slice by slice, written into ``grad`` (which holds the
    log-probabilities on entry): ``g^CE m (s Σ_k t_k - t) + τ m q (g - Σ_k g_k q_k)``."""
    dtype = grad.dtype
    batch, channels, voxels = grad.shape
    if labels is not None:
        flat_labels = labels.reshape(batch, 1, voxels)
        at_label = None if scale is None else scale.neg().expand(flat_labels.shape)
    for index, part in enumerate(_chunks(x, voxels)):
        out = grad[..., part]
        m = None if weights is None else weights[..., part]
        step = None if scale is None or scale.ndim == 0 else scale[..., part]
        if tau_g is not None:  # τ m q (g - Σ_k g_k q_k), from the log-probabilities still in `out`
            if sharpened is not None:
                q, sharpened[index] = sharpened[index], None  # freed slice by slice
            else:
                q = _sharpened(out, tau, _needs_shift(tau, channels, dtype))
            mean = channel_dot(q, tau_g)  # τ Σ_k g_k q_k, (B, 1, n): a bmm with one row ran 3x slower on the CPU
            if m is not None:
                q.mul_(m)
        if scale is None:
            out.zero_()
        elif labels is not None:  # g^CE m (s - onehot)
            out.exp_().mul_(scale if step is None else step)
            out.scatter_add_(1, flat_labels[..., part], at_label[..., part])
        else:  # g^CE m (s Σ_k t_k - t)
            t = flat_target[..., part].to(dtype)
            step = scale if step is None else step
            out.exp_().mul_(t.sum(1, keepdim=True).mul_(step)).addcmul_(t, step, value=-1)
        if tau_g is not None:
            out.addcmul_(q, tau_g).addcmul_(q, mean, value=-1)


def _sigmoid_backward(grad, x, flat_target, weights, scale, tau_g, tau):
    """Sigmoid half of the backward, slice by slice, written into ``grad``:
    ``g^CE m (σ(x) - t) + τ m g q (1 - q)``."""
    dtype = grad.dtype
    batch, channels, voxels = grad.shape
    logits = x.reshape(batch, channels, voxels)
    for part in _chunks(x, voxels):
        out = grad[..., part]
        m = None if weights is None else weights[..., part]
        step = None if scale is None or scale.ndim == 0 else scale[..., part]
        z = logits[..., part].to(dtype)
        if scale is None:
            out.zero_()
        else:  # g^CE m (σ(x) - t)
            torch.sigmoid(z, out=out)
            out.sub_(flat_target[..., part].to(dtype)).mul_(scale if step is None else step)
        if tau_g is not None:  # τ m g q (1 - q)
            q = torch.mul(z, tau).sigmoid_()
            q.addcmul_(q, q, value=-1)
            if m is not None:
                q.mul_(m)
            out.addcmul_(q, tau_g)


class LabelMarginalLoss(nn.Module):
    """Module form of :func:`label_marginal_loss`: ``CE + lam * R`` with ``R`` in ``"l1"``, ``"kl"``,
    ``"dice_bias"``."""

    def __init__(self, *, penalty: str = "l1", lam: Optional[float] = None, tau: float = 10.0,
                 activation: str = "softmax", ignore_label: Optional[int] = None, kl_knee: float = 0.0):
        super().__init__()
        self.lam, self.tau, self.kl_knee = _check_label_marginal_options(penalty, lam, tau, activation, kl_knee)
        self.penalty = penalty
        self.activation = activation
        self.ignore_label = check_ignore_label(ignore_label)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _label_marginal(x, y, loss_mask, self.penalty, self.lam, self.tau, self.activation, self.ignore_label,
                               self.kl_knee)

    def extra_repr(self) -> str:
        knee = f", kl_knee={self.kl_knee}" if self.kl_knee else ""
        return f"penalty={self.penalty!r}, lam={self.lam}, tau={self.tau}{knee}, activation={self.activation!r}"
