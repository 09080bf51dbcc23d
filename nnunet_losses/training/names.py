"""Experiments by name: ``-tr <trainer>_<token>_<token>...`` is the whole record of an experiment.

nnU-Net saves every run under its trainer's name, so a name that spells the settings out keeps what
was run visible in every folder listing, and ``nnUNetv2_predict``, ``--c`` and
``nnUNetv2_export_model_to_zip`` find the same class again from that name alone. The grammar (one
token per setting, joined by single underscores: nnU-Net splits its folders on ``__``):

==================  ==========================  ===============================================
token               sets                        trainers
==================  ==========================  ===============================================
``a1.5``            ``a`` (mime weight on y)    those with the attribute (Mime)
``b0.2``            ``b``                       Mime
``eps1e-5``         ``epsilon``                 Dice (not DiceIEps: its ε is estimated), Marginal, Leaf
``bg0`` / ``bg1``   ``include_background``      Mime, NegativeMime, Dice, Marginal, Leaf
``sum`` / ``mean``  ``reduction``               Mime, NegativeMime
``cwfixed`` /       ``class_weights``: the      Mime, NegativeMime
``cwbalanced`` /    paper's a, b for every
``cwannealed``      class, balanced by the
                    class counts, or balanced
                    then annealed to fixed
``bramp0``          ``b_ramp``: epochs (as a    Mime
                    fraction) over which the
                    annealed mime's b
                    balancing factors ramp in
``countbatches20``  ``count_batches``           DiceIEps, Mime, NegativeMime
``lam0.5``          ``lam``                     CEL1, CEKL
``tau5``            ``tau``                     CEL1, CEKL
``knee0``           ``kl_knee``                 CEKL
``srcsqrt`` /       ``source_sampling``: cases  Marginal, Leaf
``srcuniform``      drawn per source of a
                    merged dataset
``sgd`` / ``adam``  the optimizer: nnU-Net's    every trainer (nnU-Net's own too)
/ ``adamw``         SGD, ``Adam`` or ``AdamW``
                    (amsgrad), as nnU-Net's
                    own variants configure them
``lr3e-4``          the initial learning rate   every trainer
``100ep``           epochs                      every trainer
``50it``            iterations per epoch (and   every trainer
                    it // 5 validation ones)
==================  ==========================  ===============================================

Per-class values separate their numbers with commas: ``a1.9,1,0.5``. ``adam``/``adamw`` start at
lr 1e-3 (nnU-Net's ``*1en3`` variants); ``sgd`` at nnU-Net's 1e-2. There is ONE name per
experiment: tokens stand in the order of the table, numbers in their shortest exact spelling
(``1e-5``, ``0.5``, ``100``), and a token that repeats the trainer's own value is left out; any other
spelling is refused with the canonical name. A name whose tokens do not resolve raises
:class:`TrainerNameError` saying which token and why, and what this trainer accepts.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .checkpoint import add_to_checkpoint

NAME_SETTINGS_CHECKPOINT_KEY = "name_settings"
SEPARATOR = "_"
NUMBER = r"\d+(?:\.\d+)?(?:e-?\d+)?"
NNUNET_DEFAULTS = {"optimizer": "sgd", "lr": 1e-2, "epochs": 1000, "iterations": 250}
# the learning rate each optimizer starts at: nnU-Net's SGD; its nnUNetTrainerVanillaAdam1en3 / nnUNetTrainerAdam1en3
OPTIMIZER_LR = {"sgd": 1e-2, "adam": 1e-3, "adamw": 1e-3}


class TrainerNameError(ValueError):
    """A trainer name whose tokens do not resolve: ``reason`` (which token, why) in one line, then the
    listing of what the trainer accepts (the message nnU-Net's commands show)."""

    def __init__(self, reason: str, trainer: type):
        self.reason = reason
        self.trainer = trainer
        super().__init__(f"{reason}. {trainer.__name__} accepts these tokens (joined by '_', in this order):\n"
                         f"{accepted_tokens(trainer)}")


@dataclass(frozen=True)
class Token:
    """One kind of token: ``prefix`` + a value, setting ``setting`` (a class attribute or a run setting)."""

    key: str  # the name of the setting in messages and records
    pattern: str  # the whole token as a regular expression with one group `value`
    parse: Callable[[str], object]
    spell: Callable[[object], str]  # the canonical token for a value
    attribute: Optional[str] = None  # the trainer's class attribute (hyperparameters), None for run settings
    describe: str = ""


def spell_number(value: float) -> str:
    """The shortest exact spelling of a number: ``1e-5``, ``3e-4``, ``0.5``, ``100`` (a tie: the decimal)."""
    decimal = np.format_float_positional(float(value), trim="-")
    scientific = np.format_float_scientific(float(value), trim="-", exp_digits=1).replace("e+", "e")
    return scientific if len(scientific) < len(decimal) else decimal


def _numbers(text: str):
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


def _spell_numbers(value) -> str:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return ",".join(spell_number(v) for v in values)


def _number_token(key: str, prefix: str, attribute: Optional[str], describe: str, per_class: bool = False) -> Token:
    value = rf"{NUMBER}(?:,{NUMBER})*" if per_class else NUMBER
    return Token(key, rf"{prefix}(?P<value>{value})", _numbers if per_class else float,
                 lambda v, p=prefix: p + (_spell_numbers(v) if per_class else spell_number(v)), attribute, describe)


def _word_token(key: str, words: tuple, attribute: Optional[str], describe: str) -> Token:
    return Token(key, rf"(?P<value>{'|'.join(words)})", str, str, attribute, describe)


# in canonical order: hyperparameters (class attributes), then the optimizer, its learning rate, the budget
TOKENS = (
    _number_token("a", "a", "a", "mime weight on the label (number or per class)", per_class=True),
    _number_token("b", "b", "b", "mime weight off the label (number or per class)", per_class=True),
    _number_token("epsilon", "eps", "epsilon", "Dice smoothing (number or per class)", per_class=True),
    Token("include_background", r"bg(?P<value>[01])", lambda v: v == "1", lambda v: f"bg{int(v)}",
          "include_background", "background term in the loss (0 or 1)"),
    _word_token("reduction", ("sum", "mean"), "reduction", "mime: paper's sum or per-voxel mean"),
    Token("class_weights", r"cw(?P<value>balanced|annealed|fixed)", str, lambda v: f"cw{v}", "class_weights",
          "mime weights: balanced by the class counts, annealed from balanced to fixed, or the same for every class (the paper's)"),
    _number_token("b_ramp", "bramp", "b_ramp", "annealed mime: fraction of the epochs over which b's balancing factors "
                                               "ramp in (0: balanced from the start)"),
    Token("count_batches", r"countbatches(?P<value>\d+)", int, lambda v: f"countbatches{v}", "count_batches",
          "batches the class counts (heuristic epsilon, balanced mime weights) are estimated from"),
    _number_token("lam", "lam", "lam", "weight of the label-marginal penalty"),
    _number_token("tau", "tau", "tau", "temperature of the predicted proportions"),
    _number_token("kl_knee", "knee", "kl_knee", "CE + KL: the KL's log continued along its tangent below this "
                                                "fraction of the true proportion (0: the paper's KL)"),
    Token("source_sampling", r"src(?P<value>sqrt|uniform)", str, lambda v: f"src{v}", "source_sampling",
          "training cases drawn per source of a merged dataset: n^-1/2 or 1/n per case"),
    _word_token("optimizer", ("sgd", "adamw", "adam"), None, "nnU-Net's SGD, Adam or AdamW (amsgrad)"),
    _number_token("lr", "lr", None, "initial learning rate (poly schedule)"),
    Token("epochs", r"(?P<value>\d+)ep", int, lambda v: f"{v}ep", None, "epochs"),
    Token("iterations", r"(?P<value>\d+)it", int, lambda v: f"{v}it", None, "training iterations per epoch"),
)
TOKEN_BY_KEY = {token.key: token for token in TOKENS}


def match_token(text: str) -> Optional[tuple[Token, object]]:
    """``(kind, value)`` of a token's text, None when it is no token of the grammar."""
    for token in TOKENS:
        found = re.fullmatch(token.pattern, text)
        if found:
            return token, token.parse(found["value"])
    return None


def applicable(token: Token, trainer: type) -> bool:
    """Whether ``trainer`` takes the token: run settings always; a hyperparameter when the trainer has it
    (and its value is not computed by the trainer, as the heuristic epsilon is)."""
    if token.attribute is None:
        return True
    if token.attribute in getattr(trainer, "_estimated_attributes", ()):
        return False
    return hasattr(trainer, token.attribute)


def current_values(trainer: type) -> dict:
    """The value each applicable token has on ``trainer`` now (run settings: nnU-Net's defaults when the
    trainer keeps nnU-Net's ``__init__`` and optimizer, else None = set by the trainer)."""
    keeps_init = all("__init__" not in vars(cls) for cls in trainer.__mro__[:trainer.__mro__.index(nnUNetTrainer)]
                     if cls is not OwnOptimizer)
    own = getattr(trainer, "optimizer_name", None)  # an OwnOptimizer's; else SGD where nnU-Net's is kept
    optimizer = own or ("sgd" if trainer.configure_optimizers is nnUNetTrainer.configure_optimizers else None)
    values = {}
    for token in TOKENS:
        if not applicable(token, trainer):
            continue
        if token.attribute is not None:
            values[token.key] = getattr(trainer, token.attribute)
        elif token.key == "optimizer":
            values[token.key] = optimizer
        elif token.key == "lr" and own is not None:
            values[token.key] = OPTIMIZER_LR[own] if keeps_init else None
        else:
            values[token.key] = NNUNET_DEFAULTS[token.key] if keeps_init else None
    return values


def optimizer_defaults(settings: dict) -> dict:
    """What a named optimizer brings along: its learning rate (Adam / AdamW: nnU-Net's ``*1en3`` variants' 1e-3,
    SGD: nnU-Net's 1e-2)."""
    return {"lr": OPTIMIZER_LR[settings["optimizer"]]} if "optimizer" in settings else {}


def resolved_values(trainer: type, settings: dict) -> dict:
    """Every applicable token's value once ``settings`` are applied to ``trainer``."""
    return {**current_values(trainer), **optimizer_defaults(settings), **settings}


def accepted_tokens(trainer: type) -> str:
    """What ``trainer`` accepts, with its current values: the listing of every refusal."""
    values = current_values(trainer)
    lines = []
    for token in TOKENS:
        if token.key not in values:
            continue
        value = values[token.key]
        set_by_trainer = value is None and token.attribute is None  # a run setting the trainer itself sets
        now = "set by the trainer" if set_by_trainer else f"now {_spell_value(value)}"
        lines.append(f"  {token_form(token):<18} {token.describe} ({now})")
    return "\n".join(lines)


def token_form(token: Token) -> str:
    """The token's form for people: ``a<v>``, ``bg0|bg1``, ``<E>ep``."""
    forms = {"include_background": "bg0|bg1", "reduction": "sum|mean", "optimizer": "sgd|adam|adamw",
             "epochs": "<E>ep", "iterations": "<I>it", "count_batches": "countbatches<N>",
             "class_weights": "cwbalanced|cwannealed|cwfixed",
             "source_sampling": "srcsqrt|srcuniform"}
    if token.key in forms:
        return forms[token.key]
    prefix = token.pattern.split("(?P<value>")[0]
    return f"{prefix}<v>"


def _spell_value(value) -> str:
    """A current value as the listing shows it: counts as integers (1000 epochs, not 1e3), other numbers
    in their shortest spelling, flags as 0/1, per-class values comma-separated."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return spell_number(value)
    if isinstance(value, (tuple, list)):
        return ",".join(spell_number(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class ResolvedName:
    """A trainer name split into the trainer nnU-Net finds and the settings its tokens give."""

    name: str
    base: type
    settings: dict  # token key -> value, in canonical order

    @property
    def hyperparameters(self) -> dict:
        return {TOKEN_BY_KEY[k].attribute: v for k, v in self.settings.items() if TOKEN_BY_KEY[k].attribute}

    def record(self) -> dict:
        """What the name stands for, as written to the log, ``debug.json`` and the checkpoint."""
        values = resolved_values(self.base, self.settings)
        return {"trainer": self.name, "base": self.base.__name__,
                "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}}


def canonical_name(base_name: str, settings: dict) -> str:
    return SEPARATOR.join([base_name] + [TOKEN_BY_KEY[k].spell(v) for k, v in settings.items()])


def _refuse(name: str, base: type, why: str) -> TrainerNameError:
    return TrainerNameError(f"{name}: {why}", base)


def unknown_token(text: str) -> str:
    """Why ``text`` is refused, with the token meant when it is one in another case (``3EP``, ``Adam``)."""
    return f"unknown token {text!r}" + (f" (did you mean {text.lower()!r}?)" if match_token(text.lower()) else "")


def parse_settings(name: str, base: type, texts: list) -> dict:
    """The settings of ``texts`` (the tokens after the base name), checked against ``base``."""
    found = {}
    for text in texts:
        matched = match_token(text)
        if matched is None:
            raise _refuse(name, base, unknown_token(text))
        token, value = matched
        if not applicable(token, base):
            raise _refuse(name, base, f"token {text!r}: {base.__name__} has no setting {token.key!r}")
        if token.key in found:
            raise _refuse(name, base, f"token {text!r}: {token.key} is set twice")
        if token.key in ("epochs", "iterations", "count_batches") and value < 1:
            raise _refuse(name, base, f"token {text!r}: expected {token.key} >= 1, got {value}")
        if token.key in ("lr", "tau") and value <= 0:
            raise _refuse(name, base, f"token {text!r}: expected {token.key} > 0, got {value}")
        if token.key == "kl_knee" and value > 1:
            raise _refuse(name, base, f"token {text!r}: expected kl_knee <= 1 (a fraction), got {value}")
        found[token.key] = value
    return found


def canonical_settings(name: str, base: type, found: dict) -> dict:
    """``found`` in canonical order; refuses a spelling that is not the one name of its experiment."""
    settings = {k: found[k] for k in TOKEN_BY_KEY if k in found}
    now = {**current_values(base), **optimizer_defaults(settings)}
    redundant = [k for k, v in settings.items() if now.get(k) is not None and _same(now[k], v)]
    canonical = canonical_name(base.__name__, {k: v for k, v in settings.items() if k not in redundant})
    if redundant:
        raise _refuse(name, base, f"{', '.join(redundant)} {'is' if len(redundant) == 1 else 'are'} "
                                  f"{base.__name__}'s own value already: the name of this experiment is {canonical}")
    if canonical != name:
        raise _refuse(name, base, f"expected the one name of this experiment, {canonical} (tokens in the "
                                  f"table's order, numbers in their shortest spelling)")
    return settings


def _same(current, value) -> bool:
    if isinstance(current, (tuple, list)) or isinstance(value, (tuple, list)):
        return False  # a per-class value is never the scalar default
    return current == value


def find_trainer(name: str) -> Optional[type]:
    """The trainer nnU-Net finds under ``name`` (its own folder, then ``nnUNet_extTrainer``), or None."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates every lookup
        try:
            found = recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            return None
    return found


def resolve_name(name: str, find: Callable[[str], Optional[type]] = find_trainer, known: tuple = ()) -> ResolvedName:
    """Split ``name`` into the trainer nnU-Net knows and the settings of the tokens after it.

    The tokens are the longest run of grammar tokens at the end of the name; the rest must be a
    trainer nnU-Net finds. Raises AttributeError (nnU-Net then looks elsewhere) when no part of the
    name is a known trainer, and :class:`TrainerNameError` when one is but its tokens do not resolve,
    or when the name's trainer is one of ``known`` in another case (names are case-sensitive).
    """
    parts = name.split(SEPARATOR)
    if "" in parts:
        raise AttributeError(f"{name!r} is not a trainer name with tokens (<trainer>_<token>...)")
    _refuse_another_case(name, parts, find, known)
    if len(parts) < 2:
        raise AttributeError(f"{name!r} is not a trainer name with tokens (<trainer>_<token>...)")
    first_token = len(parts)  # the longest run of tokens at the end of the name starts here
    while first_token > 1 and match_token(parts[first_token - 1]) is not None:
        first_token -= 1
    # the trainer is the longest prefix nnU-Net knows (its nnUNetTrainer_onlyMirror01_1500ep ends in a token)
    for end in range(len(parts) - 1, first_token - 1, -1):
        base = _find_base(find, SEPARATOR.join(parts[:end]))
        if base is not None:
            settings = canonical_settings(name, base, parse_settings(name, base, parts[end:]))
            return ResolvedName(name, base, settings)
    for end in range(first_token - 1, 0, -1):  # a known trainer followed by something that is no token?
        known = _find_base(find, SEPARATOR.join(parts[:end]))
        if known is not None:
            raise _refuse(name, known, unknown_token(parts[end]))
    raise AttributeError(f"{name!r}: no known trainer, with or without tokens after it")


def _refuse_another_case(name: str, parts: list, find: Callable[[str], Optional[type]], known: tuple) -> None:
    """A name whose trainer part is a ``known`` name in another case: say so, rather than "not found"."""
    by_case = {k.lower(): k for k in known}
    for end in range(len(parts), 0, -1):
        prefix = SEPARATOR.join(parts[:end])
        meant = by_case.get(prefix.lower())
        if meant is not None and meant != prefix:
            trainer = _find_base(find, meant)
            if trainer is not None:
                raise TrainerNameError(f"{name}: no trainer named {prefix!r} (did you mean {meant!r}? trainer names "
                                       "are case-sensitive)", trainer)


_LOOKING_UP_BASE = []  # non-empty while resolve_name looks a base up: names with tokens are no base


def _find_base(find: Callable[[str], Optional[type]], name: str) -> Optional[type]:
    _LOOKING_UP_BASE.append(name)
    try:
        return find(name)
    finally:
        _LOOKING_UP_BASE.pop()


def validation_iterations(iterations: int) -> int:
    """Validation batches per epoch for I training iterations: nnU-Net's ratio (250 : 50), at least 1."""
    return max(1, iterations // 5)


def _optimizers() -> dict:
    """``configure_optimizers`` of nnU-Net's own trainers, per optimizer token (nothing rewritten)."""
    from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import (
        nnUNetTrainerAdam,
        nnUNetTrainerVanillaAdam,
    )

    return {"sgd": nnUNetTrainer.configure_optimizers, "adam": nnUNetTrainerVanillaAdam.configure_optimizers,
            "adamw": nnUNetTrainerAdam.configure_optimizers}


def build_trainer(resolved: ResolvedName) -> type:
    """The subclass of ``resolved.base`` that the name stands for, named by it.

    Hyperparameters become class attributes (what the trainers' ``_build_loss`` reads); epochs,
    iterations and learning rate are set after nnU-Net's ``__init__``; the optimizer is nnU-Net's own
    variant's ``configure_optimizers``. The settings are the class attribute ``name_settings``, and are
    written to the log, ``debug.json`` and every checkpoint.
    """
    base, settings, record = resolved.base, resolved.settings, resolved.record()
    lr = record["settings"].get("lr")  # None: the trainer sets its own learning rate

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        if "epochs" in settings:
            self.num_epochs = settings["epochs"]
        if "iterations" in settings:
            self.num_iterations_per_epoch = settings["iterations"]
            self.num_val_iterations_per_epoch = validation_iterations(settings["iterations"])
        if lr is not None:
            self.initial_lr = lr

    def on_train_start(self):
        base.on_train_start(self)
        self.print_to_log_file(f"Settings of the trainer name {resolved.name}: {record['settings']}")

    def save_checkpoint(self, filename: str) -> None:
        base.save_checkpoint(self, filename)
        add_to_checkpoint(self, filename, NAME_SETTINGS_CHECKPOINT_KEY, record)

    # name_settings: a class attribute, so debug.json (nnU-Net dumps every attribute) and `trainers NAME` see it
    attributes = dict(resolved.hyperparameters, name_settings=record, __init__=__init__, on_train_start=on_train_start,
                      save_checkpoint=save_checkpoint, __module__=base.__module__,
                      __doc__=f"{base.__name__} with {record['settings']} (from its name; see nnunet_losses.training.names).")
    if "optimizer" in settings:
        attributes["configure_optimizers"] = _optimizers()[settings["optimizer"]]
        if issubclass(base, OwnOptimizer):
            attributes["optimizer_name"] = settings["optimizer"]
    return type(resolved.name, (base,), attributes)


class OwnOptimizer(nnUNetTrainer):
    """A trainer whose default optimizer is its paper's, not nnU-Net's SGD: ``optimizer_name`` names one of
    nnU-Net's own configurations, as the optimizer tokens do (``adam``: ``nnUNetTrainerVanillaAdam1en3``),
    starting at that configuration's learning rate. ``-tr <trainer>_sgd`` is nnU-Net's SGD at 1e-2."""

    optimizer_name = "sgd"  # not `optimizer`: nnU-Net's __init__ sets self.optimizer (the torch optimizer) to None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.optimizer_name not in OPTIMIZER_LR:
            raise ValueError(f"{type(self).__name__}.optimizer_name: expected one of {tuple(OPTIMIZER_LR)}, "
                             f"got {self.optimizer_name!r}")
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = OPTIMIZER_LR[self.optimizer_name]

    def configure_optimizers(self):
        return _optimizers()[self.optimizer_name](self)


_BUILT: dict = {}


def trainer_from_name(name: str, find: Callable[[str], Optional[type]] = find_trainer, known: tuple = ()) -> type:
    """The trainer class of a name with tokens (built once per name and process); ``find`` looks the
    trainer part of the name up, ``known`` names are suggested for another case (see :func:`resolve_name`)."""
    if _LOOKING_UP_BASE:  # a base is a trainer of its own, never a name with tokens (one name per experiment)
        raise AttributeError(f"{name!r}: names with tokens are not looked up as the base of another name")
    if name not in _BUILT:
        _BUILT[name] = build_trainer(resolve_name(name, find, known))
    return _BUILT[name]


def short_run_name(trainer: str, epochs: int, iterations: int) -> str:
    """``<trainer>_<E>ep_<I>it``: the name of ``trainer``'s run of E epochs of I iterations."""
    return f"{trainer}{SEPARATOR}{epochs}ep{SEPARATOR}{iterations}it"


def trainer_with_settings(base: type, **settings) -> type:
    """The trainer of ``base`` with ``settings`` (token keys: ``a=1.5``, ``optimizer="adam"``, ``epochs=3``),
    built as its canonical name would be: ``trainer_with_settings(nnUNetTrainerMime, a=1.5, epochs=3)``
    is the class of ``nnUNetTrainerMime_a1.5_3ep``."""
    if not (isinstance(base, type) and issubclass(base, nnUNetTrainer)):
        raise TypeError(f"base: expected a subclass of nnUNetTrainer, got {base!r}")
    unknown = sorted(set(settings) - set(TOKEN_BY_KEY))
    if unknown:
        raise TypeError(f"settings: expected keys among {list(TOKEN_BY_KEY)}, got {unknown}")
    name = canonical_name(base.__name__, {k: settings[k] for k in TOKEN_BY_KEY if k in settings})
    return build_trainer(resolve_name(name, find=lambda candidate: base if candidate == base.__name__ else None))
