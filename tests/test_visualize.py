"""Pictures of a run: the CLI on a tiny workdir, the TensorBoard image, the one-line errors.

The workdir is laid out with the functions train.py writes it with (shard conversion,
config.json, an orbax checkpoint in the training state's layout, metrics.jsonl through
MetricsWriter) rather than by a training run, whose step alone takes longer to compile than
this file may take on 2 CPU cores.
"""

import json
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib import image as mpl_image

from ssast_jax import visualize
from ssast_jax.config.settings import resolve, split_shards_dir
from ssast_jax.data.convert import convert
from ssast_jax.data.demo import write_demo_dataset
from ssast_jax.finetune import pretrained_from_workdir
from ssast_jax.model import patchify
from ssast_jax.objective import losses
from ssast_jax.training import checkpoints, metrics, schedule
from ssast_jax.training.state import init_state
from runs import ROOT, env, tiny_config

ROWS = [{'step': 0, 'eval/mpc_acc': 0.05, 'eval/mpc_loss': 1.8, 'eval/mpg_loss': 1.1},
        {'step': 1, 'train/loss': 13.6, 'train/mpc_acc': 0.19, 'train/lr': 1e-4,
         'train/grad_norm': 28.0},
        {'step': 2, 'train/loss': 10.6, 'train/mpc_acc': 0.15, 'train/lr': 5e-5,
         'train/grad_norm': 17.0},
        {'step': 2, 'eval/mpc_acc': 0.42, 'eval/mpc_loss': 1.7, 'eval/mpg_loss': 1.0}]


@pytest.fixture(scope='module')
def settings(tmp_path_factory):
  data = tmp_path_factory.mktemp('data')
  dataset = write_demo_dataset(data, num_clips=30, seed=1, target_length=64, num_mel_bins=64)
  return resolve(tiny_config(**{f'data__{k}': str(v) for k, v in dataset.items()
                                if k != 'label_csv'}))


@pytest.fixture(scope='module')
def workdir(settings, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  for split in ('train', 'val'):
    convert(getattr(settings.data, f'{split}_json'), getattr(settings.data, f'{split}_pt_dir'),
            split_shards_dir(f'{workdir}/shards', split), dtype=settings.data.shard_dtype,
            num_mel_bins=64, workers=1, verbose=False)
  metrics.save_config(workdir, settings.config_dict())
  # Random values in the training state's layout: initialising one would compile for
  # seconds.
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype),
                       jax.eval_shape(lambda: init_state(settings.model, 0, 1e-4)))
  mngr = checkpoints.manager(workdir, settings.objective.task, 2)
  checkpoints.save(mngr, 2, state, {'plateau': schedule.plateau_init()})
  mngr.wait_until_finished()
  mngr.close()
  writer = metrics.MetricsWriter(workdir, task=settings.objective.task, enabled=True)
  for row in ROWS:
    writer.write(row['step'], {k: v for k, v in row.items() if k != 'step'})
  writer.close()
  return workdir


@pytest.fixture(scope='module')
def model(workdir):
  return pretrained_from_workdir(workdir)


def png_size(path):
  """(height, width) from a PNG's IHDR chunk, after checking the signature."""
  head = pathlib.Path(path).read_bytes()[:24]
  assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR', path
  width, height = struct.unpack('>II', head[16:24])
  return height, width


def assert_non_trivial(pixels):
  rgb = np.asarray(pixels)[..., :3]
  assert rgb.std() > (0.05 if rgb.dtype.kind == 'f' else 12), rgb.std()
  assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200


def test_cli_writes_valid_pictures(workdir, capsys):
  visualize.main(['--workdir', workdir, '--clips', '2'])
  assert 'wrote 3 pictures' in capsys.readouterr().out
  out = f'{workdir}/pictures'
  dpi, (panel_w, panel_h) = visualize.DPI, visualize.CURVE_PANEL_SIZE
  # Columns train and eval; rows loss, accuracy, learning rate, grad_norm.
  assert png_size(f'{out}/metrics.png') == (round((4 * panel_h + 0.4) * dpi),
                                            round(2 * panel_w * dpi))
  assert_non_trivial(mpl_image.imread(f'{out}/metrics.png'))
  paths = [f'{out}/clip-{index:05d}.png' for index in (0, 2)]  # spread over 3 clips
  height, width = png_size(paths[0])
  assert width == visualize.CLIP_FIGURE_WIDTH * visualize.DPI and height > width  # 4 panels
  for path in paths:
    assert png_size(path) == (height, width)
    assert_non_trivial(mpl_image.imread(path))


def test_clip_figure_image_is_an_rgb_array(settings, model):
  clip = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
  mask = visualize.draw_mask(settings, jax.random.key(3))
  assert mask.shape == (settings.objective.eval_mask_patch,)
  image = visualize.clip_figure_image(model, clip, mask, title='step 7')
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[1] == visualize.CLIP_FIGURE_WIDTH * visualize.DPI
  assert_non_trivial(image)
  with pytest.raises(ValueError, match='expected \\(64, 64\\)'):
    visualize.clip_figure_image(model, clip[:32], mask)


def test_predictions_are_those_of_the_losses(settings, model):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64, 64)), jnp.float32)
  mask = jnp.stack([visualize.draw_mask(settings, jax.random.key(i)) for i in range(3)])

  @jax.jit
  def both(state):
    module = nnx.merge(model.graphdef, state)
    out = visualize.pretext_predictions(module, x, mask)
    _, accuracy, mse = losses.joint_one_pass(module, x, mask)
    reconstruction_mse = losses.mse(out['reconstruction'],
                                    losses.gather_patches(module.patches(x), mask))
    return jnp.mean(out['correct'], axis=1), accuracy, reconstruction_mse, mse

  hits, accuracy, reconstruction_mse, mse = both(model.state)
  np.testing.assert_allclose(hits, accuracy)
  np.testing.assert_allclose(reconstruction_mse, mse)


def test_paste_patches_lays_them_out_as_patchify_reads_them(settings):
  clip = np.random.default_rng(2).normal(size=(64, 64)).astype(np.float32)
  c = settings.model
  patches = np.asarray(patchify(jnp.asarray(clip)[None], c.fshape, c.tshape, c.fstride,
                                c.tstride))[0]
  everything = np.arange(c.num_patches)
  np.testing.assert_array_equal(visualize.paste_patches(np.zeros_like(clip), everything,
                                                        patches, c), clip.T)


def test_curves_group_whatever_numeric_keys_a_log_has(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [{'step': 1, 'train/loss': 0.9, 'lr': 1e-3, 'note': 'text', 'flag': True},
           {'step': 2, 'eval/mAP': 0.3, 'eval/acc': 0.5, 'eval/d_prime': float('nan')},
           {'no_step': 1}]
  path.write_text('\n'.join(map(json.dumps, lines)) + '\n{"step": 3, "tor')
  series = visualize.metric_series(visualize.read_metrics(path))
  assert set(series) == {('train', 'loss'), ('', 'learning rate'), ('eval', 'accuracy')}
  assert sorted(series['eval', 'accuracy']) == ['eval/acc', 'eval/mAP']
  assert_non_trivial(visualize.render(visualize.metrics_figure(visualize.read_metrics(path))))


def _one_line_error(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    visualize.main(argv)
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
  return err


def test_missing_inputs_end_in_one_line(workdir, tmp_path, capsys):
  run = subprocess.run([sys.executable, '-m', 'ssast_jax.visualize', '--workdir',
                        str(tmp_path / 'absent')], env=env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 2 and run.stderr.strip().splitlines() == [
      f'error: {tmp_path / "absent"}: no such workdir'], run.stderr
  bare = tmp_path / 'bare'
  bare.mkdir()
  assert 'config.json: not found' in _one_line_error(['--workdir', str(bare)], capsys)
  (bare / 'config.json').write_text(open(f'{workdir}/config.json').read())
  assert 'metrics.jsonl: not found' in _one_line_error(['--workdir', str(bare)], capsys)
  (bare / 'metrics.jsonl').write_text('{"step": 1, "train/note": "no numbers"}\n')
  assert 'no numeric metric rows' in _one_line_error(['--workdir', str(bare)], capsys)
  (bare / 'metrics.jsonl').write_text(open(f'{workdir}/metrics.jsonl').read())
  assert 'checkpoints: no checkpoint' in _one_line_error(['--workdir', str(bare)], capsys)
