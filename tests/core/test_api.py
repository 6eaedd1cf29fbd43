"""The public surface: every package exports a sorted ``__all__`` of names that exist."""

from __future__ import annotations

import importlib

import pytest

import meshmq
from meshmq.cli import main as cli_main

PACKAGES = ["meshmq", "meshmq.patterns", "meshmq.discovery", "meshmq.durability"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    # plain sorted, or "isort-style": CONSTANTS, then Classes, then functions (ruff RUF022)
    def isort_key(n: str) -> tuple[int, str]:
        return (0 if n.isupper() else 1 if n[:1].isupper() else 2, n)
    assert exported in (sorted(exported), sorted(exported, key=isort_key)), (
        f"{name}.__all__ is not sorted")
    assert len(set(exported)) == len(exported)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr} is in __all__ but missing"


def test_every_error_derives_from_mesh_error() -> None:
    errors = [getattr(meshmq, n) for n in meshmq.__all__
              if isinstance(getattr(meshmq, n), type)
              and issubclass(getattr(meshmq, n), BaseException)]
    assert len(errors) >= 10
    assert all(issubclass(e, meshmq.MeshError) for e in errors)
    assert issubclass(meshmq.MeshTimeout, TimeoutError)
    assert issubclass(meshmq.PeerGone, ConnectionError)


def test_cli_without_a_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 2
    assert "usage: meshmq" in capsys.readouterr().err
