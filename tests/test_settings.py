"""settings.resolve: every configs/ file resolves, every bad value fails naming its key; main.py."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from ssast_jax.config.settings import ConfigError, resolve, split_shards_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('pretrain_joint', 'pretrain_mpc', 'pretrain_mpg', 'pretrain_joint_frame', 'demo')


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(name='data_dir')
def fixture_data_dir(tmp_path):
  """Original-style data: JSON manifests and .pt folders for both splits."""
  for split in ('train', 'val'):
    (tmp_path / f'{split}_pt').mkdir()
    (tmp_path / f'{split}.json').write_text(
        json.dumps({'data': [{'wav': f'{split}/a.wav', 'labels': '/m/09x0r'},
                             {'wav': f'{split}/b.wav', 'labels': '/m/09x0r'}]}))
  return tmp_path


def _set(config, dotted_key, value):
  *parents, leaf = dotted_key.split('.')
  for parent in parents:
    config = config[parent]
  config[leaf] = value


def _config(data_dir, name='pretrain_joint', **overrides):
  """A config with valid data paths; overrides use '__' for '.' in keys."""
  config = _load(name)
  for split in ('train', 'val'):
    _set(config, f'data.{split}_json', str(data_dir / f'{split}.json'))
    _set(config, f'data.{split}_pt_dir', str(data_dir / f'{split}_pt'))
  for key, value in overrides.items():
    _set(config, key.replace('__', '.'), value)
  return config


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_passes_with_valid_data(data_dir, name):
  settings = resolve(_config(data_dir, name))
  assert settings.config_dict()['task'] == settings.objective.task


def test_demo_config_needs_no_data_paths():
  config = _load('demo')
  assert config.data.demo and config.data.train_json == '' and config.data.mean is None
  resolve(config)


@pytest.mark.parametrize('name, grid, mode', [
    ('pretrain_joint', (8, 64), 'cluster'), ('pretrain_mpg', (8, 64), 'cluster'),
    ('pretrain_joint_frame', (1, 512), 'frame'), ('demo', (8, 16), 'frame'),
])
def test_patch_grid_and_mask_mode(name, grid, mode):
  objective = resolve(_load(name), check_data=False).objective
  assert (objective.patch_grid, objective.mask_mode) == (grid, mode)


def test_empty_mask_mode_resolves_to_frame_for_frame_models():
  config = _load('pretrain_joint_frame')
  config.mask_mode = ''
  assert resolve(config, check_data=False).objective.mask_mode == 'frame'


def test_config_defaults_are_the_users_run():
  config = _load('pretrain_joint')
  assert (config.data.mean, config.data.std, config.data.target_length,
          config.data.num_mel_bins) == (-7.4482, 2.4689, 1024, 128)
  assert (config.model.size, config.task, config.mask_patch, config.cluster_factor,
          config.num_epochs, config.batch_size, config.lr, config.epoch_iter,
          config.lr_patience) == ('base', 'pretrain_joint', 400, 3, 20, 12, 1e-4, 2000, 1)
  assert config.max_steps is None and config.model.depth is None and not config.data.demo


@pytest.mark.parametrize('overrides, message', [
    ({'task': 'ft_cls'}, "task must be one of 'pretrain_joint', 'pretrain_mpc', "
                         "'pretrain_mpg'; got 'ft_cls'"),
    ({'model__size': 'base384'}, "model.size must be one of 'tiny', 'small', 'base'"),
    ({'model__depth': 0}, 'model.depth must be an integer >= 1; got 0'),
    ({'model__fstride': 10}, 'model.fstride is 10 but pretraining needs it equal to '
                             'model.fshape (16)'),
    ({'model__tstride': 8}, 'model.tstride is 8 but pretraining needs it equal to '
                            'model.tshape (16)'),
    ({'model__fshape': 256, 'model__fstride': 256, 'model__tshape': 1, 'model__tstride': 1},
     'model.fshape 256 is larger than the input: data.num_mel_bins is 128'),
    ({'data__target_length': 8}, 'model.tshape 16 is larger than the input: '
                                 'data.target_length is 8'),
    ({'model__fshape': 8, 'model__fstride': 8}, 'model.fshape x model.tshape is 8 x 16 = 128'),
    ({'mask_patch': 511}, 'mask_patch is 511: cluster masking on a 8x64 patch grid needs '
                          '1 <= masked patches <= 510'),
    ({'mask_patch': 0}, 'mask_patch must be an integer >= 1; got 0'),
    ({'eval_mask_patch': 600}, 'eval_mask_patch is 600: cluster masking'),
    ({'mask_patch': 513, 'mask_mode': 'frame'}, 'mask_patch is 513: frame masking on a 8x64 '
                                                'patch grid needs 1 <= masked patches <= 512'),
    ({'mask_mode': 'random'}, "mask_mode must be one of '', 'cluster', 'cluster_uniform', "
                              "'frame'; got 'random'"),
    ({'cluster_factor': 0}, 'cluster_factor must be an integer >= 1; got 0'),
    ({'joint_passes': 3}, 'joint_passes must be one of 1, 2; got 3'),
    ({'batch_size': 0}, 'batch_size must be an integer >= 1; got 0'),
    ({'lr': 0.0}, 'lr must be a positive number; got 0.0'),
    ({'lr': -1e-4}, 'lr must be a positive number; got -0.0001'),
    ({'num_epochs': 0}, 'num_epochs must be an integer >= 1; got 0'),
    ({'epoch_iter': 0}, 'epoch_iter must be an integer >= 1; got 0'),
    ({'lr_patience': -1}, 'lr_patience must be an integer >= 0; got -1'),
    ({'max_steps': 0}, 'max_steps must be an integer >= 1; got 0'),
    ({'checkpoint_every_steps': 0}, 'checkpoint_every_steps must be an integer >= 1; got 0'),
    ({'keep_checkpoints': 0}, 'keep_checkpoints must be an integer >= 1; got 0'),
    ({'print_every_steps': 0}, 'print_every_steps must be an integer >= 1; got 0'),
    ({'nan_policy': 'ignore'}, "nan_policy must be one of 'stop', 'skip'; got 'ignore'"),
    ({'dtype': 'float16'}, "dtype must be one of 'float32', 'bfloat16'; got 'float16'"),
    ({'data__std': 0.0}, 'data.std must be a positive number; got 0.0'),
    ({'data__std': -2.0}, 'data.std must be a positive number; got -2.0'),
    ({'data__mean': float('nan')}, 'data.mean must be a finite number or None; got nan'),
    ({'data__shard_dtype': 'int8'}, "data.shard_dtype must be one of 'float16', 'float32'"),
    ({'data__workers': -1}, 'data.workers must be an integer >= 0; got -1'),
])
def test_bad_values_name_their_key(data_dir, overrides, message):
  with pytest.raises(ConfigError) as error:
    resolve(_config(data_dir, **overrides))
  assert str(error.value).startswith(message)
  assert '\n' not in str(error.value)


def test_frame_masking_allows_every_patch(data_dir):
  assert resolve(_config(data_dir, mask_patch=512, mask_mode='frame')).objective.mask_patch == 512
  assert resolve(_config(data_dir, mask_patch=510)).objective.mask_patch == 510  # N - 2


def _write(path, text):
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('key, make_value, message', [
    ('data.train_json', lambda d: str(d / 'missing.json'), 'data.train_json: file not found: '),
    ('data.train_json', lambda d: _write(d / 'bad.json', '{"data": ['),
     'data.train_json: cannot read '),
    ('data.train_pt_dir', lambda d: str(d / 'nowhere'), 'data.train_pt_dir: not a directory: '),
    ('data.val_json', lambda d: '', 'data.val_json is empty: give the validation JSON'),
    ('data.val_pt_dir', lambda d: '', 'data.val_pt_dir is empty: give the folder of validation'),
    ('data.label_csv', lambda d: str(d / 'labels.csv'), 'data.label_csv: file not found: '),
])
def test_bad_data_paths_name_their_key(data_dir, key, make_value, message):
  config = _config(data_dir)
  _set(config, key, make_value(data_dir))
  with pytest.raises(ConfigError, match='^' + re.escape(message)):
    resolve(config)


@pytest.mark.parametrize('text, detail', [
    ('[{"wav": "a"}]', 'has no "data" list'),
    ('{"data": []}', 'lists no clips'),
    ('{"data": [{"wav": "a"}, {"x": 1}]}', 'entry 1 of "data" is not an object with a "wav"'),
])
def test_manifest_json_problems(data_dir, text, detail):
  config = _config(data_dir, data__val_json=_write(data_dir / 'v.json', text))
  with pytest.raises(ConfigError, match=r'^data\.val_json: .*/v\.json.*' + re.escape(detail)):
    resolve(config)


def test_shards_dir(tmp_path):
  config = _load('pretrain_joint')
  config.data.shards_dir = str(tmp_path)
  (tmp_path / 'train').mkdir()
  (tmp_path / 'train' / 'manifest.json').write_text('{}')
  with pytest.raises(ConfigError, match=r'^data\.shards_dir: no converted validation shards: '
                                        r'.*/val/manifest\.json does not exist'):
    resolve(config)
  (tmp_path / 'val').mkdir()
  (tmp_path / 'val' / 'manifest.json').write_text('{}')
  assert resolve(config).data.shards_dir == str(tmp_path)
  assert split_shards_dir(str(tmp_path), 'val') == str(tmp_path / 'val')


def test_shards_dir_with_sources_is_a_conversion_target(data_dir, tmp_path):
  config = _config(data_dir, data__shards_dir=str(tmp_path / 'not_yet_converted'))
  resolve(config)
  config.data.val_pt_dir = ''
  with pytest.raises(ConfigError, match=r'^data\.val_pt_dir is empty'):
    resolve(config)


def test_unknown_keys_are_refused_unless_reading_a_saved_run():
  config = _load('pretrain_joint')
  config.mpc_trains_encoder = True  # a key of an older version
  with pytest.raises(ConfigError, match=r'^unknown config key mpc_trains_encoder: not a key '):
    resolve(config, check_data=False)
  assert resolve(config, check_data=False, allow_unknown=True).objective.joint_passes == 2


def test_settings_are_typed_and_frozen():
  settings = resolve(_load('pretrain_joint'), check_data=False)
  assert settings.batch_shape == (12, 1024, 128)
  assert settings.model.patch_grid == settings.objective.patch_grid == (8, 64)
  assert hash(settings) == hash(resolve(_load('pretrain_joint'), check_data=False))
  with pytest.raises(AttributeError):
    settings.optim.lr = 1.0


def _run_main(*args, env=None):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, check=False)


@pytest.mark.parametrize('override, message', [
    ('--config.model.fstride=10',
     'error: model.fstride is 10 but pretraining needs it equal to model.fshape (16): '
     'patches must not overlap'),
    ('--config.data.train_jsn=x',
     'error: --config: unknown config key \'train_jsn\' Did you mean "train_json" instead '
     'of "train_jsn"?')])
def test_main_reports_a_config_error_in_one_line(tmp_path, override, message):
  result = _run_main('--config=configs/pretrain_joint.py', f'--workdir={tmp_path}', override)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [message]


@pytest.mark.parametrize('args, message', [
    (['--config=configs/nope.py', '--config.seed=1'], '--config: file not found: configs/nope.py'),
    (['--config=configs/demo.py', '--bogus'], "Unknown command line flag 'bogus'"),
    (['--config=configs/demo.py', 'stray'], 'unexpected arguments: stray'),
    (['--config={raises}'], '--config: {raises} line 2: ValueError: no such recipe'),
    (['--config={broken}'], '--config: {broken} line 1: SyntaxError: '),
])
def test_command_lines_end_a_bad_flag_or_config_file_in_one_line(tmp_path, args, message):
  """main.py and `python -m ssast_jax.plan` parse alike (ssast_jax/config/command_line.py)."""
  files = {'raises': tmp_path / 'raises.py', 'broken': tmp_path / 'broken.py'}
  files['raises'].write_text('def get_config():\n  raise ValueError("no such recipe")\n')
  files['broken'].write_text('def get_config(:\n')
  args = [a.format(**files) for a in args]
  main = _run_main(*args, f'--workdir={tmp_path / "run"}')
  plan = subprocess.run([sys.executable, '-m', 'ssast_jax.plan', *args, '--target=v5e-8'],
                        capture_output=True, text=True, cwd=ROOT, check=False)
  for result in (main, plan):
    assert result.returncode == 2 and result.stdout == '', result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ' + message.format(**files)), lines
  assert not (tmp_path / 'run').exists()


def test_main_cluster_detection_counts_slurm_tasks():
  code = 'import main; print(main._cluster_process_count())'
  base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_'))}
  slurm = {'SLURM_JOB_ID': '123', 'SLURM_STEP_NODELIST': 'node[001-002]',
           'SLURM_NTASKS': '4', 'SLURM_PROCID': '1', 'SLURM_LOCALID': '1'}
  counts = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                           cwd=ROOT, env=env, check=True).stdout.strip()
            for env in (base, {**base, **slurm})]
  assert counts == ['1', '4']


def test_main_cluster_detection_without_jax_cluster_list():
  """Should a jax no longer have the private cluster list (docs/versions.md), SLURM and Open
  MPI jobs are still counted from their environment."""
  code = ('from jax._src import clusters; clusters.ClusterEnv = None; '
          'import main; print(main._cluster_process_count())')
  base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_'))}
  slurm = {'SLURM_JOB_ID': '123', 'SLURM_STEP_NODELIST': 'node[001-002]',
           'SLURM_NTASKS': '4', 'SLURM_PROCID': '1', 'SLURM_LOCALID': '1'}
  ompi = {'OMPI_MCA_orte_hnp_uri': '1:tcp://10.0.0.1:1234', 'OMPI_COMM_WORLD_SIZE': '3'}
  counts = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                           cwd=ROOT, env=env, check=True).stdout.strip()
            for env in (base, {**base, **slurm}, {**base, **ompi})]
  assert counts == ['1', '4', '3']


def _probe_config(data_dir, **overrides):
  """A config whose probe reads the data JSONs and .pt folders with a label CSV."""
  csv = _write(data_dir / 'labels.csv', 'index,mid,display_name\n0,/m/09x0r,"Speech"\n')
  probe = {'probe__train_json': str(data_dir / 'train.json'),
           'probe__val_json': str(data_dir / 'val.json'),
           'probe__train_pt_dir': str(data_dir / 'train_pt'),
           'probe__val_pt_dir': str(data_dir / 'val_pt'), 'probe__label_csv': csv}
  return _config(data_dir, **{**probe, **overrides})


def test_probe_is_off_by_default_and_resolves_when_given(data_dir):
  assert not resolve(_config(data_dir)).probe.enabled
  settings = resolve(_probe_config(data_dir, probe_every=250)).probe
  assert (settings.enabled, settings.kind, settings.every) == (True, 'logistic', 250)
  # The label CSV falls back to data.label_csv.
  config = _probe_config(data_dir, probe__label_csv='',
                         data__label_csv=str(data_dir / 'labels.csv'))
  assert resolve(config).probe.label_csv == str(data_dir / 'labels.csv')
  audio = _probe_config(data_dir, probe__audio=True, probe__train_pt_dir='',
                        probe__val_pt_dir='', probe__audio_root=str(data_dir))
  assert resolve(audio).probe.audio


@pytest.mark.parametrize('overrides, message', [
    ({'probe__val_json': ''}, 'probe.train_json and probe.val_json go together'),
    ({'probe__kind': 'svm'}, "probe.kind must be one of logistic, ridge; got 'svm'"),
    ({'probe_every': -1}, 'probe_every must be an integer >= 0 (0: at each validation); got -1'),
    ({'probe__label_csv': ''}, 'probe.train_json is set but there is no label CSV'),
    ({'probe__val_pt_dir': ''}, 'probe.val_pt_dir is empty: give the folder of the val'),
    ({'probe__audio': True}, 'probe.train_pt_dir is set with probe.audio=True'),
    ({'probe__audio_root': '/tmp'}, 'probe.audio_root is only for probe.audio=True'),
    ({'probe__train_json': '/nowhere/train.json'}, 'probe.train_json: file not found: '),
    ({'probe__train_pt_dir': '/nowhere'}, 'probe.train_pt_dir: not a directory: /nowhere'),
    ({'probe__train_json': '', 'probe__val_json': ''},
     'probe.train_pt_dir is set but probe.train_json is empty'),
])
def test_bad_probe_keys_name_their_key(data_dir, overrides, message):
  with pytest.raises(ConfigError) as error:
    resolve(_probe_config(data_dir, **overrides))
  assert str(error.value).startswith(message)
