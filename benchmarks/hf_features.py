"""This project's fbank against transformers' `ASTFeatureExtractor`, on the reference clip.

  python benchmarks/hf_features.py [--wav tests/data/fbank/speech16k.wav]
      [--reference tests/data/fbank/speech16k_fbank.npz] [--max-length 1024]
      [--crop-length 256] [--quick] [--out benchmarks/results/hf_features.json]

`--reference` holds the original SSAST's features of `--wav` (torchaudio.compliance.kaldi.fbank
on the samples minus their mean). Compared, each pair as max and mean absolute difference of
the raw log-mel and of the model input `(x - mean) / (2 * std)` with AudioSet's mean and std:

  ours       `ssast_jax.features.fbank`, and `fbank_jax` (jitted on this machine's default
             device) unless --quick;
  HF         `ASTFeatureExtractor(sampling_rate=16000, num_mel_bins=128, max_length=...)`, the
             raw log-mel with do_normalize=False, the model input with mean/std given; fed the
             waveform as read (float in [-1, 1]) and with its mean subtracted first;
  padding    HF at `--max-length` frames against this project's training input for the same
             target_length (the fbank padded with zeros, then normalised: the real
             `data.pipeline.BatchAssembler`), split into the clip's frames and the padding;
             and, for scale, the training input against padding with zeros after
             normalisation, which neither does;
  cropping   the same at `--crop-length` frames (both keep the first frames);
  int16      HF fed the samples scaled to 16-bit integers (its docstring's wording invites
             it), against the reference.

Without torchaudio (which does not load with every torch) `ASTFeatureExtractor` computes its
fbank with numpy (`transformers.audio_utils.spectrogram`); the backend used is recorded. The
extractor's warning that one mel filter is empty is silenced: at 16 kHz and 128 bins Kaldi's
bin 3 is empty too, log(eps) in every frame. Prints a table and, as its last line, the JSON
object also written to --out (with the date, versions and machine).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from ssast_jax import features  # noqa: E402
from ssast_jax.data.pipeline import BatchAssembler  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, 'tests', 'data', 'fbank')
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974
SAMPLE_RATE, NUM_MEL_BINS = 16000, 128


def hf_features(samples: np.ndarray, max_length: int, mean=None, std=None) -> np.ndarray:
  """(max_length, 128) `ASTFeatureExtractor` output for mono float32 `samples`: the raw
  log-mel (do_normalize=False) when mean and std are None, else (x - mean) / (2 * std)."""
  from transformers import ASTFeatureExtractor  # pylint: disable=import-outside-toplevel
  normalise = mean is not None
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='At least one mel filter has all zero values')
    extractor = ASTFeatureExtractor(
        sampling_rate=SAMPLE_RATE, num_mel_bins=NUM_MEL_BINS, max_length=max_length,
        do_normalize=normalise, **({'mean': mean, 'std': std} if normalise else {}))
  out = extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors='np')['input_values'][0]
  return np.asarray(out, np.float32)


class _InMemory:
  """The part of `shards.ShardedFeatures` that `BatchAssembler` reads, over float32 arrays."""

  dtype = np.dtype(np.float32)

  def __init__(self, clips):
    self.clips = clips
    self.num_mel_bins = clips[0].shape[1]

  def read_frames(self, i, start, out):
    out[...] = self.clips[i][start:start + len(out)]


def training_input(fbank: np.ndarray, target_length: int, mean: float, std: float) -> np.ndarray:
  """This project's model input for one clip: its first target_length frames, padded at the
  end with zeros, normalised (x - mean) / (2 * std), by the training pipeline's own code."""
  assembler = BatchAssembler(_InMemory([fbank]), target_length, mean, std)
  count = min(len(fbank), target_length)
  return assembler(np.array([0]), np.array([0]), np.array([count]))[0]


def normalised(x: np.ndarray) -> np.ndarray:
  return training_input(x, len(x), AUDIOSET_MEAN, AUDIOSET_STD)


def difference(a, b, a_input=None, b_input=None, frames=slice(None)) -> dict:
  """Max and mean |a - b| over `frames`, raw (a, b; None to leave out) and normalised
  (a_input, b_input: the model inputs; by default a and b normalised with AudioSet's)."""
  row = {}
  if a is not None:
    raw = np.abs(np.asarray(a, np.float64) - b)[frames]
    row.update(max_abs=float(raw.max()), mean_abs=float(raw.mean()))
    a_input = normalised(a) if a_input is None else a_input
    b_input = normalised(b) if b_input is None else b_input
  norm = np.abs(np.asarray(a_input, np.float64) - b_input)[frames]
  row.update(max_abs_normalised=float(norm.max()), mean_abs_normalised=float(norm.mean()))
  return row


def measure(wav: str, reference: str, max_length: int = 1024, crop_length: int = 256,
            quick: bool = False) -> dict:
  """The comparisons of the module docstring: {'rows': [{'name', 'frames', differences}],
  facts about the extractor, ...}."""
  ref = np.load(reference)['fbank']
  samples, rate = features.read_audio(wav)
  if rate != SAMPLE_RATE or samples.shape[0] != 1:
    raise SystemExit(f'{wav}: need 16 kHz mono audio, got {rate} Hz, {samples.shape[0]} channels')
  given = samples[0]
  centred = given - given.mean(dtype=np.float64).astype(np.float32)
  frames = len(ref)
  ours = features.fbank(given, rate)
  if ours.shape != ref.shape:
    raise SystemExit(f'ours {ours.shape} and the reference {ref.shape} differ in shape')

  rows = []

  def add(name, length, **row):
    rows.append({'name': name, 'frames': length, **row})

  add('ours (fbank) vs reference', frames, **difference(ours, ref))
  if not quick:
    import jax  # pylint: disable=import-outside-toplevel
    ours_jax = np.asarray(jax.jit(features.fbank_jax, static_argnums=(1, 2))(
        given[None], rate, NUM_MEL_BINS))[0]
    add('ours (fbank_jax) vs reference', frames, **difference(ours_jax, ref))
  hf_given = hf_features(given, frames)
  hf_centred = hf_features(centred, frames)
  # mean 0, std 0.5 makes the normalisation the identity: the same raw log-mel.
  identity_gap = float(np.abs(hf_features(given, frames, 0.0, 0.5) - hf_given).max())
  hf_inputs = {key: hf_features(x, frames, AUDIOSET_MEAN, AUDIOSET_STD)
               for key, x in (('given', given), ('centred', centred))}
  for key, hf in (('given', hf_given), ('centred', hf_centred)):
    label = 'waveform as given' if key == 'given' else 'waveform mean subtracted'
    add(f'HF ({label}) vs reference', frames, **difference(hf, ref, hf_inputs[key]))
  for key, hf in (('given', hf_given), ('centred', hf_centred)):
    label = 'waveform as given' if key == 'given' else 'waveform mean subtracted'
    add(f'HF ({label}) vs ours', frames, **difference(hf, ours, hf_inputs[key]))

  # Padding and cropping: HF (waveform as given) against the training pipeline's input.
  padding = None
  for length in (max_length, crop_length):
    hf_raw = hf_features(given, length)
    hf_input = hf_features(given, length, AUDIOSET_MEAN, AUDIOSET_STD)
    ours_raw = np.zeros((length, NUM_MEL_BINS), np.float32)
    ours_raw[:min(frames, length)] = ours[:length]
    ours_input = training_input(ours, length, AUDIOSET_MEAN, AUDIOSET_STD)
    if length <= frames:
      add(f'HF vs ours, cropped to {length}', length,
          **difference(hf_raw, ours_raw, hf_input, ours_input))
      continue
    add(f'HF vs ours, padded to {length}: all frames', length,
        **difference(hf_raw, ours_raw, hf_input, ours_input))
    add(f'HF vs ours, padded to {length}: clip frames', frames,
        **difference(hf_raw, ours_raw, hf_input, ours_input, frames=slice(None, frames)))
    add(f'HF vs ours, padded to {length}: padding frames', length - frames,
        **difference(hf_raw, ours_raw, hf_input, ours_input, frames=slice(frames, None)))
    zero_after = ours_input.copy()
    zero_after[frames:] = 0
    add(f'ours padded to {length} vs zeros after normalising: padding frames', length - frames,
        **difference(None, None, ours_input, zero_after, frames=slice(frames, None)))
    padding = {'hf_pad_value': float(hf_input[-1, 0]), 'ours_pad_value': float(ours_input[-1, 0]),
               'pad_value_formula': float(-AUDIOSET_MEAN / (2 * AUDIOSET_STD)),
               'hf_pad_rows_constant': bool((hf_input[frames:] == hf_input[-1, 0]).all())}

  hf_int16 = hf_features(given * np.float32(32768), frames)
  add('HF (int16-scaled samples) vs reference', frames, **difference(hf_int16, ref))
  # max_length is a constructor argument; one given to __call__ is ignored.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from transformers import ASTFeatureExtractor  # pylint: disable=import-outside-toplevel
    from transformers.utils import is_speech_available  # pylint: disable=import-outside-toplevel
    shape = ASTFeatureExtractor(max_length=max_length)(
        given, sampling_rate=SAMPLE_RATE, max_length=crop_length,
        return_tensors='np')['input_values'].shape
  return {
      'rows': rows,
      'clip_frames': frames,
      'hf_backend': ('torchaudio.compliance.kaldi.fbank' if is_speech_available()
                     else 'numpy (transformers.audio_utils.spectrogram)'),
      'padding': padding,
      'mean0_std05_vs_do_normalize_false_max_abs': identity_gap,
      'int16_scaled_median_offset': float(np.median(hf_int16 - ref)),
      'two_ln_32768': float(2 * np.log(32768)),
      'call_max_length_ignored': {'constructor_max_length': max_length,
                                  'call_max_length': crop_length,
                                  'output_shape': list(shape)},
      'normalisation': {'mean': AUDIOSET_MEAN, 'std': AUDIOSET_STD,
                        'formula': '(x - mean) / (2 * std)'},
      'waveform_mean': float(given.mean(dtype=np.float64)),
  }


def environment() -> dict:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  versions = {'python': platform.python_version(), 'numpy': np.__version__}
  for package in ('transformers', 'torch', 'torchaudio', 'jax', 'soundfile'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'versions': versions,
          'machine': {'uname_m': platform.machine(), 'cpu': cpu, 'cpus': os.cpu_count(),
                      'system': platform.system()}}


def table(rows) -> str:
  fmt = lambda v: '—' if v is None else f'{v:.2e}'
  lines = ['| comparison | frames | max abs | mean abs | max abs, normalised | '
           'mean abs, normalised |', '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['name']} | {r['frames']} | {fmt(r.get('max_abs'))} | "
                 f"{fmt(r.get('mean_abs'))} | {fmt(r['max_abs_normalised'])} | "
                 f"{fmt(r['mean_abs_normalised'])} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--wav', default=os.path.join(DATA, 'speech16k.wav'))
  parser.add_argument('--reference', default=os.path.join(DATA, 'speech16k_fbank.npz'),
                      help='npz with key fbank: the original\'s features of --wav')
  parser.add_argument('--max-length', type=int, default=1024,
                      help='frames to pad to (more than the clip has)')
  parser.add_argument('--crop-length', type=int, default=256,
                      help='frames to crop to (fewer than the clip has)')
  parser.add_argument('--quick', action='store_true', help='leave out fbank_jax (no compilation)')
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results',
                                                    'hf_features.json'))
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  result = measure(args.wav, args.reference, args.max_length, args.crop_length, args.quick)
  result.update(environment())
  result['command'] = shlex.join(['python', 'benchmarks/hf_features.py'] + argv)
  print(table(result['rows']))
  if result['padding']:
    print(f"pad value (AudioSet mean/std): HF {result['padding']['hf_pad_value']:.8f}, "
          f"ours {result['padding']['ours_pad_value']:.8f}")
  print(f"HF backend: {result['hf_backend']}; __call__(max_length="
        f"{args.crop_length}) gave shape {result['call_max_length_ignored']['output_shape']}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
      f.write('\n')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
