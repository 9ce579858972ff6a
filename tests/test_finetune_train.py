"""End-to-end fine-tuning runs of `main.py` on a tiny separable labelled set: the run
learns, logs and resumes exactly; bad labels and bad keys end in one line."""

import csv
import json
import pathlib

import numpy as np
import pytest

import ssast_jax
from ssast_jax import export
from ssast_jax.config.finetune import ConfigError, default_config, resolve_finetune
from tests import runs

NUM_CLASSES = 3
MIDS = [f'/toy/{k}' for k in range(NUM_CLASSES)]


def _write_split(root: pathlib.Path, split: str, count: int, rng, bad_label=None):
  """Clips whose class k lights mel bins 20k .. 20k + 19, over noise: linearly separable."""
  import torch  # pylint: disable=import-outside-toplevel
  pt_dir = root / split
  pt_dir.mkdir(parents=True)
  entries = []
  for i in range(count):
    k = i % NUM_CLASSES
    fbank = rng.normal(-8.0, 1.0, (64, 64)).astype(np.float32)
    fbank[:, 20 * k:20 * k + 20] += 6.0
    torch.save(torch.from_numpy(fbank), pt_dir / f'{split}_{i}.pt')
    entries.append({'wav': f'/toy/{split}_{i}.wav', 'labels': MIDS[k]})
  if bad_label is not None:
    entries[1]['labels'] = bad_label
  json_path = root / f'{split}.json'
  json_path.write_text(json.dumps({'data': entries}))
  return json_path, pt_dir


def write_dataset(root: pathlib.Path, bad_label=None) -> dict:
  rng = np.random.default_rng(0)
  train_json, train_pt = _write_split(root, 'train', 48, rng, bad_label)
  val_json, val_pt = _write_split(root, 'val', 12, rng)
  label_csv = root / 'labels.csv'
  with open(label_csv, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['index', 'mid', 'display_name'])
    writer.writerows((k, mid, f'class {k}') for k, mid in enumerate(MIDS))
  return {'train_json': train_json, 'train_pt_dir': train_pt, 'val_json': val_json,
          'val_pt_dir': val_pt, 'label_csv': label_csv}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  path = tmp_path_factory.mktemp('pretrained') / 'tiny.pth'
  config = ssast_jax.ModelConfig.from_size('tiny', depth=1, input_tdim=64, input_fdim=64)
  ssast_jax.to_pytorch(ssast_jax.create_model(config), path)
  return path


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp('toy'))


def flags(dataset, workdir, pretrained, **overrides):
  config = {'pretrained': pretrained, 'data.train_json': dataset['train_json'],
            'data.train_pt_dir': dataset['train_pt_dir'], 'data.val_json': dataset['val_json'],
            'data.val_pt_dir': dataset['val_pt_dir'], 'data.label_csv': dataset['label_csv'],
            'data.shards_dir': pathlib.Path(dataset['train_json']).parent / 'shards',
            'data.target_length': 64, 'data.num_mel_bins': 64, 'data.mean': -7.0,
            'data.std': 2.5, 'fstride': 16, 'tstride': 16, 'loss': 'ce', 'metrics': 'acc',
            'batch_size': 8, 'lr': 1e-3, 'warmup': False, 'num_epochs': 3,
            'lrscheduler_start': 2, 'lrscheduler_step': 1, 'lrscheduler_decay': 0.5,
            'freqm': 8, 'timem': 8, 'mixup': 0.5, 'noise': True, 'print_every_steps': 1,
            'checkpoint_every_steps': 4, 'wa': True, 'wa_start': 2, 'wa_end': 3}
  config.update(overrides)
  return ['--config', str(runs.ROOT / 'configs' / 'finetune.py'), f'--workdir={workdir}'] + [
      f'--config.{k}={v}' for k, v in config.items()]


@pytest.fixture(scope='module')
def full_run(dataset, pretrained, tmp_path_factory):
  """3 epochs of 6 steps in one process, with weight averaging over epochs 2-3."""
  workdir = tmp_path_factory.mktemp('full')
  runs.run_main(flags(dataset, workdir, pretrained))
  return workdir


def test_finetuning_learns_logs_and_resumes(dataset, pretrained, full_run, tmp_path):
  full = full_run
  rows = runs.metric_rows(full)
  evals = [r for r in rows if 'eval/acc' in r]
  assert [r['step'] for r in evals] == [6, 12, 18]
  assert all('eval/mAP' in r and 'eval/mAUC' in r for r in evals)
  assert evals[-1]['eval/acc'] > 0.6  # chance is 1/3
  result = np.loadtxt(full / 'result.csv', delimiter=',')
  assert result.shape == (3, 10)
  np.testing.assert_allclose(result[:, 0], [r['eval/acc'] for r in evals])
  # lr: 1e-3 through epoch 2, halved after epoch 2 (MultiStepLR from epoch 2).
  np.testing.assert_allclose(result[:, 9], [1e-3, 1e-3, 5e-4], rtol=1e-6)
  wa_result = np.loadtxt(full / 'wa_result.csv')
  assert wa_result.shape == (5,) and wa_result[0] > 0.6  # mAP of the averaged weights
  assert isinstance(ssast_jax.from_pytorch(full / 'wa_model.pth', fstride=16, tstride=16,
                                           input_tdim=64, input_fdim=64),
                    ssast_jax.ClassifierHandle)

  resumed = tmp_path / 'resumed'
  runs.run_main(flags(dataset, resumed, pretrained, max_steps=9))
  runs.run_main(flags(dataset, resumed, pretrained))
  assert runs.train_losses(resumed) == runs.train_losses(full)
  assert [r for r in runs.metric_rows(resumed) if 'eval/acc' in r] == evals
  np.testing.assert_array_equal(np.loadtxt(resumed / 'result.csv', delimiter=','), result)
  np.testing.assert_array_equal(np.loadtxt(resumed / 'wa_result.csv'), wa_result)


def test_two_processes_fine_tune_as_one(dataset, pretrained, full_run, tmp_path):
  """Two processes of one device each (each loads half of every batch, validation outputs
  are gathered, process 0 writes the files) repeat the one-process run up to float
  summation order: per-step losses, result.csv, the weight average."""
  workdir = tmp_path / 'two'
  processes = runs.start_processes(flags(dataset, workdir, pretrained))
  for process in processes:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-4000:]
  expected, got = runs.train_losses(full_run), runs.train_losses(workdir)
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [expected[s] for s in sorted(got)], rtol=1e-4)
  np.testing.assert_allclose(np.loadtxt(workdir / 'result.csv', delimiter=','),
                             np.loadtxt(full_run / 'result.csv', delimiter=','), rtol=1e-4)
  np.testing.assert_allclose(np.loadtxt(workdir / 'wa_result.csv'),
                             np.loadtxt(full_run / 'wa_result.csv'), rtol=1e-4)
  assert (workdir / 'wa_model.pth').is_file()


def test_adaptschedule_follows_the_map_and_resumes(dataset, pretrained, tmp_path):
  """ReduceLROnPlateau on the validation mAP (the main metric being accuracy), patience 0:
  result.csv's lr column is the plateau rule applied to the logged mAPs, and a run killed
  mid-epoch 2 resumes with its plateau state and lr exactly."""
  from ssast_jax.finetune import lr_schedule as ls  # pylint: disable=import-outside-toplevel
  overrides = dict(adaptschedule=True, lr_patience=0, wa=False, head_lr=2.0)
  full = tmp_path / 'full'
  runs.run_main(flags(dataset, full, pretrained, **overrides))
  evals = [r for r in runs.metric_rows(full) if 'eval/acc' in r]
  bases = {ls.ENCODER: 1e-3, ls.HEAD: 2e-3}
  adaptive, lrs = ls.adaptive_init(bases), []
  for epoch, row in enumerate(evals):
    lrs.append(adaptive['lr'][ls.ENCODER])
    adaptive = ls.adaptive_epoch_end(adaptive, row['eval/mAP'], first_step=6 * epoch,
                                     num_steps=6, base_lrs=bases, warmup=False, patience=0)
  result = np.loadtxt(full / 'result.csv', delimiter=',')
  np.testing.assert_array_equal(result[:, 9], np.float32(lrs))
  assert lrs[2] == 5e-4  # the mAP did not improve by 1e-4 relative after epoch 2

  resumed = tmp_path / 'resumed'
  runs.run_main(flags(dataset, resumed, pretrained, max_steps=9, **overrides))
  runs.run_main(flags(dataset, resumed, pretrained, **overrides))
  assert runs.train_losses(resumed) == runs.train_losses(full)
  assert [r for r in runs.metric_rows(resumed) if 'eval/acc' in r] == evals
  np.testing.assert_array_equal(np.loadtxt(resumed / 'result.csv', delimiter=','), result)


def test_bad_label_names_the_clip(pretrained, tmp_path):
  bad = write_dataset(tmp_path / 'bad', bad_label='/toy/unknown')
  result = runs.run_main(flags(bad, tmp_path / 'run', pretrained), check=False)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert "'/toy/train_1.wav'" in lines[-1] and "'/toy/unknown'" in lines[-1]
  assert lines[-1].startswith('error:')


@pytest.mark.parametrize('key, value', [('loss', 'mse'), ('metrics', 'auc'), ('freqm', -1),
                                        ('mixup', 1.5), ('head_lr', 0), ('task', 'ft_x'),
                                        ('lrscheduler_step', 0), ('adaptschedule', None),
                                        ('lr_patience', -1)])
def test_config_errors_name_the_key(key, value, tmp_path):
  config = default_config()
  config.pretrained = str(tmp_path)
  config[key] = value
  with pytest.raises(ConfigError, match=f'^{key} '):
    resolve_finetune(config, check_data=False)


def test_missing_label_csv_and_unknown_key(tmp_path):
  config = default_config()
  config.pretrained = str(tmp_path)
  with pytest.raises(ConfigError, match='^data.label_csv'):
    resolve_finetune(config)
  config = default_config()
  config.mask_patch = 4
  with pytest.raises(ConfigError, match='unknown config key mask_patch'):
    resolve_finetune(config, check_data=False)


def test_recipes_resolve():
  import importlib  # pylint: disable=import-outside-toplevel
  for name in ('finetune', 'finetune_esc50', 'finetune_speechcommands', 'finetune_audioset',
               'demo_finetune'):
    config = importlib.import_module(f'configs.{name}').get_config()
    config.pretrained = 'model.pth'
    resolve_finetune(config, check_data=False)


def test_balanced_sampling_follows_the_weights(dataset, tmp_path):
  """Clips of weight 0 (every class but 0, and one skipped JSON entry) are never drawn."""
  from ssast_jax import data  # pylint: disable=import-outside-toplevel
  from ssast_jax.data.convert import convert  # pylint: disable=import-outside-toplevel
  from ssast_jax.finetune import labels, train  # pylint: disable=import-outside-toplevel
  entries = json.loads(pathlib.Path(dataset['train_json']).read_text())['data']
  entries.insert(3, {'wav': '/toy/missing.wav', 'labels': MIDS[0]})  # no .pt: skipped
  train_json = tmp_path / 'train.json'
  train_json.write_text(json.dumps({'data': entries}))
  weights = [1.0 if e['labels'] == MIDS[0] and 'missing' not in e['wav'] else 0.0
             for e in entries]
  weights_csv = tmp_path / 'train_weight.csv'
  np.savetxt(weights_csv, weights)
  shards = tmp_path / 'shards'
  convert(train_json, dataset['train_pt_dir'], shards)
  config = default_config()
  config.update({'pretrained': str(tmp_path), 'bal': True})
  config.data.update({'train_json': str(train_json), 'label_csv': str(dataset['label_csv']),
                      'train_pt_dir': str(dataset['train_pt_dir']),
                      'val_json': str(dataset['val_json']),
                      'val_pt_dir': str(dataset['val_pt_dir'])})
  settings = resolve_finetune(config)
  assert settings.train_weights == str(weights_csv)
  per_clip = train.clip_weights(settings, shards)
  table = labels.load_label_table(dataset['label_csv'])
  loader = data.train_loader(shards, batch_size=8, target_length=64, mean=-7.0, std=2.5,
                             seed=0, targets=train.clip_targets(shards, table),
                             sample_weights=per_clip)
  drawn = np.concatenate([next(loader)['labels'] for _ in range(12)])
  assert np.all(drawn[:, 0] == 1)


def test_a_fine_tuning_run_loads_and_exports_as_it_ran(full_run, tmp_path):
  """`ssast_jax.load(WORKDIR)`: the best checkpoint's classifier with the run's pooling,
  label names and normalisation; the transformers export of it says so too."""
  best = ssast_jax.load(full_run)
  assert isinstance(best, ssast_jax.ClassifierHandle)
  assert (best.config.pooling, best.config.num_labels, best.config.fstride) == ('avgtok', 3, 16)
  assert best.info['labels'] == ['class 0', 'class 1', 'class 2']
  assert (best.info['mean'], best.info['std']) == (-7.0, 2.5)
  latest = ssast_jax.load(full_run, which='latest')
  assert latest.info['step'] == 18
  assert best.info['step'] in (6, 12, 18)
  export.main(['--workdir', str(full_run), '--which', 'latest', '--out', str(tmp_path / 'ft.pth')])
  from_pth = ssast_jax.from_pytorch(tmp_path / 'ft.pth', fstride=16, tstride=16, input_tdim=64,
                                    input_fdim=64)
  x = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ssast_jax.classify(latest, x)),
                                np.asarray(ssast_jax.classify(from_pth, x)))
  export.main(['--workdir', str(full_run), '--format=transformers', '--out',
               str(tmp_path / 'hf')])
  card = (tmp_path / 'hf' / 'README.md').read_text()
  assert 'class 2' in card and '| last epoch | 3 |' in card
  assert json.loads((tmp_path / 'hf' / 'preprocessor_config.json').read_text())['mean'] == -7.0
