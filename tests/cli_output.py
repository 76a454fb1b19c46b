"""The CLI's own lines of captured output, without the log lines Ray forwards to the same stream.

The session's Ray instance forwards its processes' log lines (``(raylet) ...``, ``(TrainWorker
pid=12) ...``, colour-coded) to the test process's stderr at any moment, so a test that captures
stderr may also catch one of those: tests compare the CLI's lines only.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"\((raylet|[\w:.]+ pid=\d+[^)]*)\)")


def cli_lines(text: str) -> list[str]:
    """``text``'s lines but Ray's forwarded log lines.

    Example:
        >>> cli_lines("orchestrator plot: done\\n\\x1b[33m(raylet)\\x1b[0m disk is full\\n")
        ['orchestrator plot: done']
    """
    return [line for line in text.splitlines() if not _RAY_PREFIX.match(_ANSI.sub("", line).lstrip())]
