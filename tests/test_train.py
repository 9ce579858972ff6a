"""End-to-end training on a tiny dataset: resume after faults, device counts and meshes
(FSDP), NaN, export.

Each run goes through `main.py` in a subprocess, as users run it, so that device counts
and process groups can differ between runs.
"""

import base64
import json
import pathlib
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import ssast_jax
from ssast_jax import export
from ssast_jax.interchange import workdir as run_record
from ssast_jax.config.settings import resolve
from ssast_jax.data.demo import write_demo_dataset
from ssast_jax.training import checkpoints, faults
from ssast_jax.training.state import init_state
from runs import (ROOT, assert_same_run, env, final_params, metric_rows, run_main,
                  tiny_run_flags, train_losses, wait_for_steps)

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp('data')
  return write_demo_dataset(out, num_clips=80, seed=1, target_length=64, num_mel_bins=64)


@pytest.fixture(scope='module')
def reference_run(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  run_main(tiny_run_flags(dataset, workdir))
  return workdir


def test_run_logs_evaluates_and_checkpoints(reference_run):
  rows = metric_rows(reference_run)
  losses = train_losses(reference_run)
  assert sorted(losses) == list(range(1, 19))  # 2 epochs of 72 clips in batches of 8
  evals = [r for r in rows if 'eval/mpc_acc' in r]
  assert [r['step'] for r in evals] == [0, 8, 16]
  assert all(0 <= r['eval/mpc_acc'] <= 1 and r['eval/mpg_loss'] > 0 for r in evals)
  train = [r for r in rows if 'train/loss' in r]
  for row in train:
    np.testing.assert_allclose(row['train/loss'],
                               row['train/mpc_loss'] + 10 * row['train/mpg_loss'], rtol=1e-5)
  result = np.loadtxt(pathlib.Path(reference_run, 'result.csv'), delimiter=',', ndmin=2)
  assert result.shape == (2, 5)
  assert json.loads(pathlib.Path(reference_run, 'config.json').read_text())['task'] == (
      'pretrain_joint')
  events = list(pathlib.Path(reference_run, 'tensorboard').iterdir())
  assert events


def test_export_writes_the_checkpoints_parameters(reference_run, tmp_path, capsys):
  """`python -m ssast_jax.export` reads only the parameters of a checkpoint: they equal
  those of its whole training state."""
  settings = resolve(ml_collections.ConfigDict(checkpoints.read_config(reference_run)),
                     check_data=False)
  mngr = checkpoints.manager(str(reference_run), settings.objective.task,
                             settings.run.keep_checkpoints)
  try:
    abstract = jax.eval_shape(lambda: init_state(settings.model, 0, settings.optim.lr))
    state, _ = checkpoints.restore(mngr, mngr.latest_step(), abstract)
  finally:
    mngr.close()
  out = tmp_path / 'model.pth'
  export.main(['--workdir', str(reference_run), '--out', str(out), '--which', 'latest'])
  assert capsys.readouterr().out.startswith(
      f'wrote {out} (pytorch) from the latest checkpoint (step 18) of {reference_run} in ')
  exported = jax.tree.leaves(ssast_jax.from_pytorch(out).params)
  restored = jax.tree.leaves(state['params'])
  assert len(exported) == len(restored) == 28
  for a, b in zip(exported, restored):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_of_a_step_number(reference_run):
  """`which` as a step number reads that checkpoint; a step without one is named."""
  steps = checkpoints.complete_steps(str(reference_run))
  assert len(steps) >= 2
  _, step, first = run_record.workdir_params(str(reference_run), steps[0])
  _, _, last = run_record.workdir_params(str(reference_run), 'latest')
  assert step == steps[0]
  assert not np.array_equal(_flat(first), _flat(last))
  with pytest.raises(FileNotFoundError, match=f'no checkpoint of step 7777 .*{steps[0]}'):
    run_record.workdir_params(str(reference_run), 7777)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_eight_devices_then_fsdp_meshes_resume_as_one_device(dataset, reference_run, tmp_path):
  """Steps 1-6 with data parallelism on 8 devices (steps 2-3 profiled), 7-12 as data=2 x
  fsdp=4 on 8 devices, 13-18 as data=1 x fsdp=4 on 4 devices, each leg resuming the
  checkpoint of the one before on its own mesh: the checkpoints hold arrays sharded as their
  mesh was, and the run is the one-device run up to float summation order."""
  workdir = tmp_path / 'meshes'
  layouts = {}
  for step, devices, overrides in ((6, 8, {'profile_steps': '2,3'}), (12, 8, {'fsdp': 4}),
                                   (18, 4, {'fsdp': 4})):
    result = run_main(tiny_run_flags(dataset, workdir, max_steps=step, **overrides),
                      devices=devices)
    layouts[step] = _saved_layout(workdir, step)  # before keep_checkpoints deletes it
  assert 'resuming from the checkpoint at step 12' in result.stdout
  traces = list((workdir / 'profile').rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  for step, mesh, spec in ((6, [8, 1], []), (12, [2, 4], [None, 'fsdp']),
                           (18, [1, 4], [None, 'fsdp'])):
    assert layouts[step]['params.blocks.0.mlp.fc1.kernel.value'] == (mesh, spec)
    assert layouts[step]['opt_state.1.nu.blocks.0.mlp.fc1.kernel.value'] == (mesh, spec)
    assert layouts[step]['params.blocks.0.mlp.fc1.bias.value'] == (mesh, [])
  assert_same_run(workdir, reference_run, tmp_path)


def _saved_layout(workdir, step):
  """{array name: (mesh shape, partition spec)} that orbax recorded for a checkpoint."""
  path = pathlib.Path(workdir, 'checkpoints', str(step), 'state', '_sharding')
  layout = {}
  for key, value in json.loads(path.read_text()).items():
    sharding_info = json.loads(value)
    layout[base64.b64decode(key).decode()] = (sharding_info['shape'],
                                              sharding_info['partition_spec'])
  return layout


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path):
  workdir = tmp_path / 'diverged'
  result = run_main(tiny_run_flags(dataset, workdir, lr=1e30), check=False)
  assert result.returncode != 0
  assert 'non-finite loss or gradient at step' in result.stderr
  params = final_params(workdir, tmp_path)
  assert np.all(np.isfinite(_flat(params)))


def test_skip_policy_finishes_with_finite_parameters(dataset, tmp_path):
  workdir = tmp_path / 'skipped'
  run_main(tiny_run_flags(dataset, workdir, lr=1e30, nan_policy='skip', num_epochs=1))
  assert np.all(np.isfinite(_flat(final_params(workdir, tmp_path))))


def test_incompatible_resume_is_refused(dataset, reference_run):
  result = run_main(tiny_run_flags(dataset, reference_run, lr=5e-4, mask_patch=5), check=False)
  assert result.returncode == 2
  assert 'differing keys: lr, mask_patch' in result.stderr


def _start(args):
  return subprocess.Popen([sys.executable, str(ROOT / 'main.py')] + args, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_kill_a_preemption_and_a_damaged_checkpoint_each_resume_exactly(
    dataset, reference_run, tmp_path):
  """One workdir through a SIGKILL, a SIGTERM and a damaged latest checkpoint in turn,
  each rerun resuming from the last complete checkpoint: the end is the uninterrupted run,
  row for row and bit for bit."""
  workdir = tmp_path / 'interrupted'
  args = tiny_run_flags(dataset, workdir)

  # SIGKILL: the rerun drops the rows logged after the last checkpoint.
  process = _start(args)
  wait_for_steps(workdir, 4)
  process.send_signal(signal.SIGKILL)
  process.wait()
  logged = len(train_losses(workdir))
  assert logged < 17, 'the run finished before it could be killed'  # of 18 steps

  # SIGTERM: the run saves the step it is at, exits 75 and names that step.
  process = _start(args)
  wait_for_steps(workdir, logged + 1)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=300)
  assert process.returncode == faults.EXIT_PREEMPTED, err[-3000:]
  last_line = err.strip().splitlines()[-1]
  assert last_line.startswith('preempted (SIGTERM): every process saved the checkpoint at step ')
  saved = int(last_line.split('at step ')[1].split(';')[0])
  assert saved < 18 and (workdir / 'checkpoints' / str(saved)).is_dir()

  # The checkpoint just saved, damaged: the rerun names it and resumes from the one before.
  for path in (workdir / 'checkpoints' / str(saved) / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')
  result = run_main(args)
  assert f'checkpoint at step {saved} is incomplete or damaged' in result.stderr
  assert (workdir / 'checkpoints_damaged' / str(saved) / 'state').is_dir()
  assert metric_rows(workdir) == metric_rows(reference_run)
  np.testing.assert_array_equal(_flat(final_params(workdir, tmp_path)),
                                _flat(final_params(reference_run, tmp_path)))


def test_audio_inputs_are_converted_and_trained_on(tmp_path):
  import soundfile  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for split, count in (('train', 24), ('val', 8)):
    entries = []
    for i in range(count):
      name = f'{split}{i}.wav' if i % 2 else f'{split}{i}.flac'
      soundfile.write(tmp_path / name, 0.1 * rng.standard_normal(int(16000 * 0.7)), 16000)
      entries.append({'wav': name, 'labels': '/m/x'})
    (tmp_path / f'{split}.json').write_text(json.dumps({'data': entries}))
  workdir = tmp_path / 'run'
  dataset = {'train_json': tmp_path / 'train.json', 'train_pt_dir': '',
             'val_json': tmp_path / 'val.json', 'val_pt_dir': ''}
  run_main(tiny_run_flags(dataset, workdir, max_steps=2, **{'data.train_audio': True,
                                                            'data.audio_root': str(tmp_path)}))
  manifest = json.loads((tmp_path / 'shards' / 'train' / 'manifest.json').read_text())
  assert manifest['num_clips'] == 24 and manifest['num_mel_bins'] == 64
  assert sorted(train_losses(workdir)) == [1, 2]


def test_probe_in_pretraining_logs_its_curve_and_leaves_training_unchanged(
    dataset, reference_run, tmp_path):
  """`probe.*` set: probe rows at step 0, every `probe_every` steps and the last step, and
  the same training losses as the run without the probe."""
  from runs import write_label_csv, write_labelled_clips  # pylint: disable=import-outside-toplevel
  train_json, train_pt = write_labelled_clips(tmp_path, 'train', 24, seed=2)
  val_json, val_pt = write_labelled_clips(tmp_path, 'val', 12, seed=3)
  probe_flags = {'probe.train_json': train_json, 'probe.val_json': val_json,
                 'probe.train_pt_dir': train_pt, 'probe.val_pt_dir': val_pt,
                 'probe.label_csv': write_label_csv(tmp_path / 'labels.csv'),
                 'probe_every': 5}
  workdir = tmp_path / 'run'
  run_main(tiny_run_flags(dataset, workdir, **probe_flags))
  rows = [r for r in metric_rows(workdir) if 'probe/acc' in r]
  assert [r['step'] for r in rows] == [0, 5, 10, 15, 18]
  assert all(0 <= r['probe/acc'] <= 1 and 0 < r['probe/map'] <= 1 for r in rows)
  assert train_losses(workdir) == train_losses(reference_run)
