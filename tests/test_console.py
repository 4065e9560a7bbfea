"""What commands show: our errors as one line and exit status 2, anything else with its traceback, our log messages
bare on stderr; and every error the package raises is one of ours, so none of them loses the one-line treatment."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from openflamingo.console import run_command, show_logs
from openflamingo.errors import InputError, MissingFileError, OpenFlamingoError

SRC = Path(__file__).parents[1] / "src" / "openflamingo"
BUILTIN_ERRORS = {"ValueError", "FileNotFoundError", "FileExistsError", "ImportError", "OSError"}


def test_our_errors_are_one_line_and_exit_status_2(capsys):
    def fail():
        raise InputError("train.lr: -1 must be > 0")

    assert run_command("train", fail) == 2
    assert capsys.readouterr().err == "openflamingo train: error: train.lr: -1 must be > 0\n"


def test_other_exceptions_keep_their_traceback():
    def bug():
        raise ValueError("raised deep inside a library")

    with pytest.raises(ValueError, match="deep inside a library"):
        run_command("train", bug)


def test_our_errors_are_still_the_builtin_errors_they_stand_for():
    assert issubclass(InputError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(InputError, OpenFlamingoError) and issubclass(MissingFileError, OpenFlamingoError)


def test_the_package_makes_only_its_own_error_classes():
    found = []  # raised directly or built to be raised later: any call of a built-in error class
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in BUILTIN_ERRORS:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} makes a {node.func.id}")
    assert not found, "; ".join(found)


def test_log_messages_go_bare_to_the_current_stderr(capsys):
    show_logs()
    show_logs()  # idempotent: one handler
    logging.getLogger("openflamingo.train.example").info("resumed from step 3")
    assert capsys.readouterr().err == "resumed from step 3\n"
