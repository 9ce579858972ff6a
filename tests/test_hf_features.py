"""benchmarks/hf_features.py: transformers' `ASTFeatureExtractor` against this project's fbank
and the original's features of the reference clip (tests/data/fbank), run as a user runs it
(--quick: without fbank_jax). The bounds are a few times the measured differences
(docs/transformers.md, "Features"), so that a broken comparison fails."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

ROOT = pathlib.Path(__file__).resolve().parents[1]

AUDIOSET_SCALE = 2 * 4.5689974  # 2 * std: normalisation divides the differences by it


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp('hf_features') / 'hf_features.json'
  run = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'hf_features.py'), '--quick',
                        '--out', str(out)], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  printed = json.loads(run.stdout.strip().splitlines()[-1])
  assert printed == json.loads(out.read_text())
  assert '| ours (fbank) vs reference | 474 |' in run.stdout
  return printed


def _rows(result):
  return {row['name']: row for row in result['rows']}


def test_the_three_fbanks_agree_to_float32_fft_rounding(result):
  rows = _rows(result)
  assert 'ours (fbank_jax) vs reference' not in rows  # --quick
  # Measured: ours 5.7e-4 max / 2.9e-6 mean, HF 5.5e-4 / 6.0e-6, HF vs ours 3.0e-4 / 5.7e-6.
  ours = rows['ours (fbank) vs reference']
  assert ours['max_abs'] <= 1e-3 and ours['mean_abs'] <= 1e-5
  for waveform in ('waveform as given', 'waveform mean subtracted'):
    for other in ('reference', 'ours'):
      row = rows[f'HF ({waveform}) vs {other}']
      assert row['frames'] == 474
      assert row['max_abs'] <= 2e-3 and row['mean_abs'] <= 2e-5, row
      # Two separate computations: identical output would mean one was compared with itself.
      assert row['max_abs'] > 1e-6, row
  for row in rows.values():
    if row.get('max_abs'):  # normalising divides every difference by 2 * std
      assert row['max_abs_normalised'] == pytest.approx(row['max_abs'] / AUDIOSET_SCALE,
                                                        rel=0.02, abs=1e-6), row
  assert result['mean0_std05_vs_do_normalize_false_max_abs'] <= 1e-6


def test_padding_and_cropping_follow_the_training_pipeline(result):
  rows = _rows(result)
  clip = rows['HF vs ours, padded to 1024: clip frames']
  padding = rows['HF vs ours, padded to 1024: padding frames']
  assert (clip['frames'], padding['frames']) == (474, 550)
  assert clip['max_abs'] <= 2e-3 and clip['max_abs'] > 1e-6
  # Both pad the raw log-mel with zeros, then normalise: padding is -mean / (2 * std).
  assert padding['max_abs_normalised'] <= 1e-6 and padding['max_abs'] <= 1e-6
  pad = result['padding']
  assert pad['hf_pad_rows_constant']
  assert pad['hf_pad_value'] == pytest.approx(pad['pad_value_formula'], abs=1e-6)
  assert pad['ours_pad_value'] == pytest.approx(0.467032, abs=1e-6)
  wrong = rows['ours padded to 1024 vs zeros after normalising: padding frames']
  assert wrong['max_abs_normalised'] == pytest.approx(pad['pad_value_formula'], abs=1e-6)
  cropped = rows['HF vs ours, cropped to 256']
  assert cropped['frames'] == 256 and 1e-6 < cropped['max_abs'] <= 2e-3
  # max_length is the constructor's; the 256 given to __call__ changed nothing.
  assert result['call_max_length_ignored']['output_shape'] == [1, 1024, 128]


def test_int16_scaled_samples_shift_the_log_mel_and_the_record_is_complete(result):
  assert result['int16_scaled_median_offset'] == pytest.approx(2 * math.log(32768), abs=1e-3)
  assert _rows(result)['HF (int16-scaled samples) vs reference']['mean_abs'] > 15
  assert result['versions']['transformers'] and result['versions']['numpy']
  assert result['machine']['uname_m'] and result['date'][:2] == '20'
  assert result['hf_backend'].startswith(('numpy', 'torchaudio'))
  assert result['command'].startswith('python benchmarks/hf_features.py --quick')
