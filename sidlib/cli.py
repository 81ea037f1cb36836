"""The command-line convention of sidlib's entry points (``python -m sidlib.distill``, ``sidlib.generate``,
``sidlib.metrics``): an error prints one ``error: ...`` line on stderr and exits with status 2; ``--debug``,
anywhere on the line, lets it raise with its traceback instead."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

__all__ = ['split_debug', 'run_main']


def split_debug(argv: Optional[List[str]] = None) -> Tuple[List[str], bool]:
    """``(argv without '--debug', whether it was there)``; ``argv`` defaults to ``sys.argv[1:]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [a for a in argv if a != '--debug'], '--debug' in argv


def run_main(body: Callable[[], object], debug: bool) -> int:
    """Run ``body()``; 0 when it returns, 2 after one ``error:`` line when it raises (unless ``debug``)."""
    try:
        body()
    except Exception as e:  # noqa: BLE001 -- the command line's one error line
        if debug:
            raise
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    return 0
