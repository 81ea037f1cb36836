"""Score identity Distillation of an EDM teacher into a one-step generator: in-process
``distill({'teacher': 'teacher.safetensors', 'batch': 8, 'iterations': 20, 'run_dir': 'runs/demo'})``, or
``python -m sidlib.distill --config cfg.yaml --run-dir DIR [--set key=value ...]`` (also under torchrun).
Modules: :mod:`.config` (:class:`DistillConfig`), :mod:`.setup` (teacher, students, optimisers), :mod:`.loop` (the
iteration), :mod:`.init` (data-free start), :mod:`.cli`.
"""

from .config import ConfigError, DistillConfig
from .loop import CONFIG_FILE, LOG_FILE, STATE_FILE, distill
from .setup import register_teacher, registered_teachers

__all__ = ['ConfigError', 'DistillConfig', 'distill', 'register_teacher', 'registered_teachers', 'STATE_FILE',
           'LOG_FILE', 'CONFIG_FILE']
