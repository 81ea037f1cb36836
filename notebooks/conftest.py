"""nbval runs the notebooks with smoke settings (tiny budgets) in a fresh temporary folder.

Smoke mode (``SIDLIB_SMOKE=1``) shrinks every budget and sends all outputs to ``SIDLIB_SMOKE_DIR``, so a test run
never writes into ``reports/`` or ``checkpoints/``. Set ``SIDLIB_SMOKE=0`` to validate with the full settings.
"""
import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("SIDLIB_SMOKE", "1")
    if not os.environ.get("SIDLIB_SMOKE_DIR"):
        os.environ["SIDLIB_SMOKE_DIR"] = tempfile.mkdtemp(prefix="sidlib-smoke-")
    # One thread per kernel: the notebooks start their own worker processes where it pays off.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
