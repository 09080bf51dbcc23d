"""Experiments by name (nnunet_losses/training/names.py): every token of the grammar parsed and applied,
one canonical name per experiment, every refusal with its message, nnU-Net's own trainers, and the
settings recorded where the issue asks (log, debug.json, checkpoint)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import (
    nnUNetTrainerAdam,
    nnUNetTrainerVanillaAdam,
    nnUNetTrainerVanillaAdam1en3,
)
from nnunetv2.utilities.file_path_utilities import convert_identifier_to_trainer_plans_config

from nnunet_losses.trainers import (
    nnUNetTrainerCEKL,
    nnUNetTrainerCEL1,
    nnUNetTrainerDiceI,
    nnUNetTrainerDiceIEps,
    nnUNetTrainerLeafDice,
    nnUNetTrainerMime,
    nnUNetTrainerNegativeMime,
)
from nnunet_losses.training.names import (
    TrainerNameError,
    canonical_name,
    match_token,
    resolve_name,
    spell_number,
    trainer_with_settings,
)

KNOWN = {cls.__name__: cls for cls in (nnUNetTrainer, nnUNetTrainerMime, nnUNetTrainerNegativeMime,
                                      nnUNetTrainerDiceI, nnUNetTrainerDiceIEps, nnUNetTrainerLeafDice,
                                      nnUNetTrainerCEL1, nnUNetTrainerCEKL, nnUNetTrainerVanillaAdam1en3)}


@pytest.fixture(scope="module")
def planned(tmp_path_factory, plan_synthetic_dataset):
    """A 5-case synthetic dataset planned (2d) by nnU-Net's own API (conftest): trainers need plans."""
    return plan_synthetic_dataset(tmp_path_factory.mktemp("nnunet"), 872, "NameUnits")


@pytest.fixture
def clean_ext_trainer(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "")
    monkeypatch.delenv("nnUNet_extTrainer")


def instantiate(trainer_class, planned):
    plans = dict(planned.plans, continue_training=False)  # what nnUNetv2_train adds
    return trainer_class(plans, "2d", 0, planned.dataset_json, torch.device("cpu"))


def resolve(name):
    """resolve_name with a lookup of the trainers above only (no nnU-Net folder scan)."""
    return resolve_name(name, find=KNOWN.get)


# ----------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, value", [
    ("a1.5", "a", 1.5), ("a1.9,1,0.5", "a", (1.9, 1.0, 0.5)), ("b0.2", "b", 0.2), ("eps1e-5", "epsilon", 1e-5),
    ("eps1e-5,1e-3", "epsilon", (1e-5, 0.001)), ("bg0", "include_background", False),
    ("bg1", "include_background", True), ("sum", "reduction", "sum"), ("mean", "reduction", "mean"),
    ("countbatches20", "count_batches", 20), ("lam0.5", "lam", 0.5), ("tau5", "tau", 5.0),
    ("knee0.5", "kl_knee", 0.5),
    ("srcsqrt", "source_sampling", "sqrt"), ("srcuniform", "source_sampling", "uniform"),
    ("sgd", "optimizer", "sgd"), ("adam", "optimizer", "adam"), ("adamw", "optimizer", "adamw"),
    ("lr3e-4", "lr", 3e-4), ("100ep", "epochs", 100), ("50it", "iterations", 50),
])
def test_every_token_parses(text, key, value):
    token, parsed = match_token(text)
    assert token.key == key and parsed == value
    assert token.spell(parsed) == text  # each of these is the canonical spelling


@pytest.mark.parametrize("text", ["c2", "a", "a-1", "bg2", "lr", "ep", "3epochs", "adamx", "eps1e", "a1,,2", "A1"])
def test_what_is_no_token(text):
    assert match_token(text) is None


@pytest.mark.parametrize("value, spelling", [
    (1e-5, "1e-5"), (3e-4, "3e-4"), (0.5, "0.5"), (100, "100"), (1000, "1e3"), (0.01, "0.01"), (1.9, "1.9"),
    (10.0, "10"), (1e-7, "1e-7"), (0.001, "1e-3"), (2.5e-3, "0.0025"), (1234.5, "1234.5"),
])
def test_numbers_have_their_shortest_exact_spelling(value, spelling):
    # shortest of the plain decimal and the scientific form, the decimal on a tie; both read back exactly
    assert spell_number(value) == spelling and float(spelling) == value


# ----------------------------------------------------------------------------------------------
# resolution and canonical names
# ----------------------------------------------------------------------------------------------
def test_knee0_names_the_papers_kl():
    resolved = resolve("nnUNetTrainerCEKL_knee0")
    assert resolved.base is nnUNetTrainerCEKL and resolved.settings == {"kl_knee": 0.0}
    assert nnUNetTrainerCEKL.kl_knee == 0.5


def test_a_name_splits_into_trainer_and_settings_in_canonical_order():
    resolved = resolve("nnUNetTrainerMime_a1.5_b0.2_sgd_lr3e-4_100ep_20it")
    assert resolved.base is nnUNetTrainerMime
    assert resolved.settings == {"a": 1.5, "b": 0.2, "optimizer": "sgd", "lr": 3e-4, "epochs": 100,
                                 "iterations": 20}
    assert resolved.hyperparameters == {"a": 1.5, "b": 0.2}
    assert canonical_name("nnUNetTrainerMime", resolved.settings) == resolved.name


@pytest.mark.parametrize("name, canonical", [
    ("nnUNetTrainerMime_3ep_a1.5", "nnUNetTrainerMime_a1.5_3ep"),          # order of the table
    ("nnUNetTrainerMime_a1.50", "nnUNetTrainerMime_a1.5"),                 # shortest spelling
    ("nnUNetTrainer_adam_lr0.0003", "nnUNetTrainer_adam_lr3e-4"),
    ("nnUNetTrainerDiceI_eps0.00001", "nnUNetTrainerDiceI_eps1e-5"),
    ("nnUNetTrainer_10it_3ep", "nnUNetTrainer_3ep_10it"),
])
def test_another_spelling_of_the_same_experiment_is_refused_with_the_canonical_name(name, canonical):
    with pytest.raises(TrainerNameError, match=f"expected the one name of this experiment, {canonical} "):
        resolve(name)


@pytest.mark.parametrize("name, redundant, canonical", [
    ("nnUNetTrainerMime_a1.9", "a", "nnUNetTrainerMime"),
    ("nnUNetTrainerMime_a1.5_b0.1", "b", "nnUNetTrainerMime_a1.5"),
    ("nnUNetTrainer_sgd_3ep", "optimizer", "nnUNetTrainer_3ep"),
    ("nnUNetTrainer_lr0.01", "lr", "nnUNetTrainer"),
    ("nnUNetTrainer_adam_lr0.001", "lr", "nnUNetTrainer_adam"),
    ("nnUNetTrainer_1000ep_10it", "epochs", "nnUNetTrainer_10it"),
    ("nnUNetTrainerLeafDice_bg1", "include_background", "nnUNetTrainerLeafDice"),
    ("nnUNetTrainerDiceIEps_adam_3ep", "optimizer", "nnUNetTrainerDiceIEps_3ep"),  # its own optimizer is Adam
    ("nnUNetTrainerDiceIEps_lr0.001", "lr", "nnUNetTrainerDiceIEps"),
    ("nnUNetTrainerMime_adam_3ep", "optimizer", "nnUNetTrainerMime_3ep"),  # the mimes train with Adam too
    ("nnUNetTrainerNegativeMime_cwfixed_lr0.001", "lr", "nnUNetTrainerNegativeMime_cwfixed"),
    ("nnUNetTrainerMime_cwannealed", "class_weights", "nnUNetTrainerMime"),
    ("nnUNetTrainerMime_bramp0.25_sgd", "b_ramp", "nnUNetTrainerMime_sgd"),
    ("nnUNetTrainerCEKL_knee0.5", "kl_knee", "nnUNetTrainerCEKL"),  # CEKL bounds the KL by default
])
def test_a_token_that_repeats_the_trainers_own_value_is_refused(name, redundant, canonical):
    with pytest.raises(TrainerNameError, match=rf"{redundant} is \w+'s own value already: the name of this "
                                               rf"experiment is {canonical}\."):
        resolve(name)


@pytest.mark.parametrize("name, why", [
    ("nnUNetTrainerMime_c2", "unknown token 'c2'"),
    ("nnUNetTrainerMime_c2_3ep", "unknown token 'c2'"),
    ("nnUNetTrainerDiceI_a1.5", "token 'a1.5': nnUNetTrainerDiceI has no setting 'a'"),
    ("nnUNetTrainerDiceIEps_eps1e-5", "token 'eps1e-5': nnUNetTrainerDiceIEps has no setting 'epsilon'"),
    ("nnUNetTrainer_bg0", "token 'bg0': nnUNetTrainer has no setting 'include_background'"),
    ("nnUNetTrainerNegativeMime_bramp0", "token 'bramp0': nnUNetTrainerNegativeMime has no setting 'b_ramp'"),
    ("nnUNetTrainerMime_0ep_10it", "token '0ep': expected epochs >= 1, got 0"),
    ("nnUNetTrainerMime_3ep_0it", "token '0it': expected iterations >= 1, got 0"),
    ("nnUNetTrainer_lr0", "token 'lr0': expected lr > 0, got 0.0"),
    ("nnUNetTrainerCEL1_tau0", "token 'tau0': expected tau > 0, got 0.0"),
    ("nnUNetTrainerCEKL_knee1.5", "token 'knee1.5': expected kl_knee <= 1 (a fraction), got 1.5"),
    ("nnUNetTrainerCEL1_knee0.5", "token 'knee0.5': nnUNetTrainerCEL1 has no setting 'kl_knee'"),
    ("nnUNetTrainerMime_3ep_4ep", "token '4ep': epochs is set twice"),
])
def test_a_name_that_does_not_resolve_says_which_token_and_why(name, why):
    with pytest.raises(TrainerNameError) as raised:
        resolve(name)
    message = str(raised.value)
    assert message.startswith(f"{name}: {why}. ")
    # and lists what this trainer accepts, with the current values
    base = name.split("_")[0]
    assert f"{base} accepts these tokens" in message and "<E>ep" in message and "(now 1000)" in message


def test_the_listing_shows_each_trainers_tokens_and_current_values():
    with pytest.raises(TrainerNameError) as raised:
        resolve("nnUNetTrainerMime_c2")
    listing = str(raised.value)
    for line in ("a<v>", "(now 1.9)", "b<v>", "(now 0.1)", "bg0|bg1", "sum|mean", "sgd|adam|adamw", "(now adam)",
                 "lr<v>", "(now 1e-3)", "<I>it", "(now 250)", "bramp<v>", "(now 0.25)"):
        assert line in listing
    assert "lam<v>" not in listing  # not a setting of the mime


@pytest.mark.parametrize("name, message", [
    ("nnunettrainermime_3ep_10it", "nnunettrainermime_3ep_10it: no trainer named 'nnunettrainermime' (did you mean "
                                   "'nnUNetTrainerMime'? trainer names are case-sensitive)"),
    ("nnUNetTrainerdicei", "nnUNetTrainerdicei: no trainer named 'nnUNetTrainerdicei' (did you mean "
                           "'nnUNetTrainerDiceI'?"),
    ("nnUNetTrainerMime_3EP", "nnUNetTrainerMime_3EP: unknown token '3EP' (did you mean '3ep'?)"),
    ("nnUNetTrainerMime_Adam_3ep", "nnUNetTrainerMime_Adam_3ep: unknown token 'Adam' (did you mean 'adam'?)"),
])
def test_another_case_is_refused_with_the_name_meant(name, message):
    with pytest.raises(TrainerNameError) as raised:
        resolve_name(name, find=KNOWN.get, known=tuple(KNOWN))
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("name", ["nnUNetTrainerMime", "nnUNetTrainerNope_3ep_10it", "nnUNetTrainerMime__3ep",
                                  "nnUNetTrainerMime_3ep_", "__path__", "nnunettrainermime_3ep"])
def test_names_that_are_not_ours_are_attribute_errors(name):
    # hasattr() -- nnU-Net's probe of every module in the folder -- must answer False, not raise
    with pytest.raises(AttributeError):
        resolve(name)


def test_trainer_names_keep_nnunet_output_folders_parseable():
    # nnU-Net splits "<trainer>__<plans>__<configuration>" on "__": no token and no name holds "__"
    name = "nnUNetTrainerMime_a1.9,1,0.5_sgd_lr3e-4_3ep_10it"
    assert resolve(name).settings["a"] == (1.9, 1.0, 0.5)
    assert convert_identifier_to_trainer_plans_config(f"{name}__nnUNetPlans__2d") == [name, "nnUNetPlans", "2d"]


# ----------------------------------------------------------------------------------------------
# the classes: hyperparameters, optimizer, learning rate, budget
# ----------------------------------------------------------------------------------------------
def test_hyperparameters_become_class_attributes_the_loss_is_built_from():
    trainer = trainer_with_settings(nnUNetTrainerMime, a=(1.9, 1.0, 0.5), b=0.2, include_background=False,
                                    reduction="sum")
    assert trainer.__name__ == "nnUNetTrainerMime_a1.9,1,0.5_b0.2_bg0_sum" and trainer.__mro__[1] is nnUNetTrainerMime
    assert (trainer.a, trainer.b, trainer.include_background, trainer.reduction) == ((1.9, 1.0, 0.5), 0.2, False, "sum")
    assert trainer_with_settings(nnUNetTrainerCEL1, lam=0.5, tau=5.0).lam == 0.5
    assert trainer_with_settings(nnUNetTrainerDiceI, epsilon=1e-5).epsilon == 1e-5
    assert trainer_with_settings(nnUNetTrainerDiceIEps, count_batches=20).count_batches == 20


def test_the_built_class_keeps_nnunets_init_signature():
    # nnU-Net records the __init__ arguments by name (my_init_kwargs); *args/**kwargs would fail
    trainer = trainer_with_settings(nnUNetTrainerMime, a=1.5, epochs=3)
    assert list(inspect.signature(trainer.__init__).parameters) == \
        list(inspect.signature(nnUNetTrainer.__init__).parameters)


@pytest.mark.parametrize("optimizer, variant", [("sgd", nnUNetTrainer), ("adam", nnUNetTrainerVanillaAdam),
                                                ("adamw", nnUNetTrainerAdam)])
def test_the_optimizer_is_nnunets_own_variant(optimizer, variant):
    base = nnUNetTrainerVanillaAdam1en3 if optimizer == "sgd" else nnUNetTrainerCEL1  # the token must change something
    trainer = trainer_with_settings(base, optimizer=optimizer)
    assert trainer.configure_optimizers is variant.configure_optimizers


class _Network(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("name, optimizer_class, lr", [
    ("nnUNetTrainerCEL1_adam", torch.optim.Adam, 1e-3),
    ("nnUNetTrainerMime_adamw_lr3e-4", torch.optim.AdamW, 3e-4),
    ("nnUNetTrainerCEL1_lr3e-3", torch.optim.SGD, 3e-3),
    ("nnUNetTrainerCEL1_3ep", torch.optim.SGD, 1e-2),
    ("nnUNetTrainerMime_3ep", torch.optim.Adam, 1e-3),  # the mimes' default: Adam (README, departures)
    ("nnUNetTrainerNegativeMime_lr3e-4", torch.optim.Adam, 3e-4),
    ("nnUNetTrainerMime_cwfixed_sgd", torch.optim.SGD, 1e-2),  # nnU-Net's SGD, one token away
    ("nnUNetTrainerDiceIEps_3ep", torch.optim.Adam, 1e-3),  # its paper's optimizer by default
    ("nnUNetTrainerDiceIEps_sgd", torch.optim.SGD, 1e-2),  # nnU-Net's, one token away
    ("nnUNetTrainerDiceIEps_sgd_lr3e-3", torch.optim.SGD, 3e-3),
])
def test_the_built_trainer_has_the_named_optimizer_and_learning_rate(planned, monkeypatch, name, optimizer_class, lr):
    from nnunet_losses.training.names import build_trainer

    planned.use(monkeypatch)
    trainer_class = build_trainer(resolve(name))
    trainer = instantiate(trainer_class, planned)
    assert trainer.initial_lr == lr
    trainer.network = _Network()
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is optimizer_class and optimizer.param_groups[0]["lr"] == lr
    assert type(optimizer) is not torch.optim.AdamW or optimizer.param_groups[0]["amsgrad"]  # nnU-Net's AdamW
    assert trainer.name_settings["settings"]["lr"] == lr


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerDiceIEps, nnUNetTrainerMime, nnUNetTrainerNegativeMime])
def test_a_trainers_own_optimizer_without_a_name(planned, monkeypatch, trainer_class):
    planned.use(monkeypatch)
    trainer = instantiate(trainer_class, planned)
    assert trainer.initial_lr == 1e-3
    trainer.network = _Network()
    optimizer, _ = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == 1e-3
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (1000, 250)  # nnU-Net's budget is kept
    sgd = trainer_with_settings(trainer_class, optimizer="sgd", epochs=3)
    assert sgd.optimizer_name == "sgd" and sgd.name_settings["settings"]["lr"] == 0.01


def test_a_trainer_with_an_unknown_optimizer_is_refused(planned, monkeypatch):
    planned.use(monkeypatch)

    class Odd(nnUNetTrainerDiceIEps):
        optimizer_name = "rmsprop"

    with pytest.raises(ValueError, match=r"Odd.optimizer_name: expected one of \('sgd', 'adam', 'adamw'\), "
                                         r"got 'rmsprop'"):
        instantiate(Odd, planned)


def test_epochs_and_iterations_set_the_budget(planned, monkeypatch):
    planned.use(monkeypatch)
    trainer_class = trainer_with_settings(nnUNetTrainerDiceI, epochs=3, iterations=10)
    trainer = instantiate(trainer_class, planned)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (3, 10, 2)
    assert trainer.name_settings == {
        "trainer": "nnUNetTrainerDiceI_3ep_10it", "base": "nnUNetTrainerDiceI",
        "settings": {"epsilon": 1e-7, "include_background": False, "optimizer": "sgd", "lr": 0.01, "epochs": 3,
                     "iterations": 10}}


REPOSITORY = Path(__file__).resolve().parents[1]
# what the documentation tells people to type: every `-tr <name>` of the docs, examples and docstrings
DOCUMENTED_FILES = ("README.md", "docs/*.md", "benchmarks/README.md", "examples/**/*.py", "trainers/*.py",
                    "nnunet_losses/**/*.py")
README_OWN_SUBCLASS = "nnUNetTrainerMimeA15"  # the README's example of a trainer in a folder of your own


def documented_trainer_names() -> set:
    names = set()
    for pattern in DOCUMENTED_FILES:
        for path in REPOSITORY.glob(pattern):
            names.update(m.rstrip(".,") for m in re.findall(r"-tr `?(nnUNetTrainer[\w.,-]*)", path.read_text()))
    return names - {README_OWN_SUBCLASS}


def test_every_documented_trainer_name_is_one_nnunet_finds(clean_ext_trainer):
    # a default that changes (the mimes' optimizer) turns a documented name redundant: it must not linger
    from nnunet_losses.training.discovery import enable_trainers
    from nnunet_losses.training.names import find_trainer

    enable_trainers()
    names = documented_trainer_names()
    assert {"nnUNetTrainerMime", "nnUNetTrainerMime_sgd", "nnUNetTrainerDiceIEps_sgd"} <= names
    assert [name for name in sorted(names) if find_trainer(name) is None] == []


def test_names_of_nnunets_own_trainers_resolve_through_nnunets_lookup(clean_ext_trainer):
    from nnunet_losses.training.discovery import enable_trainers
    from nnunet_losses.training.names import trainer_from_name

    enable_trainers()
    trainer = trainer_from_name("nnUNetTrainer_adam_lr3e-4_100ep")
    assert trainer.__mro__[1] is nnUNetTrainer and trainer.configure_optimizers is nnUNetTrainerVanillaAdam.configure_optimizers
    # a name of nnU-Net's that carries an underscore (or even a token) of its own is a base like any other
    assert trainer_from_name("nnUNetTrainer_5epochs_adam").__mro__[1].__name__ == "nnUNetTrainer_5epochs"
    assert trainer_from_name("nnUNetTrainer_onlyMirror01_1500ep_adam").__mro__[1].__name__ == \
        "nnUNetTrainer_onlyMirror01_1500ep"
    # and a name with tokens is never the base of another: one name per experiment
    with pytest.raises(TrainerNameError, match="expected the one name of this experiment, nnUNetTrainerMime_a1.5_3ep "):
        trainer_from_name("nnUNetTrainerMime_3ep_a1.5")
    assert trainer_from_name("nnUNetTrainer_adam_lr3e-4_100ep") is trainer  # built once per name


# ----------------------------------------------------------------------------------------------
# `nnunet-losses trainers [NAME]`, through the installed console script
# ----------------------------------------------------------------------------------------------
def run_command(*arguments):
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    script = Path(sysconfig.get_path("scripts")) / "nnunet-losses"
    return subprocess.run([str(script), "trainers", *arguments], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in __import__("os").environ.items() if k != "nnUNet_extTrainer"})


def test_trainers_lists_every_trainer_with_its_tokens_and_values():
    from nnunet_losses.trainers import TRAINER_NAMES

    result = run_command()
    assert result.returncode == 0 and result.stderr == ""
    sections = result.stdout.split("\n\n")
    assert [s.splitlines()[0] for s in sections[1:]] == list(TRAINER_NAMES)
    mime = sections[1 + TRAINER_NAMES.index("nnUNetTrainerMime")]
    assert "a<v>" in mime and "(now 1.9)" in mime and "(now adam)" in mime and "lam<v>" not in mime
    cel1 = sections[1 + TRAINER_NAMES.index("nnUNetTrainerCEL1")]
    assert "lam<v>" in cel1 and "(now 1)" in cel1 and "tau<v>" in cel1 and "(now 10)" in cel1


def test_trainers_name_prints_what_the_name_stands_for():
    import json

    result = run_command("nnUNetTrainerCEL1_lam0.5_tau5_adamw_20ep")
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout) == {
        "trainer": "nnUNetTrainerCEL1_lam0.5_tau5_adamw_20ep", "base": "nnUNetTrainerCEL1",
        "settings": {"lam": 0.5, "tau": 5.0, "optimizer": "adamw", "lr": 0.001, "epochs": 20, "iterations": 250}}
    plain = run_command("nnUNetTrainer_5epochs")  # nnU-Net's own trainer, an underscore in its name
    assert plain.returncode == 0 and plain.stdout.startswith("nnUNetTrainer_5epochs\n")
    assert "(set by the trainer)" in plain.stdout  # it sets its own epochs


@pytest.mark.parametrize("name, message", [
    ("nnUNetTrainerMime_c2_3ep", "nnUNetTrainerMime_c2_3ep: unknown token 'c2' (`nnunet-losses trainers "
                                 "nnUNetTrainerMime` lists the tokens it accepts)"),
    ("nnUNetTrainerMime_3ep_a1.5", "nnUNetTrainerMime_3ep_a1.5: expected the one name of this experiment, "
                                   "nnUNetTrainerMime_a1.5_3ep (tokens"),
    ("Nope", "Nope: expected the name of a trainer nnU-Net finds"),
])
def test_trainers_with_a_bad_name_is_one_line_on_stderr_and_exit_2(name, message):
    result = run_command(name)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"nnunet-losses trainers: error: {message}")
