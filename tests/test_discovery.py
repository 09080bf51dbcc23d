"""nnU-Net finds our trainers: ``nnunet-losses trainer-path`` (the documented way), ``enable_trainers()``,
no collision with nnU-Net's built-in trainers, short-run names, and pip installing the trainer folder."""

from __future__ import annotations

import ast
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nnunetv2
import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import convert_identifier_to_trainer_plans_config
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_losses.training import discovery
from nnunet_losses.commands.cli import main
from nnunet_losses.training.names import TrainerNameError, match_token, resolve_name
from nnunet_losses.trainers import TRAINER_NAMES, nnUNetTrainerMime

REPOSITORY = Path(__file__).resolve().parents[1]
NNUNET_TRAINER_FOLDER = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
SHORT_RUN_NAMES = ("nnUNetTrainerMime_2ep_3it", "nnUNetTrainerDiceIEps_1ep_1it", "nnUNetTrainer_3ep_10it",
                   "nnUNetTrainerDiceLoss_1ep_5it")  # ours, nnU-Net's default and one of its variants


def console_command() -> str:
    """The installed ``nnunet-losses`` script of this Python environment."""
    script = Path(sysconfig.get_path("scripts")) / "nnunet-losses"
    return str(script) if script.exists() else shutil.which("nnunet-losses")


@pytest.fixture
def clean_ext_trainer(monkeypatch):
    """No nnUNet_extTrainer in this test; the previous value (or its absence) comes back afterwards."""
    monkeypatch.setenv(discovery.ENV_VAR, "")
    monkeypatch.delenv(discovery.ENV_VAR)


def builtin_trainer_class_names() -> set:
    """Every class defined in nnU-Net's own trainer folder (parsed, not imported)."""
    names = set()
    for path in NNUNET_TRAINER_FOLDER.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names.update(node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef))
    return names


def test_documented_shell_line_lets_nnunet_find_every_trainer(monkeypatch, tmp_path):
    other = str(tmp_path / "my_trainers")  # a folder the user already had in nnUNet_extTrainer
    environment = {**os.environ, discovery.ENV_VAR: other}
    # export nnUNet_extTrainer=$(nnunet-losses trainer-path --append)
    printed = subprocess.run([console_command(), "trainer-path", "--append"], env=environment, check=True,
                             capture_output=True, text=True).stdout.strip()
    assert printed == os.pathsep.join([other, discovery.trainer_folder()])
    monkeypatch.setenv(discovery.ENV_VAR, printed)
    for name in TRAINER_NAMES + SHORT_RUN_NAMES:
        trainer_class = recursive_find_trainer_class_by_name(name)
        assert trainer_class.__name__ == name
        assert issubclass(trainer_class, nnUNetTrainer)
    assert recursive_find_trainer_class_by_name("nnUNetTrainerMime_2ep_3it").__mro__[1].__name__ == "nnUNetTrainerMime"
    # without our folder nnU-Net does not know them
    monkeypatch.setenv(discovery.ENV_VAR, other)
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerMime"):
        recursive_find_trainer_class_by_name("nnUNetTrainerMime")


def test_readme_subclass_recipe_in_a_folder_of_your_own(monkeypatch, tmp_path):
    # README: a three-line subclass in $HOME/my_trainers, that folder appended after ours
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    (mine / "my_mime.py").write_text(
        "from nnunet_losses.trainers import nnUNetTrainerMime\n"
        "class nnUNetTrainerMimeA15(nnUNetTrainerMime):\n"
        "    a = 1.5\n")
    monkeypatch.setenv(discovery.ENV_VAR, discovery.with_trainer_folder(None) + os.pathsep + str(mine))
    assert recursive_find_trainer_class_by_name("nnUNetTrainerMimeA15").a == 1.5
    short = recursive_find_trainer_class_by_name("nnUNetTrainerMimeA15_3ep_10it")
    assert short.a == 1.5 and short.__mro__[1].__name__ == "nnUNetTrainerMimeA15"


def test_trainer_path_prints_the_folder_holding_the_trainer_modules(capsys):
    assert main(["trainer-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == Path(discovery.trainer_folder())
    assert sorted(p.name for p in folder.glob("*.py")) == sorted(p.name for p in (REPOSITORY / "trainers").glob("*.py"))


def test_append_keeps_existing_folders_and_never_repeats_ours(monkeypatch):
    ours = discovery.trainer_folder()
    assert discovery.with_trainer_folder(None) == ours
    assert discovery.with_trainer_folder("") == ours
    assert discovery.with_trainer_folder(os.pathsep.join(["/a", "/b"])) == os.pathsep.join(["/a", "/b", ours])
    assert discovery.with_trainer_folder(os.pathsep.join([ours, "/a"])) == os.pathsep.join([ours, "/a"])
    # another folder (e.g. your own trainers) the same way, given relative or absolute
    mine = os.path.abspath("my_trainers")
    assert discovery.with_trainer_folder("/a", "my_trainers") == os.pathsep.join(["/a", mine])
    assert discovery.with_trainer_folder(os.pathsep.join(["/a", mine]), mine) == os.pathsep.join(["/a", mine])


def test_enable_trainers_works_after_nnunet_was_imported(clean_ext_trainer):
    # nnunetv2.paths and find_objects are imported (top of this file) before the variable exists:
    # nnU-Net reads it at lookup time
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerCEKL"):
        recursive_find_trainer_class_by_name("nnUNetTrainerCEKL")
    assert discovery.enable_trainers() == discovery.trainer_folder()
    assert discovery.enable_trainers() == discovery.trainer_folder()  # idempotent
    assert recursive_find_trainer_class_by_name("nnUNetTrainerCEKL").lam == 0.1


def test_no_trainer_name_collides_with_a_builtin_trainer():
    builtin = builtin_trainer_class_names()
    assert "nnUNetTrainer" in builtin and "nnUNetTrainer_5epochs" in builtin  # the parse found them
    assert not set(TRAINER_NAMES) & builtin
    # a built-in whose name ends in a token of our grammar (nnUNetTrainer_onlyMirror01_1500ep) is never also
    # another built-in with tokens: the name means one experiment (nnU-Net's lookup finds the built-in first)
    ending_in_tokens = [name for name in builtin if "_" in name and match_token(name.rsplit("_", 1)[1])]
    assert "nnUNetTrainer_onlyMirror01_1500ep" in ending_in_tokens
    for name in ending_in_tokens:
        others = builtin - {name}
        with pytest.raises((AttributeError, TrainerNameError)):
            resolve_name(name, find=lambda candidate: nnUNetTrainer if candidate in others else None)
    # nnU-Net's own search of its folder (the one that would silently win) finds none of ours
    for name in TRAINER_NAMES + SHORT_RUN_NAMES:
        assert recursive_find_python_class(str(NNUNET_TRAINER_FOLDER), name, "nnunetv2.training.nnUNetTrainer") is None


def test_trainer_folder_holds_trainer_modules_only():
    # nnU-Net imports every module of the folder under its bare name: each must be a trainer module
    # with a name no other top-level module has
    folder = discovery.trainer_folder()
    entries = {p.name for p in Path(folder).iterdir()} - {"__pycache__"}
    assert entries == {f"{m.name}.py" for m in pkgutil.iter_modules([folder])} | {"__init__.py"}
    modules = [m for m in pkgutil.iter_modules([folder])]
    assert modules and not any(m.ispkg for m in modules)
    for module in modules:
        assert module.name.startswith("nnunet_losses_")
        source = ast.parse((Path(folder) / f"{module.name}.py").read_text(encoding="utf-8"))
        assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(source)), \
            f"{module.name}: relative imports fail under a bare module name"
        defines = {node.name for node in source.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        assert any(name.startswith("nnUNetTrainer") for name in defines) or defines == {"__getattr__"}


# ----------------------------------------------------------------------------------------------
# short runs
# ----------------------------------------------------------------------------------------------
def test_short_run_names_keep_nnunet_output_folders_parseable():
    # nnU-Net splits "<trainer>__<plans>__<configuration>" on "__" (find_best_configuration, model export)
    identifier = "nnUNetTrainerMime_3ep_10it__nnUNetPlans__2d"
    assert convert_identifier_to_trainer_plans_config(identifier) == ["nnUNetTrainerMime_3ep_10it", "nnUNetPlans", "2d"]


# the grammar itself, its refusals and the classes it builds: tests/test_names.py


# ----------------------------------------------------------------------------------------------
# packaging: a regular (non-editable) install ships the trainer folder
# ----------------------------------------------------------------------------------------------
def test_wheel_ships_the_trainer_folder_and_every_package(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPOSITORY, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "quickstart_work"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for module in (REPOSITORY / "trainers").glob("*.py"):
        assert f"nnunet_losses/trainers/{module.name}" in shipped
    # every package of the checkout (a folder with __init__.py) is in the wheel, with all its modules
    for init in REPOSITORY.glob("nnunet_losses*/**/__init__.py"):
        package = init.parent.relative_to(REPOSITORY)
        for module in init.parent.glob("*.py"):
            assert f"{package.as_posix()}/{module.name}" in shipped, f"{package}: list it in pyproject.toml"
