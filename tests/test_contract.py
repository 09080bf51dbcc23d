"""docs/losses.md is the contract of the losses: this file fails when the page and the code drift.

* every public name (``nnunet_losses.__all__``) appears on the page;
* every line of the page's signature block (section "Public API") is the real signature: parameter
  names, order, kinds (positional or keyword-only) and defaults, compared with ``inspect.signature``;
  the block covers every public name and the ``forward`` of every public module;
* every trainer of ``nnunet_losses.trainers.TRAINER_NAMES`` has a row in the page's trainer table
  whose defaults are its class attributes, complete (every hyperparameter our classes define), whose
  loss is the one it builds, and whose "regions" column says whether it refuses region datasets.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import nnunet_losses

PAGE_PATH = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
PAGE = PAGE_PATH.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the ``## `` section whose heading contains ``title`` (up to the next ``## ``)."""
    match = re.search(rf"^## [^\n]*{re.escape(title)}[^\n]*\n(.*?)(?=^## |\Z)", PAGE, re.M | re.S)
    assert match, f"docs/losses.md: no section '## ... {title} ...'"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------
# public names
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", nnunet_losses.__all__)
def test_every_public_name_is_on_the_page(name):
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", PAGE), f"{name} (nnunet_losses.__all__) is not on docs/losses.md"


# ---------------------------------------------------------------------------------------------------
# the signature block
# ---------------------------------------------------------------------------------------------------
def signature_lines() -> list[str]:
    match = re.search(r"^```python\n(.*?)^```", section("Public API"), re.M | re.S)
    assert match, "docs/losses.md: the section 'Public API' has no ```python block of signatures"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


LINES = signature_lines()
LINE_PATTERN = re.compile(r"^(?P<target>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(?P<parameters>\(.*\))$")

POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
NO_DEFAULT = "<no default>"


def parse_line(line: str):
    """``name(params)`` or ``Class.method(params)`` -> (target, [(name, kind, default), ...])."""
    match = LINE_PATTERN.match(line)
    assert match, f"docs/losses.md signature line is not 'name(...)' or 'Class.method(...)': {line!r}"
    tree = ast.parse(f"def _{match['parameters']}: pass")
    arguments = tree.body[0].args
    assert not (arguments.posonlyargs or arguments.vararg or arguments.kwarg), f"unsupported syntax in {line!r}"
    positional_defaults = [NO_DEFAULT] * (len(arguments.args) - len(arguments.defaults)) + [
        ast.literal_eval(d) for d in arguments.defaults]
    parameters = [(a.arg, POSITIONAL, d) for a, d in zip(arguments.args, positional_defaults)]
    parameters += [(a.arg, KEYWORD_ONLY, NO_DEFAULT if d is None else ast.literal_eval(d))
                   for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    return match["target"], parameters


def resolve(target: str):
    owner, _, attribute = target.partition(".")
    assert owner in nnunet_losses.__all__, f"docs/losses.md documents {owner}, which is not in nnunet_losses.__all__"
    obj = getattr(nnunet_losses, owner)
    return getattr(obj, attribute) if attribute else obj


def real_parameters(obj) -> list:
    signature = inspect.signature(obj)
    parameters = list(signature.parameters.values())
    if inspect.isfunction(obj) and parameters and parameters[0].name == "self":  # Class.forward, unbound
        parameters = parameters[1:]
    return [(p.name, p.kind, NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
            for p in parameters]


def comparable(parameters):
    # type and value, so that True != 1 and 10 != 10.0 (the page must show the default as the code has it)
    return [(name, kind.name, type(default).__name__, default) for name, kind, default in parameters]


@pytest.mark.parametrize("line", LINES, ids=[parse_line(line)[0] for line in LINES])
def test_signature_line_is_the_real_signature(line):
    target, documented = parse_line(line)
    assert comparable(real_parameters(resolve(target))) == comparable(documented), (
        f"docs/losses.md says {line}\n"
        f"but the code has {target}{inspect.signature(resolve(target))}")


def test_the_block_covers_every_public_name_and_module_forward():
    targets = [parse_line(line)[0] for line in LINES]
    assert len(targets) == len(set(targets)), "docs/losses.md lists a signature twice"
    expected = set(nnunet_losses.__all__)
    expected |= {f"{name}.forward" for name in nnunet_losses.__all__ if isinstance(getattr(nnunet_losses, name), type)}
    assert set(targets) == expected, (
        f"missing from the page's block: {sorted(expected - set(targets))}; "
        f"on the page but not public: {sorted(set(targets) - expected)}")


# ---------------------------------------------------------------------------------------------------
# the trainer table
# ---------------------------------------------------------------------------------------------------
import nnunet_losses.trainers as trainers  # noqa: E402 (imports nnU-Net: kept below the loss checks)

TABLE_HEADER = "| trainer | loss | defaults (class attributes) | regions |"


def trainer_rows() -> dict:
    text = section("Trainers")
    assert TABLE_HEADER in text, f"docs/losses.md, section Trainers: no table with header {TABLE_HEADER!r}"
    rows = {}
    for line in text[text.index(TABLE_HEADER):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"trainer table row without 4 cells: {line!r}"
        name = re.fullmatch(r"`(\w+)`", cells[0])
        loss = re.match(r"`(\w+)`", cells[1])
        defaults = re.fullmatch(r"`([^`]*)`", cells[2])
        assert name and loss and defaults and cells[3] in ("yes", "no"), f"malformed trainer table row: {line!r}"
        call = ast.parse(f"_({defaults[1]})", mode="eval").body
        assert not call.args, f"defaults must be name=value pairs: {cells[2]!r}"
        assert name[1] not in rows, f"trainer {name[1]} has two rows"
        rows[name[1]] = {"loss": loss[1], "defaults": {k.arg: ast.literal_eval(k.value) for k in call.keywords},
                         "regions": cells[3] == "yes"}
    return rows


ROWS = trainer_rows()


def our_classes(trainer: type) -> list:
    """The classes of the trainer's MRO that this package defines (trainer modules and training/)."""
    return [klass for klass in trainer.__mro__ if klass.__module__.startswith("nnunet_losses")]


def hyperparameters(trainer: type) -> dict:
    """Every public, non-callable, non-None class attribute our classes define (None marks run state,
    e.g. ``heuristic_epsilon`` before the estimate), as the trainer resolves it."""
    names = {name for klass in our_classes(trainer) for name, value in vars(klass).items()
             if not name.startswith("_") and value is not None and not callable(value)
             and not isinstance(value, (property, classmethod, staticmethod))}
    return {name: getattr(trainer, name) for name in names}


def test_the_table_lists_exactly_the_trainers():
    assert list(ROWS) == list(trainers.TRAINER_NAMES), (
        "docs/losses.md's trainer table must list TRAINER_NAMES, in that order")


@pytest.mark.parametrize("name", trainers.TRAINER_NAMES)
def test_trainer_defaults_are_its_class_attributes(name):
    assert name in ROWS, f"{name} has no row in docs/losses.md's trainer table"
    trainer = getattr(trainers, name)
    documented, real = ROWS[name]["defaults"], hyperparameters(trainer)
    as_compared = lambda d: {k: (type(v).__name__, v) for k, v in d.items()}  # noqa: E731 (1.0 is not 1)
    assert as_compared(documented) == as_compared(real), (
        f"{name}: docs/losses.md says {documented}, the class attributes are {real}")


@pytest.mark.parametrize("name", trainers.TRAINER_NAMES)
def test_trainer_loss_and_regions_column(name):
    trainer = getattr(trainers, name)
    row = ROWS[name]
    assert row["loss"] in nnunet_losses.__all__, f"{name}: {row['loss']} is not a public loss"
    source = "\n".join(inspect.getsource(klass) for klass in our_classes(trainer))
    assert re.search(rf"\b{row['loss']}\(", source), f"{name}: its classes never build {row['loss']}"
    refuses = "refuse_regions(" in inspect.getsource(trainer._build_loss)
    assert row["regions"] is not refuses, (
        f"{name}: docs/losses.md says regions {'yes' if row['regions'] else 'no'}, but _build_loss "
        f"{'refuses' if refuses else 'accepts'} region datasets")
