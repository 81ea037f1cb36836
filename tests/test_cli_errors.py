"""Every command line reports a failure as one ``error: ...`` line with exit status 2, and ``--debug`` shows the
traceback instead: python -m sidlib.distill, sidlib.metrics, sidlib.generate and experiments.paper."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_distill_cli_errors_and_debug(tmp_path, capsys):
    from sidlib.distill.cli import main

    missing = str(tmp_path / "missing.yaml")
    assert main(["--config", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError):
        main(["--config", missing, "--debug"])
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    assert main(["--config", str(tmp_path / "list.yaml")]) == 2
    assert "expected a mapping" in capsys.readouterr().err


@pytest.mark.parametrize("module,argv,text", [
    ("sidlib.distill", ["--set", "teacher=", "--set", "iterations=1"], "teacher"),
    ("sidlib.metrics", ["calc", "--network", "no-such-network.pkl", "--ref", "r.npz"], "no-such-network.pkl"),
    ("sidlib.generate", ["--network", "no-such-network.pkl", "--npz", "x.npz"], "no-such-network.pkl"),
    ("experiments.paper", ["show", "cifar100"], "cifar100"),
])
def test_each_command_line_as_a_process(module, argv, text, tmp_path):
    run = [sys.executable, "-m", module, *argv]
    res = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "SIDLIB_CACHE": str(tmp_path)})
    assert res.returncode == 2 and res.stderr.startswith("error: ") and text in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    res = subprocess.run(run + ["--debug"], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "SIDLIB_CACHE": str(tmp_path)})
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr and text in res.stderr
