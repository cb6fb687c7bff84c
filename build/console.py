"""Build messages that reach the person running pip.

pip runs a build backend with its output captured and shows it only with
`pip install -v` or after a failure, while the CUDA build takes minutes on a
small machine: silence would look like a hang. So a message goes to the
controlling terminal (/dev/tty), which pip does not capture, when there is
one, and to stdout otherwise (CI logs, `pip install -v` piped to a file).
Never to both, so that `pip install -v` in a terminal shows each line once.
"""

from __future__ import annotations

import sys


def say(line: str) -> None:
  """Shows one line of build progress to whoever runs the build."""
  if not sys.stdout.isatty():
    try:
      with open("/dev/tty", "w", encoding="utf-8") as tty:
        tty.write(line + "\n")
      return
    except OSError:  # no controlling terminal
      pass
  print(line, flush=True)
