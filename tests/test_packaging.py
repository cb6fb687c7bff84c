"""What an installation ships and what a user without the extras is told."""

import importlib
import sys

import pytest


def test_flax_extra_named_when_flax_is_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)  # makes `import flax` fail
  for name in [m for m in sys.modules if m.startswith("jax_flash.flax")]:
    monkeypatch.delitem(sys.modules, name)
  with pytest.raises(ImportError, match=r'pip install "jax_flash\[flax\]"'):
    importlib.import_module("jax_flash.flax")
