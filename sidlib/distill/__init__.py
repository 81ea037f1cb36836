"""Score identity Distillation of an EDM teacher into a one-step generator.

In-process::

    from sidlib.distill import distill
    run_dir = distill({'teacher': 'teacher.safetensors', 'batch': 8, 'iterations': 20, 'run_dir': 'runs/demo'})

Command line, also under ``torchrun --nproc_per_node N``::

    python -m sidlib.distill --config cfg.yaml --run-dir DIR [--set key=value ...]

Modules: :mod:`~sidlib.distill.config` (:class:`DistillConfig`), :mod:`~sidlib.distill.setup` (teacher, students,
optimisers), :mod:`~sidlib.distill.loop` (the iteration), :mod:`~sidlib.distill.cli`.
"""

from .config import ConfigError, DistillConfig
from .loop import CONFIG_FILE, LOG_FILE, STATE_FILE, distill
from .setup import register_teacher, registered_teachers

__all__ = ['ConfigError', 'DistillConfig', 'distill', 'register_teacher', 'registered_teachers', 'STATE_FILE',
           'LOG_FILE', 'CONFIG_FILE']
