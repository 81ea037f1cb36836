"""Run logging: an append-only JSON-lines log (one object per line, fsynced) that survives crashes and resumes;
:meth:`JsonlLogger.truncate_after` (on resume) drops a torn last line and the records of iterations to be redone."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .atomic import atomic_write_text
from .jsonio import dumps

__all__ = ['JsonlLogger', 'read_jsonl', 'training_curve']


def read_jsonl(path: str | os.PathLike) -> list:
    """All complete records of a JSON-lines file (unparsable lines, e.g. a torn last line, are skipped)."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding='utf-8').splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # blank and torn lines
                out.append(json.loads(line.strip()))
    return out


class JsonlLogger:
    """Append records to ``path`` (one JSON object per line). ``enabled=False`` makes it a no-op (non-zero ranks)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = dumps(record) + '\n'
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, iteration: int) -> None:
        """Keep only complete records whose ``iteration`` is <= ``iteration`` (rewritten atomically)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if int(r.get('iteration', -1)) <= iteration]
        atomic_write_text(self.path, ''.join(json.dumps(r) + '\n' for r in keep))


def training_curve(run_dir: str | os.PathLike, log_name: str = 'log.jsonl') -> list:
    """The records of ``<run_dir>/log.jsonl`` that carry ``metrics`` (written at snapshots), in order:
    ``[{kimg, images_seen, iteration, <metrics>}]``."""
    return [{'kimg': r['kimg'], 'images_seen': r['images_seen'], 'iteration': r['iteration'], **r['metrics']}
            for r in read_jsonl(Path(run_dir) / log_name) if r.get('metrics')]
