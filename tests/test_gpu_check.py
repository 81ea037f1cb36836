"""``benchmarks/gpu_check.py`` runs end to end on the CPU with tiny sizes (the real check needs a GPU lease)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_tiny_on_the_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / 'gpu_check.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    res = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'gpu_check.py'), '--device', 'cpu', '--tiny',
                          '--out', str(out), '--sid-repo', '', '--edm-repo', '', '--budget', '240'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r['device'] == 'cpu' and r['tiny'] and not r.get('errors') and not r.get('skipped', [])[1:]
    for precision in ('fp32', 'fp16', 'bf16'):
        job = r['sid_job'][precision]
        assert job['iterations_per_s'] > 0 and job['nonfinite_grads'] == 0
    for arch in ('cifar10-ddpmpp', 'imagenet64-adm'):
        for option in ('sdpa', 'math', 'sdpa+channels_last', 'fp16', 'bf16'):
            assert r['options'][arch][option]['s_per_img'] > 0, (arch, option)
    assert 'sid_job fp16' in res.stdout   # the printed summary
