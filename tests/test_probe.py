"""The linear probe (`ssast_jax.probe`): both kinds on separable synthetic features, the
multi-label path, and the command end to end on `.pt` clips with a tiny random model (64 mel
bins, 64 frames: a 4 x 4 grid of 16 x 16 patches)."""

import dataclasses
import json

import numpy as np
import pytest
import soundfile

import ssast_jax
from ssast_jax import probe
from ssast_jax.config.settings import resolve
from ssast_jax.model import abstract_model
from ssast_jax.training import checkpoints, metrics, probing, sharding
from ssast_jax.training.state import init_state
from runs import MIDS, tiny_config, write_label_csv, write_labelled_clips

CONFIG = ssast_jax.ModelConfig.from_size('tiny', depth=1, input_tdim=64, input_fdim=64)


def separable(n, seed, classes=4, dim=24):
  """Unit-noise features around class means drawn with std 3 per axis; one-hot targets."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % classes
  means = np.random.default_rng(99).normal(0, 3, (classes, dim))
  return means[labels] + rng.normal(size=(n, dim)), np.eye(classes)[labels]


@pytest.mark.parametrize('kind', probe.KINDS)
def test_separable_single_label(kind):
  train_x, train_y = separable(48, 1)
  val_x, val_y = separable(24, 2)
  result = probe.probe(None, train_x, train_y, val_x, val_y, kind=kind)
  assert result['acc'] == 1.0 and result['mAP'] == 1.0
  assert (result['kind'], result['multi_label'], result['num_train'], result['num_val'],
          result['feature_dim']) == (kind, False, 48, 24, 24)
  assert probe.probe(None, train_x, train_y, val_x, val_y, kind=kind) == result  # deterministic


@pytest.mark.parametrize('kind', probe.KINDS)
def test_multi_label(kind):
  rng = np.random.default_rng(0)
  y = (rng.random((90, 5)) < 0.4).astype(np.float32)
  y[y.sum(1) == 0, 0] = 1
  x = y @ rng.normal(0, 3, (5, 16)) + 0.3 * rng.normal(size=(90, 16))
  result = probe.probe(None, x[:60], y[:60], x[60:], y[60:], kind=kind)
  assert result['multi_label'] and result['mAP'] > 0.95


def test_bad_arguments():
  x, y = separable(8, 0)
  with pytest.raises(ValueError, match='unknown kind'):
    probe.probe(None, x, y, x, y, kind='svm')
  with pytest.raises(ValueError, match='need features'):
    probe.probe(None, x, y[:4], x, y)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('probe')
  model = root / 'tiny.pth'
  ssast_jax.to_pytorch(ssast_jax.create_model(CONFIG, seed=3), str(model))
  csv = write_label_csv(root / 'labels.csv')
  train_json, train_pt = write_labelled_clips(root, 'train', 24, 1, missing=('gone.wav',))
  val_json, val_pt = write_labelled_clips(root, 'val', 12, 2)
  return {'root': root, 'flags': [f'--model={model}', f'--train_json={train_json}',
                                  f'--val_json={val_json}', f'--label_csv={csv}',
                                  f'--train_pt_dir={train_pt}', f'--val_pt_dir={val_pt}',
                                  '--batch_size=8']}


@pytest.mark.parametrize('kind', probe.KINDS)
def test_command(dataset, kind, capsys):
  out = dataset['root'] / f'{kind}.json'
  probe.main(dataset['flags'] + [f'--kind={kind}', f'--out={out}'])
  captured = capsys.readouterr()
  assert 'train: skipped 1 of 25 clips (1 missing)' in captured.err
  result = json.loads(out.read_text())
  assert json.loads(captured.out) == result
  assert (result['kind'], result['num_train'], result['num_val'], result['feature_dim'],
          result['multi_label'], result['skipped']) == (kind, 24, 12, 192, False,
                                                        {'train': 1, 'val': 0})
  assert result['acc'] >= 0.75 and result['mAP'] >= 0.75  # chance: 1/3


def test_clip_embeddings_match_embed(dataset):
  model = ssast_jax.from_pytorch(dataset['flags'][0].split('=', 1)[1])
  x = np.random.default_rng(0).normal(size=(5, 64, 64)).astype(np.float32)
  features = probe.clip_embeddings(model, x, batch_size=4)  # one full, one padded batch
  np.testing.assert_allclose(features, np.asarray(ssast_jax.embed(model, x)['clip']),
                             atol=1e-5)


def test_command_bad_input(dataset, capsys):
  bad = dataset['root'] / 'bad.json'
  bad.write_text(json.dumps({'data': [{'wav': 'x/odd.wav', 'labels': '/m/nope'}]}))
  flags = [f if not f.startswith('--val_json') else f'--val_json={bad}'
           for f in dataset['flags']]
  errors = []
  for argv in (flags, dataset['flags'] + ['--target_length=128']):
    with pytest.raises(SystemExit) as exit_info:
      probe.main(argv + [f'--out={dataset["root"] / "never.json"}'])
    assert exit_info.value.code == 2
    errors.append(capsys.readouterr().err.strip())
    assert errors[-1].startswith('error: ') and '\n' not in errors[-1]
  assert "'x/odd.wav'" in errors[0] and '/m/nope' in errors[0]
  assert 'takes exactly 64 frames' in errors[1]
  assert not (dataset['root'] / 'never.json').exists()


def test_command_on_audio(dataset, tmp_path, capsys):
  """`--audio`: features computed from wav files (tones of three pitches), paths relative
  to each JSON's folder; the `.pth` gives the AudioSet statistics."""
  rng = np.random.default_rng(0)
  times = np.arange(8000) / 16000
  flags = [f for f in dataset['flags'] if f.startswith(('--model', '--label_csv'))]
  for split, count in (('train', 12), ('val', 6)):
    (tmp_path / split).mkdir()
    entries = []
    for i in range(count):
      tone = 0.3 * np.sin(2 * np.pi * (300, 1200, 4000)[i % 3] * times)
      soundfile.write(tmp_path / split / f'{i}.wav',
                      (tone + 0.01 * rng.normal(size=times.size)).astype(np.float32), 16000)
      entries.append({'wav': f'{split}/{i}.wav', 'labels': MIDS[i % 3]})
    (tmp_path / f'{split}.json').write_text(json.dumps({'data': entries}))
    flags.append(f'--{split}-json={tmp_path / f"{split}.json"}')
  probe.main(flags + ['--audio', f'--out={tmp_path / "out.json"}'])
  result = json.loads(capsys.readouterr().out)
  assert (result['num_train'], result['num_val'], result['mean'], result['std']) == (
      12, 6, -4.2677393, 4.5689974)
  assert result['acc'] >= 0.8


def test_command_on_a_workdir(dataset, tmp_path, capsys):
  """A training workdir: its newest checkpoint and its config's mean/std; flags win."""
  settings = resolve(tiny_config(data__mean=-6.5, data__std=3.25), check_data=False)
  metrics.save_config(str(tmp_path), settings.config_dict())
  mngr = checkpoints.manager(str(tmp_path), settings.objective.task, 2)
  checkpoints.save(mngr, 3, init_state(settings.model, 5, settings.optim.lr), {})
  mngr.wait_until_finished()
  mngr.close()
  flags = [f for f in dataset['flags'] if not f.startswith('--model')]
  probe.main(flags + [f'--model={tmp_path}', '--kind=ridge', f'--out={tmp_path / "a.json"}'])
  result = json.loads(capsys.readouterr().out)
  assert (result['mean'], result['std'], result['feature_dim']) == (-6.5, 3.25, 192)
  probe.main(flags + [f'--model={tmp_path}', '--kind=ridge', '--mean=-1', '--std=2',
                      f'--out={tmp_path / "b.json"}'])
  assert json.loads(capsys.readouterr().out)['mean'] == -1.0


def _pretraining_settings(dataset, **overrides):
  """Tiny pretraining settings (64 x 64 inputs) whose probe reads the fixture's clips."""
  root = dataset['root']
  keys = {'probe__train_json': str(root / 'train.json'),
          'probe__val_json': str(root / 'val.json'),
          'probe__train_pt_dir': str(root / 'train_pt'),
          'probe__val_pt_dir': str(root / 'val_pt'),
          'probe__label_csv': str(root / 'labels.csv'), 'batch_size': 4}
  return resolve(tiny_config(**{**keys, **overrides}), check_data=False)


def test_pretraining_probe_is_the_commands_probe(dataset, capsys):
  """Inside pretraining: the same clips (padded/cut to target_length, normalised with the
  run's statistics), the same features as `embed` and the same fit as the command."""
  settings = _pretraining_settings(dataset, seed=2)
  graphdef, _ = abstract_model(settings.model)
  params = init_state(settings.model, 4, settings.optim.lr)['params']
  pretraining = probing.PretrainingProbe(settings, graphdef, sharding.make_mesh(), -5.0, 2.0)
  assert pretraining.clip_counts == (24, 12)
  assert 'probe.train_json: skipped 1 of 25 clips (1 missing)' in capsys.readouterr().err
  beats = []
  got = pretraining(params, beat=lambda: beats.append(1))
  assert len(beats) == 6 + 3 + 1  # batches of 4 (micro_batch_size), then the fit
  handle = ssast_jax.ModelHandle(settings.model, graphdef, params)
  pth = dataset['root'] / 'probe_params.pth'
  ssast_jax.to_pytorch(handle, str(pth))
  flags = [f for f in dataset['flags'] if not f.startswith('--model')]
  probe.main(flags + [f'--model={pth}', '--mean=-5', '--std=2',
                      f'--out={dataset["root"] / "same.json"}'])
  expected = json.loads(capsys.readouterr().out)
  assert got == {'probe/acc': expected['acc'], 'probe/map': expected['mAP']}
  assert got['probe/acc'] >= 0.75  # chance 1/3
  train_clips = pretraining._splits[0][0]  # pylint: disable=protected-access
  np.testing.assert_allclose(pretraining.clip_features(params, train_clips[:5]),
                             np.asarray(ssast_jax.embed(handle, train_clips[:5])['clip']),
                             atol=1e-5)


def test_pretraining_probe_schedule():
  settings = resolve(tiny_config(probe__train_json='t.json', probe__val_json='v.json',
                                 probe__audio=True, probe__label_csv='l.csv',
                                 epoch_iter=10), check_data=False)
  due = [step for step in range(26) if probing.is_due(settings, step, 25)]
  assert due == [0, 10, 20, 25]  # probe_every 0: at each validation, and the last step
  every_4 = dataclasses.replace(settings, probe=dataclasses.replace(settings.probe, every=4))
  assert [s for s in range(11) if probing.is_due(every_4, s, 10)] == [0, 4, 8, 10]
  off = resolve(tiny_config(), check_data=False)
  assert not any(probing.is_due(off, step, 25) for step in range(26))


def test_pretraining_probe_bad_label_names_the_json_and_clip(dataset, tmp_path):
  bad = tmp_path / 'val.json'
  bad.write_text(json.dumps({'data': [{'wav': 'x/odd.wav', 'labels': '/m/nope'}]}))
  settings = _pretraining_settings(dataset, probe__val_json=str(bad))
  graphdef, _ = abstract_model(settings.model)
  with pytest.raises(probing.ProbeDataError) as error:
    probing.PretrainingProbe(settings, graphdef, sharding.make_mesh(), -5.0, 2.0)
  message = str(error.value)
  assert message.startswith(f'probe.val_json {bad}: ') and "'x/odd.wav'" in message
  assert '/m/nope' in message and '\n' not in message
