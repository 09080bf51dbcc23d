"""The examples in the docstrings run and print what they say, in every public module of the loss library."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import nnunet_losses.losses

# every public module (private helpers (the _ modules) hold no user-facing examples); found, not listed,
# so a new loss module is checked without touching this file
PUBLIC_MODULES = sorted(
    f"{nnunet_losses.losses.__name__}.{info.name}"
    for info in pkgutil.iter_modules(nnunet_losses.losses.__path__)
    if not info.name.startswith("_")
)


def test_public_modules_are_found():
    # the four loss families of docs/losses.md; a stale path or a broken discovery would silently test nothing
    assert {"nnunet_losses.losses.dice", "nnunet_losses.losses.label_marginal", "nnunet_losses.losses.mime",
            "nnunet_losses.losses.missing_labels"} <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False, report=False)
    assert result.attempted > 0, f"{module_name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {module_name} failed"
