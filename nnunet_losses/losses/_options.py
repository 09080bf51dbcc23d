"""Option checks of every loss: one error grammar, ``name: expected …, got …`` (with a did-you-mean for
string options), applied once, in ``__init__`` or at the top of a pure function."""

from __future__ import annotations

import difflib
import numbers
from typing import Optional, Sequence, Union

import torch

ACTIVATIONS = ("softmax", "sigmoid")
PHIS = ("I", "CI", "BI", "BCI")

ClassValues = Union[float, Sequence[float], torch.Tensor]


def described(value: object) -> str:
    """A received value for a message, on one line: its type and repr (a tensor or array: type, dtype
    and shape; a long repr cut at 60 characters)."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def type_or_dtype(value: object) -> str:
    """What a check that wants a tensor of some dtype received: ``dtype …`` for a tensor, else the type."""
    return f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def check_option(name: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; raise a ValueError with a suggestion if not."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {list(allowed)}, got {described(value)}")
    if value not in allowed:
        # a case slip ("L1", "bi") is the commonest typo and difflib scores it too low to suggest
        close = [a for a in allowed if a.lower() == value.lower()] or difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}{hint}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {described(value)}")
    return value


def check_ignore_label(value: object) -> Optional[int]:
    """nnU-Net's ignore label: None or an integer label value (one a label map can hold, int64)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints (from plans) are fine
        raise TypeError(f"ignore_label: expected None or an int label value, got {described(value)}")
    _check_int64("ignore_label", value)
    return int(value)


def check_count(name: str, value: object) -> int:
    """A whole number >= 1 (numpy integers too): a number of classes or of subsets."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= 1, got {described(value)}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    _check_int64(name, value)
    return int(value)


def _check_int64(name: str, value: numbers.Integral) -> None:
    """Integers go into int64 tensors (label maps, sizes): a larger one would overflow there."""
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name}: expected an int in the range of int64, got {value!r}")


def check_optional_bool(name: str, value: object) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name}: expected None or a bool, got {described(value)}")
    return value


def check_scalar(name: str, value: object, *, positive: bool = False) -> float:
    """A finite non-negative (or strictly positive) real number (numpy scalars too), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {described(value)}")
    value = float(value)
    bad = not (value == value and abs(value) != float("inf")) or value < 0 or (positive and value == 0)
    if bad:
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{name}: expected {need}, got {value!r}")
    return value


def class_values(name: str, value: ClassValues) -> torch.Tensor:
    """A scalar or one value per class, as a float64 tensor of shape () or (C,); all values >= 0."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{name}: expected a real tensor, got dtype {value.dtype}")
        tensor = value.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        tensor = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # b"ab" is not [97, 98]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name}: expected a number or a sequence of numbers, got {value!r}")
        tensor = torch.tensor([float(v) for v in value], dtype=torch.float64)
    else:
        raise TypeError(f"{name}: expected a number, a sequence of numbers or a tensor, got {type(value).__name__}")
    if tensor.ndim > 1 or (tensor.ndim == 1 and tensor.numel() == 0):
        raise ValueError(f"{name}: expected a scalar or one value per class (shape (C,)), got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all() or (tensor < 0).any():
        raise ValueError(f"{name}: expected finite values >= 0, got {tensor.tolist()}")
    return tensor


def per_class(name: str, values: torch.Tensor, num_channels: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a () or (C,) buffer to (C,) in ``like``'s dtype/device, checking C."""
    if values.ndim == 1 and values.numel() != num_channels:
        raise ValueError(
            f"{name}: expected one value per channel of x ({num_channels}), got {values.numel()} values"
        )
    return values.to(device=like.device, dtype=like.dtype).expand(num_channels)



def check_phi_options(phi: object, epsilon: ClassValues, include_background: object, activation: object,
                      ddp: object) -> torch.Tensor:
    """The options of the Φ losses (Φ Dice, dynamic mime), checked together because ε depends on Φ: a
    per-class ε needs one subset per class (Φ = I or BI). Returns ε as :func:`class_values` gives it."""
    epsilon = class_values("epsilon", epsilon)
    check_option("phi", phi, PHIS)
    check_optional_bool("ddp", ddp)
    check_bool("include_background", include_background)
    check_option("activation", activation, ACTIVATIONS)
    if epsilon.ndim == 1 and phi in ("CI", "BCI"):
        raise ValueError(
            f"epsilon: expected a single number for phi={phi!r} (its subsets span all classes), "
            f"got {epsilon.numel()} per-class values; per-class epsilon works with phi='I' or 'BI'"
        )
    return epsilon
