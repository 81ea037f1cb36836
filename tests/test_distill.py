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


def assert_weights_within_noise(a_dir, b_dir):
    """Equal up to Adam-amplified rounding noise: a handful of elements whose gradient is of the order of eps may
    move by a fraction of a step (g / (|g| + eps) turns their rounding noise into O(lr)); a wrong term moves most."""
    _, a = state_tensors(a_dir)
    _, b = state_tensors(b_dir)
    err = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]) / EQ_LR
    assert float((err > EQ_ATOL / EQ_LR).double().mean()) < 1e-4 and float(err.max()) < 1.0, float(err.max())


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
    assert_weights_within_noise(a, b)


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


class GaussTeacher(torch.nn.Module):
    """Exact denoiser of 2-D data N(0, 0.25 I); ``value`` replaces its output when given (e.g. NaN everywhere)."""

    img_resolution, img_channels, label_dim = 1, 2, 0
    init_kwargs = {'kind': 'gauss-teacher'}
    value = None

    def forward(self, x, sigma, class_labels=None, **kw):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        out = 0.25 / (0.25 + s ** 2) * x
        return out if self.value is None else torch.full_like(out, self.value)


class AllNaNTeacher(GaussTeacher):
    value = float('nan')


MLP_STUDENT = dict(img_resolution=1, img_channels=2, model_type='MLPNet', model_channels=16, num_layers=2)


def mlp_cfg(teacher, **kw):
    return {**dict(teacher=teacher, student=MLP_STUDENT, batch=16, iterations=3, lr=1e-3, glr=1e-3, tick_kimg=0.016,
                   state_ticks=1, snap_ticks=0, grid_size=0, progress=False, num_threads=1), **kw}


def test_a_run_whose_samples_are_all_dropped_stops_with_a_clear_error(tmp_path):
    register_teacher('test-all-nan-teacher', AllNaNTeacher)
    from sidlib.distill.loop import TrainingFault
    with pytest.raises(TrainingFault, match='3 consecutive iterations'):
        distill(mlp_cfg('test-all-nan-teacher', iterations=10, max_bad_iterations=3), run_dir=tmp_path / 'run')
    log = read_jsonl(tmp_path / 'run' / 'log.jsonl')
    assert log[-1]['fault'] and log[-1]['iteration'] == 3 and log[-1]['loss_G'] is None   # no fake 0.0 loss
    # 0 = never stop: the run ends, and the log says every generator sample was dropped.
    distill(mlp_cfg('test-all-nan-teacher', max_bad_iterations=0), run_dir=tmp_path / 'on')
    log = read_jsonl(tmp_path / 'on' / 'log.jsonl')
    assert log[-1]['totals']['bad_iterations'] == 3 and all(r['loss_G'] is None for r in log)


def test_a_teacher_with_nan_weights_is_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    net = EDMPrecond(**TEACHER_KWARGS)
    with torch.no_grad():
        next(net.parameters()).fill_(float('nan'))
    teacher = save_network(tmp_path / 'nan-teacher', net)
    with pytest.raises(ConfigError, match='teacher: .* NaN or infinite'):
        distill(base_cfg(str(teacher), iterations=1), run_dir=tmp_path / 'run')
    assert not (tmp_path / 'run').exists()


def test_nan_produced_inside_G_costs_only_its_rows(tmp_path, monkeypatch):
    """G yields NaN (inside its graph) for the latents with z[0] > 1: the generator step regenerates the other rows,
    so G's gradient never holds a non-finite element (without that, 0 * NaN reaches every weight of G)."""
    import sidlib.distill.loop as loop
    real = loop.generate_onestep

    def nan_inside(G, z, sigma, labels=None):
        return real(G, z + torch.where(z[:, :1] > 1, float('nan'), 0.0), sigma, labels)
    monkeypatch.setattr(loop, 'generate_onestep', nan_inside)
    register_teacher('test-gauss-teacher', GaussTeacher)
    run = distill(mlp_cfg('test-gauss-teacher', batch=32), run_dir=tmp_path / 'run')
    log = read_jsonl(run / 'log.jsonl')
    assert log[-1]['totals']['nan_samples_G'] > 0 and log[-1]['totals']['nan_samples_fake'] > 0
    assert log[-1]['totals']['nonfinite_grads_G'] == 0 and log[-1]['totals']['nonfinite_grads_fake'] == 0
    assert all(torch.isfinite(v).all() for v in state_tensors(run)[1].values())


# ------------------------------------------------------------------------------------------------
# Snapshot cadence and retention.

def test_extra_snap_ticks_give_siDs_evaluation_schedule(tmp_path):
    """SiD's loop evaluates at tick 0, 10, ..., 100 and every 50 ticks; scaled down: every 3 ticks plus ticks 0 and
    1 (and the end). One iteration per tick, 1 kimg each, so snapshot k is network-snapshot-(k + 1)."""
    register_teacher('test-gauss-teacher', GaussTeacher)
    ticks = []
    run = distill(mlp_cfg('test-gauss-teacher', batch=1000, tick_kimg=1, iterations=8, snap_ticks=3,
                          extra_snap_ticks=[0, 1]), run_dir=tmp_path / 'run', eval_fn=lambda G, kimg: ticks.append(kimg))
    expected_ticks = [0, 1, 3, 6, 7]
    assert [r['tick'] for r in read_jsonl(run / 'log.jsonl') if 'metrics' in r] == expected_ticks
    assert sorted(p.name for p in run.glob('network-snapshot-*.json')) == \
        [f'network-snapshot-{t + 1:06d}.json' for t in expected_ticks]


def test_snapshot_retention_keeps_every_nth_the_newest_and_the_best(tmp_path):
    register_teacher('test-gauss-teacher', GaussTeacher)
    cfg = mlp_cfg('test-gauss-teacher', batch=1000, tick_kimg=1, iterations=7, snap_ticks=1, snapshot_keep_every=2,
                  snapshot_keep_best='dist', snapshot_best_mode='min')
    run = distill(cfg, run_dir=tmp_path / 'run', eval_fn=lambda G, kimg: {'dist': abs(kimg - 4)})
    # Snapshots at kimg 1..7 (indices 0..6): every 2nd (kimg 1, 3, 5, 7), the newest (7), the best (kimg 4).
    kept = sorted(int(p.name[17:23]) for p in run.glob('network-snapshot-*.json'))
    assert kept == [1, 3, 4, 5, 7]
    assert sorted(int(p.name[17:23]) for p in run.glob('network-snapshot-*.safetensors')) == kept
    deleted = [n for r in read_jsonl(run / 'log.jsonl') for n in r.get('snapshots_deleted', [])]
    assert sorted(deleted) == ['network-snapshot-000002', 'network-snapshot-000006']
    assert not list((run / '.deleting').iterdir())
    load_checkpoint(run / 'network-snapshot-000004.safetensors')


def test_a_teacher_named_as_the_loader_names_it_is_accepted(teacher_path, tmp_path, monkeypatch):
    """``~/<stem>`` without the suffix: the teacher check before the run and the loader find the same file."""
    monkeypatch.setenv('HOME', str(Path(teacher_path).parent))
    stem = '~/' + Path(teacher_path).stem
    run = distill({**base_cfg(stem), 'iterations': 1, 'state_ticks': 0}, run_dir=tmp_path / 'run')
    assert json.loads((run / 'config.json').read_text())['teacher'] == stem


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
        seen.append((id(self), self.precision, self.compute_dtype('cpu')))
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
    # Static loss scales (SiD): no GradScaler state; Adam's eps is SiD's 1e-6 under fp16.
    assert st['scaler_G'] == {} and st['scaler_fake'] == {}
    assert st['opt_G']['param_groups'][0]['eps'] == (1e-6 if precision == 'fp16' else 1e-8)
    assert all(r['skipped_steps_G'] == r['skipped_steps_fake'] == 0 for r in read_jsonl(run / 'log.jsonl'))


def _first_step_grads(teacher_path, tmp_path, name, **kw):
    """The gradients the first fake-score Adam step receives (a global optimizer step pre-hook)."""
    grads = []

    def hook(opt, args, kwargs):
        if not grads:
            grads.append([p.grad.clone() for g in opt.param_groups for p in g['params'] if p.grad is not None])
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(hook)
    try:
        distill(base_cfg(teacher_path, iterations=1, **EQ, **kw), run_dir=tmp_path / name)
    finally:
        handle.remove()
    return grads[0]


def test_loss_scales_are_static_and_reach_adam_unscaled(teacher_path, tmp_path):
    """As SiD: the loss times ls reaches Adam as it is (Adam is scale-invariant up to eps), no dynamic scaler. A power
    of two scales every fp32 gradient exactly; under fp16 the activation gradients round differently (subnormals),
    so there the gradients only point the same way."""
    for precision in ('fp32', 'fp16'):
        one = _first_step_grads(teacher_path, tmp_path, f'{precision}-1', precision=precision, ls=1.0)
        eight = _first_step_grads(teacher_path, tmp_path, f'{precision}-8', precision=precision, ls=8.0)
        assert len(one) == len(eight) and any(g.abs().max() > 0 for g in one)
        if precision == 'fp32':
            assert all(torch.equal(b, 8 * a) for a, b in zip(one, eight))
        else:
            a, b = torch.cat([g.flatten() for g in one]), torch.cat([g.flatten() for g in eight])
            assert float(torch.nn.functional.cosine_similarity(8 * a, b, dim=0)) > 0.999
            assert abs(float(b.norm() / a.norm()) / 8 - 1) < 0.01


def test_nonfinite_gradients_are_replaced_and_counted_and_the_step_taken():
    from sidlib.distill.setup import clean_grads as _clean_grads
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([float('nan'), float('inf'), 2.0])
    assert int(_clean_grads([w])) == 2
    assert w.grad.tolist() == [0.0, 1e5, 2.0]   # SiD's replacement


def test_dynamic_loss_scaler_skips_a_step_and_counts_it_apart(teacher_path, tmp_path):
    """loss_scaler='dynamic' (torch's GradScaler): an overflowing first step is skipped, counted as a skipped step
    besides the non-finite gradient elements."""
    from sidlib.distill.setup import clean_grads as _clean_grads
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    scaler.scale(w * torch.tensor([1.0, float('inf'), 1.0])).sum().backward()
    assert int(_clean_grads([w], scaler, opt)) == 1
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() == 2.0 ** 9
    run = distill(base_cfg(teacher_path, iterations=2, loss_scaler='dynamic'), run_dir=tmp_path / 'run')
    log = read_jsonl(run / 'log.jsonl')
    assert all('skipped_steps_G' in r and r['skipped_steps_G'] <= r['nonfinite_grads_G'] for r in log)
    assert load_training_state(run / 'training-state.pt')['scaler_G']['scale'] > 0


@pytest.fixture(scope='module')
def eq_baseline(teacher_path, tmp_path_factory):
    return distill(base_cfg(teacher_path, iterations=2, **EQ), run_dir=tmp_path_factory.mktemp('eq') / 'base')


@pytest.mark.parametrize('flag', [{'channels_last': True}, {'attention': 'math'}, {'fused_adam': True}])
def test_performance_flags_do_not_change_results(teacher_path, eq_baseline, tmp_path, flag):
    run = distill(base_cfg(teacher_path, iterations=2, **EQ, **flag), run_dir=tmp_path / 'flag')
    assert_weights_within_noise(eq_baseline, run)


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


def _copy_checkpoint(src, folder):
    """A copy of a save_network checkpoint (weights and sidecar) in ``folder``; returns the weights path."""
    folder.mkdir(parents=True)
    for suffix in ('.safetensors', '.json'):
        (folder / f'teacher{suffix}').write_bytes(Path(src).with_suffix(suffix).read_bytes())
    return str(folder / 'teacher.safetensors')


def test_resume_follows_the_teachers_weights_not_its_path(teacher_path, tmp_path):
    start = {'pairs': 4, 'heun_steps': 2, 'steps': 1, 'batch': 4, 'fake_steps': 1}
    old = _copy_checkpoint(teacher_path, tmp_path / 'checkout-a')
    run = distill(base_cfg(old, iterations=1, g_init={**start, 'cache_dir': str(tmp_path / 'checkout-a' / 'g')}),
                  run_dir=tmp_path / 'run')
    # The checkout moved: the same weights elsewhere, the start kept elsewhere.
    new = _copy_checkpoint(teacher_path, tmp_path / 'checkout-b')
    distill(base_cfg(new, iterations=2, g_init={**start, 'cache_dir': str(tmp_path / 'checkout-b' / 'g')}),
            run_dir=run)
    state = load_training_state(run / 'training-state.pt')
    assert state['iteration'] == 2 and state['teacher']['source'] == new
    # Other weights at the same path are another teacher.
    net = load_checkpoint(new)[0]
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    save_network(Path(new).with_suffix(''), net)
    with pytest.raises(ConfigError, match='teacher: cannot resume: .* other weights'):
        distill(base_cfg(new, iterations=3, g_init={**start, 'cache_dir': str(tmp_path / 'checkout-b' / 'g')}),
                run_dir=run)


def test_a_shared_start_is_found_after_the_teacher_moves(teacher_path, tmp_path):
    start = {'pairs': 4, 'heun_steps': 2, 'steps': 2, 'batch': 4, 'fake_steps': 1, 'cache_dir': str(tmp_path / 'g')}
    first = distill(base_cfg(_copy_checkpoint(teacher_path, tmp_path / 'a'), iterations=1, g_init=start),
                    run_dir=tmp_path / 'run-a')
    second = distill(base_cfg(_copy_checkpoint(teacher_path, tmp_path / 'b'), iterations=1, g_init=start),
                     run_dir=tmp_path / 'run-b')
    logs = [read_jsonl(run / 'log.jsonl')[0] for run in (first, second)]
    assert 'g_init_cached' not in logs[0] and logs[1]['g_init_cached'] is True
    assert len(list((tmp_path / 'g').glob('g-init-*.pt'))) == 1
    assert_weights(first, second, exact=True)  # same start, same draws: the same run
