"""The SiD distillation loop on a tiny random EDM teacher (CPU, a handful of iterations per run)."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sidlib.distill import ConfigError, DistillConfig, distill, register_teacher
from sidlib.distill.cli import main
from sidlib.io.checkpoints import load_checkpoint, save_network
from sidlib.io.logs import read_jsonl, training_curve
from sidlib.io.training_state import load_training_state
from sidlib.networks import EDMPrecond, edm_kwargs

REPO = Path(__file__).resolve().parents[1]
# A scaled-down DDPM++ (EDM's --arch=ddpmpp) with augment conditioning, as the CIFAR-10 teachers have.
TEACHER_KWARGS = edm_kwargs('ddpmpp', img_resolution=8, channel_mult=[1, 2], model_channels=8, num_blocks=1,
                            attn_resolutions=[4], augment_dim=9, dropout=0.0)


@pytest.fixture(scope='module')
def teacher_path(tmp_path_factory):
    """A tiny DDPM++-style EDM teacher with perturbed weights (so teacher != identity), saved by save_network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EDMPrecond(**TEACHER_KWARGS)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    path = save_network(tmp_path_factory.mktemp('teacher') / 'teacher', net, meta={'provenance': 'test'})
    return str(path)


def base_cfg(teacher, **kw):
    cfg = dict(teacher=teacher, batch=4, batch_gpu=2, iterations=4, lr=1e-3, glr=1e-3, tick_kimg=0.004,
               snap_ticks=0, state_ticks=1, ema_halflife_kimg=0.01, grid_size=0, progress=False, num_threads=1,
               seed=3, augment_p=0.5)
    cfg.update(kw)
    return cfg


# Settings of the equivalence tests. Adam divides each gradient by its running RMS, so a parameter
# whose true gradient is zero (e.g. the key bias of attention: softmax ignores a shift of all logits)
# turns float rounding noise into steps of size lr whose sign depends on summation order. adam_eps=1e-5
# sits far below the real gradients but above that noise; the tolerance is then a fraction of one
# Adam step (lr). Dropout is off because its masks depend on the batch split (see sidlib.distill).
EQ_LR = 1e-4
EQ = dict(dropout=0.0, adam_eps=1e-5, lr=EQ_LR, glr=EQ_LR)
EQ_ATOL = 0.2 * EQ_LR


def state_tensors(run_dir):
    st = load_training_state(Path(run_dir) / 'training-state.pt')
    return st, {f'{net}.{k}': v for net in ('G', 'fake', 'G_ema') for k, v in st[net].items()}


def assert_weights(a_dir, b_dir, exact=False, rtol=1e-4, atol=1e-6):
    _, a = state_tensors(a_dir)
    _, b = state_tensors(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# ------------------------------------------------------------------------------------------------
# In-process run.

def test_inprocess_run_writes_state_log_snapshot_and_grid(teacher_path, tmp_path):
    calls = []

    def eval_fn(G_ema, kimg):
        calls.append(kimg)
        return {'probe': float(sum(p.double().sum() for p in G_ema.parameters()))}

    run = distill(base_cfg(teacher_path, iterations=5, snap_ticks=2, grid_size=4, dropout=0.1),
                  run_dir=tmp_path / 'run', eval_fn=eval_fn)
    files = sorted(os.listdir(run))
    assert {'config.json', 'log.jsonl', 'training-state.pt', 'fakes_init.png'} <= set(files)
    assert any(f.startswith('network-snapshot-') and f.endswith('.safetensors') for f in files)
    assert any(f.startswith('samples-') and f.endswith('.png') for f in files)

    log = read_jsonl(run / 'log.jsonl')
    assert [r['iteration'] for r in log] == [1, 2, 3, 4, 5]
    assert [r['images_seen'] for r in log] == [4, 8, 12, 16, 20]
    for r in log:
        assert math.isfinite(r['loss_fake']) and math.isfinite(r['loss_G'])
        assert r['nan_samples_fake'] == r['nan_samples_G'] == 0
        assert r['sec_per_iter'] > 0
    assert [r['tick'] for r in log if 'metrics' in r] == [0, 2, 4] and len(calls) == 3

    st, tensors = state_tensors(run)
    assert st['iteration'] == 5 and st['images_seen'] == 20
    teacher, _ = load_checkpoint(teacher_path)
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, st['G'][k])]
    assert changed, 'G never moved away from the teacher'
    assert st['opt_G']['param_groups'][0]['betas'] == [0.0, 0.999] or tuple(st['opt_G']['param_groups'][0]['betas']) == (0.0, 0.999)

    snap = sorted(run.glob('network-snapshot-*.safetensors'))[-1]
    G_ema, meta = load_checkpoint(snap)
    assert meta['init_sigma'] == 2.5 and meta['alpha'] == 1.2 and meta['images_seen'] == 20
    assert meta['teacher']['source'] == teacher_path
    for k, v in G_ema.state_dict().items():
        assert torch.equal(v, st['G_ema'][k])


def test_micro_batches_do_not_change_the_result(teacher_path, tmp_path):
    # With dropout off, gradient accumulation over micro-batches is the same math as one big batch.
    a = distill(base_cfg(teacher_path, iterations=3, batch_gpu=1, **EQ), run_dir=tmp_path / 'a')
    b = distill(base_cfg(teacher_path, iterations=3, batch_gpu=4, **EQ), run_dir=tmp_path / 'b')
    assert_weights(a, b, rtol=0, atol=EQ_ATOL)


def test_edm_pickle_teacher_is_accepted(tmp_path):
    sys.path.insert(0, str(REPO / 'tests'))
    try:
        from edm_format import edm_snapshot, write_edm_pickle
    finally:
        sys.path.pop(0)
    torch.manual_seed(1)
    net = EDMPrecond(**TEACHER_KWARGS)
    write_edm_pickle(tmp_path / 'teacher.pkl', edm_snapshot(net))
    run = distill(base_cfg(str(tmp_path / 'teacher.pkl'), iterations=1, augment_p=0.0,
                           teacher_kwargs={'model_channels': 8, 'augment_dim': 9}), run_dir=tmp_path / 'run')
    assert load_training_state(run / 'training-state.pt')['iteration'] == 1


def test_conditional_teacher_gets_one_hot_labels(tmp_path):
    torch.manual_seed(2)
    net = EDMPrecond(**{**TEACHER_KWARGS, 'label_dim': 3})
    teacher = save_network(tmp_path / 'cond', net)
    seen = []
    hook = net.__class__.forward

    def spy(self, x, sigma, class_labels=None, *a, **kw):
        seen.append(class_labels)
        return hook(self, x, sigma, class_labels, *a, **kw)

    net.__class__.forward = spy
    try:
        distill(base_cfg(str(teacher), iterations=1, label_probs=[0, 1, 1]), run_dir=tmp_path / 'run')
    finally:
        net.__class__.forward = hook
    labels = [c for c in seen if c is not None and c.shape[0] > 0]
    assert labels and all(c.shape[1] == 3 for c in labels)
    for c in labels:
        assert torch.equal(c.sum(1), torch.ones(c.shape[0])) and c[:, 0].sum() == 0  # class 0 has probability 0


# ------------------------------------------------------------------------------------------------
# In-process (analytic) teachers, NaN guards.

class NaNTeacher(torch.nn.Module):
    """2-D Gaussian data denoiser that returns NaN for inputs in the right half-plane of x_t[:, 0]."""

    img_resolution, img_channels, label_dim = 1, 2, 0
    init_kwargs = {'kind': 'nan-teacher'}

    def forward(self, x, sigma, class_labels=None, **kw):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        out = 0.25 / (0.25 + s ** 2) * x
        bad = (x[:, :1] > 0.5).float()
        return out + bad * float('nan')


def test_analytic_teacher_and_nan_samples_are_counted_and_dropped(tmp_path):
    register_teacher('test-nan-teacher', NaNTeacher)
    student = dict(img_resolution=1, img_channels=2, model_type='MLPNet', model_channels=16, num_layers=2)
    cfg = dict(teacher='test-nan-teacher', student=student, batch=16, batch_gpu=16, iterations=3, lr=1e-3,
               glr=1e-3, tick_kimg=1, state_ticks=1, snap_ticks=0, grid_size=0, progress=False, num_threads=1,
               init_sigma=2.5)
    run = distill(cfg, run_dir=tmp_path / 'run')
    log = read_jsonl(run / 'log.jsonl')
    assert sum(r['nan_samples_G'] for r in log) > 0
    assert log[-1]['totals']['nan_samples_G'] == sum(r['nan_samples_G'] for r in log)
    st, tensors = state_tensors(run)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    # The student was built from the student kwargs, not copied from the teacher.
    assert st['teacher']['kind'] == 'in-process'


# ------------------------------------------------------------------------------------------------
# Bad input is refused before anything is computed or written.

@pytest.mark.parametrize('change, key', [
    ({'batch': 6, 'batch_gpu': 4}, 'batch'),
    ({'teacher': 'no-such-teacher'}, 'teacher'),
    ({'alpha': 11.0}, 'alpha'),
    ({'alpha': float('nan')}, 'alpha'),
    ({'tmax': 0}, 'tmax'),
    ({'tmax': 1200}, 'tmax'),
    ({'init_sigma': 0.0}, 'init_sigma'),
    ({'init_sigma': -1.0}, 'init_sigma'),
    ({'teacher_kwargs': {'model_channels': 16}}, 'teacher_kwargs'),
    ({'teacher_kwargs': {'augment_dim': 0}}, 'teacher_kwargs'),
    ({'precision': 'fp8'}, 'precision'),
    ({'no_such_key': 1}, 'no_such_key'),
])
def test_bad_input_is_refused_and_nothing_is_written(teacher_path, tmp_path, change, key):
    run_dir = tmp_path / 'run'
    cfg = {**base_cfg(teacher_path), **change}
    with pytest.raises(ConfigError, match=key):
        distill(cfg, run_dir=run_dir)
    assert not run_dir.exists()


def test_cli_refuses_bad_input_with_exit_code_2(teacher_path, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    assert main(['--run-dir', str(run_dir), '--set', f'teacher={teacher_path}', '--set', 'iterations=1',
                 '--set', 'batch=3', '--set', 'batch_gpu=2']) == 2
    assert 'batch' in capsys.readouterr().err
    assert not run_dir.exists()


def test_cli_reads_yaml_and_overrides(teacher_path, tmp_path):
    cfg_file = _write_cfg(tmp_path / 'cfg.yaml', base_cfg(teacher_path, iterations=3))
    run_dir = tmp_path / 'run'
    assert main(['--config', str(cfg_file), '--run-dir', str(run_dir), '--iterations=1', '--set', 'seed=5']) == 0
    stored = json.loads((run_dir / 'config.json').read_text())
    assert stored['iterations'] == 1 and stored['seed'] == 5 and stored['run_dir'] == str(run_dir)
    assert load_training_state(run_dir / 'training-state.pt')['iteration'] == 1


def test_config_round_trip_and_adam_eps():
    cfg = DistillConfig.from_dict({'batch': 64, 'augment_p': 0.12, 'dropout': 0.13, 'label_probs': (1, 2)})
    assert cfg.batch == 64 and cfg.augment_p == 0.12 and cfg.dropout == 0.13 and cfg.lsg == 100
    assert cfg.label_probs == [1, 2]   # tuples become lists, so a stored config compares equal
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.resolved_adam_eps() == 1e-8
    # Unset eps follows the precision (1e-6 under fp16); an explicit eps wins.
    assert cfg.replace(precision='fp16', adam_eps=None).resolved_adam_eps() == 1e-6
    assert cfg.replace(precision='fp16', adam_eps=1e-7).resolved_adam_eps() == 1e-7
    with pytest.raises(ConfigError, match='lr'):
        DistillConfig.from_dict({'lr': 'fast'})
    # Presets live outside sidlib now: 'preset' is an unknown key like any other.
    with pytest.raises(ConfigError, match='unknown config key.*preset'):
        DistillConfig.from_dict({'preset': 'cifar10-uncond'})


def test_config_errors_name_keys_with_the_callers_prefix():
    where = 'digits.distill.'
    with pytest.raises(ConfigError) as err:
        DistillConfig.from_dict({'batch': 8, 'no_such_key': 1}, where=where)
    assert 'digits.distill.no_such_key' in str(err.value) and 'digits.distill.batch' not in str(err.value)
    for key, value in (('lr', 'fast'), ('batch', 2.5), ('progress', 'yes'), ('student', [1]), ('teacher', None)):
        with pytest.raises(ConfigError, match=f'^digits\\.distill\\.{key}: '):
            DistillConfig.from_dict({key: value}, where=where)
    # Without a prefix the bare key is named; validate() takes the same prefix.
    with pytest.raises(ConfigError, match='^lr: '):
        DistillConfig.from_dict({'lr': 'fast'})
    cfg = DistillConfig.from_dict({'teacher': 't', 'iterations': 1, 'alpha': 11.0, 'tmax': 0.0})
    with pytest.raises(ConfigError) as err:
        cfg.validate(where=where)
    assert 'digits.distill.alpha:' in str(err.value) and 'digits.distill.tmax:' in str(err.value)


def test_eval_kwargs_name_a_factory_called_once(teacher_path, tmp_path):
    """``eval_fn`` + ``eval_kwargs``: the paper's proxy FID, built once, evaluated at every snapshot."""
    sys.path.insert(0, str(REPO / 'tests'))
    try:
        import eval_fixtures as ef  # registers the tiny feature extractor
    finally:
        sys.path.pop(0)
    ref = tmp_path / 'ref.npz'
    ef.write_reference_npz(ref, ef.random_images(24, seed=3))
    cfg = base_cfg(teacher_path, iterations=3, snap_ticks=2, eval_fn='sidlib.metrics.protocol:proxy_fid',
                   eval_kwargs={'reference_stats': str(ref), 'num_images': 4, 'batch_size': 4,
                                'feature_extractor': ef.TINY})
    run = distill(cfg, run_dir=tmp_path / 'run')
    log = read_jsonl(run / 'log.jsonl')
    curve = training_curve(run)
    # Snapshots at ticks 0 and 2 and at the end; the curve holds exactly the records with metrics.
    assert [r['iteration'] for r in curve] == [r['iteration'] for r in log if 'metrics' in r] == [1, 3]
    assert all(set(r) == {'kimg', 'images_seen', 'iteration', 'fid4_proxy'} for r in curve)
    assert all(math.isfinite(r['fid4_proxy']) and r['fid4_proxy'] > 0 for r in curve)
    assert json.loads((run / 'config.json').read_text())['eval_kwargs']['num_images'] == 4


def test_bad_eval_kwargs_are_refused_before_anything_is_written(teacher_path, tmp_path):
    run_dir = tmp_path / 'run'
    cfg = base_cfg(teacher_path, eval_fn='sidlib.metrics.protocol:proxy_fid', eval_kwargs={'no_such_arg': 1})
    with pytest.raises(ConfigError, match='eval_kwargs'):
        distill(cfg, run_dir=run_dir)
    with pytest.raises(ConfigError, match='eval_fn'):
        distill({**cfg, 'eval_fn': 'sidlib.metrics.protocol:no_such_function'}, run_dir=run_dir)
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------------
# Precision modes and performance flags.

@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_modes_run(teacher_path, tmp_path, precision):
    seen = []
    forward = EDMPrecond.forward

    def spy(self, *a, **kw):
        seen.append((id(self), self.precision, self.autocast_dtype('cpu')))
        return forward(self, *a, **kw)

    EDMPrecond.forward = spy
    try:
        run = distill(base_cfg(teacher_path, iterations=2, precision=precision, grid_size=1),
                      run_dir=tmp_path / 'run')
    finally:
        EDMPrecond.forward = forward
    # The loop sets the precision of all four networks (teacher, fake score, G, and G_ema for the sample grid).
    assert len({net for net, _, _ in seen}) == 4
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    assert {(p, d) for _, p, d in seen} == {(precision, dtype)}
    st, tensors = state_tensors(run)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    if precision == 'fp16':
        # One GradScaler per optimiser, saved with the state; eps defaults to 1e-6.
        assert st['scaler_G'] and st['scaler_fake'] and st['scaler_G']['scale'] > 0
        assert st['opt_G']['param_groups'][0]['eps'] == 1e-6
    else:
        assert st['scaler_G'] == {} and st['opt_G']['param_groups'][0]['eps'] == 1e-8


def test_grad_scaler_skips_steps_on_overflow_and_counts_bad_gradients():
    from sidlib.distill.loop import _optimizer_step
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    (scaler.scale(w * torch.tensor([1.0, float('inf'), 1.0])).sum()).backward()
    bad = _optimizer_step(opt, scaler, [w])
    assert int(bad) == 1
    assert torch.equal(w.detach(), torch.ones(3))  # step skipped
    assert scaler.get_scale() == 2.0 ** 9  # scale backed off
    # Without a scaler (fp32/bf16) bad gradient elements are counted and replaced, and the step is taken.
    w.grad = torch.tensor([float('nan'), float('inf'), 2.0])
    opt = torch.optim.SGD([w], lr=1.0)
    disabled = torch.amp.GradScaler('cpu', enabled=False)
    assert int(_optimizer_step(opt, disabled, [w])) == 2
    assert w.grad.tolist() == [0.0, 1e5, 2.0]
    assert w.detach().tolist() == [1.0, 1.0 - 1e5, -1.0]


@pytest.fixture(scope='module')
def eq_baseline(teacher_path, tmp_path_factory):
    return distill(base_cfg(teacher_path, iterations=2, **EQ), run_dir=tmp_path_factory.mktemp('eq') / 'base')


@pytest.mark.parametrize('flag', [{'channels_last': True}, {'attention': 'sdpa'}, {'fused_adam': True}])
def test_performance_flags_do_not_change_results(teacher_path, eq_baseline, tmp_path, flag):
    run = distill(base_cfg(teacher_path, iterations=2, **EQ, **flag), run_dir=tmp_path / 'flag')
    assert_weights(eq_baseline, run, rtol=0, atol=EQ_ATOL)


@pytest.mark.skipif(os.environ.get('SIDLIB_TEST_COMPILE') != '1',
                    reason='torch.compile on CPU (inductor + C++ toolchain) needs ~13 minutes of compilation for '
                           'this test on a 2-core machine (it passes); set SIDLIB_TEST_COMPILE=1 to run')
def test_compile_flag_does_not_change_results(teacher_path, eq_baseline, tmp_path):
    run = distill(base_cfg(teacher_path, iterations=2, compile=True, **EQ), run_dir=tmp_path / 'c')
    assert_weights(eq_baseline, run, rtol=0, atol=EQ_ATOL)


# ------------------------------------------------------------------------------------------------
# Subprocesses: torchrun with two gloo processes, SIGKILL and resume.

def _write_cfg(path, cfg):
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    env = dict(os.environ)
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    env['OMP_NUM_THREADS'] = '1'
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(teacher_path, tmp_path):
    cfg = base_cfg(teacher_path, iterations=20, tick_kimg=0.02, state_ticks=5, **EQ)
    single = distill(cfg, run_dir=tmp_path / 'single')
    cfg_file = _write_cfg(tmp_path / 'cfg.yaml', cfg)
    torchrun = Path(sys.executable).with_name('torchrun')
    cmd = [str(torchrun), '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(_free_port()),
           '-m', 'sidlib.distill', '--config', str(cfg_file), '--run-dir', str(tmp_path / 'ddp')]
    res = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    st, _ = state_tensors(tmp_path / 'ddp')
    assert st['world_size'] == 2 and st['iteration'] == 20
    assert_weights(single, tmp_path / 'ddp', rtol=0, atol=EQ_ATOL)
    # Only rank 0 logs: one record per tick.
    log = read_jsonl(tmp_path / 'ddp' / 'log.jsonl')
    assert [r['iteration'] for r in log] == [r['iteration'] for r in read_jsonl(single / 'log.jsonl')]


@pytest.mark.slow
def test_sigkill_and_resume_gives_bitwise_identical_weights(teacher_path, tmp_path):
    cfg = base_cfg(teacher_path, iterations=20, dropout=0.1, state_ticks=1)
    reference = distill(cfg, run_dir=tmp_path / 'reference')

    run_dir = tmp_path / 'killed'
    cfg_file = _write_cfg(tmp_path / 'cfg.yaml', cfg)
    cmd = [sys.executable, '-m', 'sidlib.distill', '--config', str(cfg_file), '--run-dir', str(run_dir)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            log = read_jsonl(run_dir / 'log.jsonl')
            if log and log[-1]['iteration'] >= 5:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # The log is written before the state of the same tick, so the kill may land between the two.
    killed_at = load_training_state(run_dir / 'training-state.pt')['iteration']
    assert 4 <= killed_at < 20

    distill(cfg, run_dir=run_dir)  # auto-resume from the run directory
    st, _ = state_tensors(run_dir)
    assert st['iteration'] == 20
    assert_weights(reference, run_dir, exact=True)
    ref_state, _ = state_tensors(reference)
    for opt in ('opt_G', 'opt_fake'):
        for pid, s in ref_state[opt]['state'].items():
            for k, v in s.items():
                assert torch.equal(v, st[opt]['state'][pid][k]), (opt, pid, k)
    # The log reads as if the run had never been interrupted.
    assert [r['iteration'] for r in read_jsonl(run_dir / 'log.jsonl')] == list(range(1, 21))


def test_resume_refuses_a_changed_config(teacher_path, tmp_path):
    run = distill(base_cfg(teacher_path, iterations=1), run_dir=tmp_path / 'run')
    with pytest.raises(ConfigError, match='alpha'):
        distill(base_cfg(teacher_path, iterations=2, alpha=1.0), run_dir=run)
    # A longer duration is a legitimate resume.
    distill(base_cfg(teacher_path, iterations=2), run_dir=run)
    assert load_training_state(run / 'training-state.pt')['iteration'] == 2
