"""What the numbers were measured on: device, driver and library versions."""

from __future__ import annotations

import datetime
import importlib
import platform
import shutil
import subprocess
from typing import Any, Optional

import jax

OPTIONAL_PACKAGES = ("jaxlib", "numpy", "torch", "triton", "flax")
"""Packages whose version is recorded when they are importable."""


def _version(package: str) -> Optional[str]:
  try:
    return getattr(importlib.import_module(package), "__version__", "unknown")
  except Exception:  # pylint: disable=broad-except
    return None


def _command_output(args: list[str]) -> Optional[str]:
  if shutil.which(args[0]) is None:
    return None
  try:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30,
                          check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() or None


def describe(command: str) -> dict[str, Any]:
  """The environment of this run, as a JSON-ready dict.

  Args:
    command: the command line that produced the numbers.
  """
  device = jax.devices()[0]
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  versions.update({name: _version(name) for name in OPTIONAL_PACKAGES})
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": command,
      "backend": jax.default_backend(),
      "device": device.device_kind,
      "device_count": jax.device_count(),
      "gpu": _command_output(
          ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
           "--format=csv,noheader"]),
      "jax_flash_commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
      "platform": platform.platform(),
      "versions": versions,
  }
