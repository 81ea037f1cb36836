"""Import the official EDM / SiD code side by side, for ``tests/test_official.py``.

NVlabs/edm and mingyuanzhou/SiD both have top-level packages named ``training``, ``torch_utils`` and ``dnnlib``,
so they cannot be imported the ordinary way in one process. :class:`OfficialRepo` imports one checkout in
isolation: while one of its modules is being imported (or while :meth:`OfficialRepo.active` is entered) the
checkout is first on ``sys.path`` and ``sys.modules`` holds *its* top-level modules only; afterwards the previous
entries are put back and the checkout's modules are kept aside, so each repository keeps its own ``training`` etc.

Third-party packages the official modules import at module level but never use on the compared code paths
(``click``, ``requests``, ``psutil``, ``PIL``, ``tqdm``, ``distutils``) are replaced by inert stubs, only while
a checkout is active and only if they are not installed.

Nothing of the official code is copied: the checkouts are read where the environment variables point.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

__all__ = ['OfficialRepo', 'ReplayTorch']

# Packages imported at module level by the official files (dnnlib/util.py, generate*.py, the training loop)
# that the compared functions never call.
_OPTIONAL_THIRD_PARTY = ('click', 'requests', 'psutil', 'PIL', 'PIL.Image', 'tqdm', 'distutils', 'distutils.util')


def _inert(*args, **kwargs):
    """Stands for any stubbed callable: as a decorator factory it returns the identity decorator."""
    return lambda f=None, *a, **k: f


def _stub_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__['__sidlib_stub__'] = True
    mod.__path__ = []  # a package, so that 'import PIL.Image' / 'distutils.util' resolve to other stubs
    if name == 'distutils.util':
        def strtobool(val):
            val = str(val).lower()
            if val in ('y', 'yes', 't', 'true', 'on', '1'):
                return 1
            if val in ('n', 'no', 'f', 'false', 'off', '0'):
                return 0
            raise ValueError(f'invalid truth value {val!r}')
        mod.strtobool = strtobool
    def __getattr__(attr):  # PEP 562: every other public attribute is an inert callable
        if attr.startswith('__'):
            raise AttributeError(attr)
        return _inert
    mod.__getattr__ = __getattr__
    return mod


def _missing(name: str) -> bool:
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


class OfficialRepo:
    """One official checkout (EDM or SiD), importable in isolation.

    ``repo.load('training.networks')`` returns the checkout's module; ``with repo.active(): ...`` makes the
    checkout's modules the importable ones while official code runs (only needed for code that imports lazily;
    the comparisons here call functions of already imported modules).
    """

    def __init__(self, path, label: str = ''):
        self.path = Path(path).expanduser().resolve()
        self.label = label or self.path.name
        if not self.path.is_dir():
            raise FileNotFoundError(f'{self.label}: {self.path} is not a directory')
        # Top-level names this checkout defines (packages and script modules): they shadow anything else.
        self.top = frozenset(p.stem for p in self.path.iterdir()
                             if (p.suffix == '.py' and p.is_file()) or (p / '__init__.py').is_file())
        if 'training' not in self.top:
            raise FileNotFoundError(f'{self.label}: {self.path} has no training/ package; is it a checkout of '
                                    f'the official repository?')
        self._modules: dict[str, types.ModuleType] = {}

    def _ours(self, key: str) -> bool:
        return key.split('.')[0] in self.top

    @contextlib.contextmanager
    def active(self):
        """Make this checkout's top-level modules (and stubs for missing optional packages) the importable ones."""
        saved = {k: sys.modules.pop(k) for k in list(sys.modules) if self._ours(k)}
        stubs = [n for n in _OPTIONAL_THIRD_PARTY if _missing(n)]
        for n in stubs:
            sys.modules[n] = _stub_module(n)
        for n in stubs:  # parent.child attributes, as a real import would set them
            if '.' in n and n.rsplit('.', 1)[0] in sys.modules:
                setattr(sys.modules[n.rsplit('.', 1)[0]], n.rsplit('.', 1)[1], sys.modules[n])
        sys.modules.update(self._modules)
        sys.path.insert(0, str(self.path))
        importlib.invalidate_caches()
        try:
            yield self
        finally:
            for k in list(sys.modules):
                if self._ours(k):
                    self._modules[k] = sys.modules.pop(k)
            for n in stubs:
                if getattr(sys.modules.get(n), '__sidlib_stub__', False):
                    del sys.modules[n]
            try:
                sys.path.remove(str(self.path))
            except ValueError:
                pass
            sys.modules.update(saved)
            importlib.invalidate_caches()

    def load(self, name: str) -> types.ModuleType:
        """The checkout's module ``name`` (e.g. ``'training.networks'``, ``'generate'``), imported once."""
        if name not in self._modules:
            with self.active():
                mod = importlib.import_module(name)
                origin = Path(getattr(mod, '__file__', '') or '').resolve()
                if self.path not in origin.parents:
                    raise ImportError(f'{self.label}: {name} resolved to {origin}, not inside {self.path}')
        return self._modules[name]


class ReplayTorch:
    """Stands in for the ``torch`` module inside an official module: ``rand``/``randn``/``randn_like``/``randint``
    return pre-recorded tensors (checking the requested shape), everything else is the real torch.

    ``queue``: list of ``(function_name, tensor)`` in the order the official code is expected to draw.
    """

    def __init__(self, torch_module, queue):
        self._torch = torch_module
        self.queue = list(queue)

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def _pop(self, fn, shape, device=None, dtype=None):
        assert self.queue, f'official code drew torch.{fn}{list(shape)} beyond the recorded draws'
        want_fn, t = self.queue.pop(0)
        assert want_fn == fn, f'official code called torch.{fn}, expected torch.{want_fn}'
        assert list(t.shape) == list(shape), f'torch.{fn}: official shape {list(shape)} vs recorded {list(t.shape)}'
        t = t if device is None else t.to(device)
        return t if dtype is None else t.to(dtype)

    @staticmethod
    def _shape(size):
        if len(size) == 1 and not isinstance(size[0], int):
            return list(size[0])
        return list(size)

    def rand(self, *size, device=None, dtype=None, **_):
        return self._pop('rand', self._shape(size), device, dtype)

    def randn(self, *size, device=None, dtype=None, **_):
        return self._pop('randn', self._shape(size), device, dtype)

    def randn_like(self, t, **_):
        return self._pop('randn_like', t.shape, t.device, t.dtype)

    def randint(self, *args, size=None, device=None, dtype=None, **_):
        # randint(high, size) / randint(low, high, size): the size is the last positional argument.
        return self._pop('randint', list(size if size is not None else args[-1]), device, dtype)
