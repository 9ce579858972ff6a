"""Synthetic demo data in the users' layout (`python -m ssast_jax.data.demo --out DIR`).

Writes one torch-saved log-mel-like fbank per clip, a train and a validation JSON and a label
CSV. The clips mix five sound types with learnable time-frequency structure (harmonic tones
with vibrato, chirps, noise bursts, onset trains, formant sweeps) over a noise floor, have
lengths around the target length, use every accepted `.pt` form, and a few JSON entries name
files that do not exist, so every path of the converter shows.
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np

SOUND_TYPES = (
    ("/demo/harmonic", "Harmonic tone with vibrato"),
    ("/demo/chirp", "Chirp"),
    ("/demo/noise_burst", "Noise burst"),
    ("/demo/onsets", "Onset train"),
    ("/demo/formant_sweep", "Formant sweep"),
)
_FRAME_RATE = 100.0  # frames per second (10 ms hop)
_MAX_HZ = 8000.0


def _mel(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _hz_to_bin(hz, num_mel_bins: int):
  return num_mel_bins * _mel(hz) / _mel(_MAX_HZ)


def _partials(centers: np.ndarray, width: float, bins: np.ndarray) -> np.ndarray:
  """(T, F) Gaussian ridges around `centers` (T, K) bins, summed over K."""
  return np.exp(-0.5 * ((bins[None, None, :] - centers[:, :, None]) / width) ** 2).sum(1)


def _span(rng, length: int) -> np.ndarray:
  """A (T,) 0/1 envelope that is on over a random stretch of at least a quarter clip."""
  on = rng.integers(length // 4, length + 1)
  start = rng.integers(0, length - on + 1)
  envelope = np.zeros(length)
  envelope[start:start + on] = 1.0
  return envelope


def _tilt(bins, num_bins, exponent):
  """A spectral tilt falling with frequency, the same for any number of bins."""
  return (1.0 + bins * (128.0 / num_bins)) ** -exponent


def _harmonic(rng, t, bins, num_bins):
  """A harmonic tone over the whole clip: 11 partials of random strength, mild vibrato."""
  f0 = rng.uniform(100, 900) * (1 + rng.uniform(0.005, 0.015)
                                * np.sin(2 * np.pi * rng.uniform(4, 7) * t / _FRAME_RATE))
  k = np.arange(1, 12)
  centers = _hz_to_bin(np.minimum(f0[:, None] * k, _MAX_HZ), num_bins)
  strengths = rng.uniform(0.2, 1.0, k.size)
  ridges = strengths[None, :, None] * np.exp(-0.5 * ((bins - centers[..., None]) / 0.8) ** 2)
  return ridges.sum(1)


def _chirp(rng, t, bins, num_bins):
  start, end = rng.uniform(200, 6000, size=2)
  sweep = start * (end / start) ** ((t % rng.integers(60, 200)) / 200.0)
  centers = _hz_to_bin(np.stack([sweep, np.minimum(2 * sweep, _MAX_HZ)], 1), num_bins)
  return _partials(centers, 1.0, bins) * _span(rng, t.size)[:, None]


def _noise_burst(rng, t, bins, num_bins):
  envelope = np.zeros(t.size)
  for _ in range(rng.integers(2, 6)):
    start, duration = rng.integers(0, t.size), rng.integers(5, 30)
    envelope[start:start + duration] = 1.0
  width = rng.uniform(8, 40) * num_bins / 128.0
  band = np.exp(-0.5 * ((bins - rng.uniform(0, num_bins)) / width) ** 2)
  return envelope[:, None] * band[None, :] * rng.uniform(0.5, 1.5, (t.size, bins.size))


def _onsets(rng, t, bins, num_bins):
  period, decay = rng.integers(15, 50), rng.uniform(2, 8)
  envelope = np.exp(-((t - rng.integers(0, period)) % period) / decay)
  tilt = _tilt(bins, num_bins, rng.uniform(0.3, 1.0))
  return 3.0 * envelope[:, None] * tilt[None, :]


def _formant_sweep(rng, t, bins, num_bins):
  f0 = rng.uniform(100, 200)
  harmonics = _partials(np.broadcast_to(_hz_to_bin(f0 * np.arange(1, 30), num_bins),
                                        (t.size, 29)), 0.7, bins)
  rate = rng.uniform(0.3, 1.5) / _FRAME_RATE
  formant_hz = np.array([600.0, 1200.0, 2600.0]) * (
      1 + 0.3 * np.sin(2 * np.pi * rate * t[:, None] + rng.uniform(0, 2 * np.pi, 3)))
  shape = _partials(_hz_to_bin(formant_hz, num_bins), 4.0, bins)
  return harmonics * shape * _span(rng, t.size)[:, None]


_GENERATORS = (_harmonic, _chirp, _noise_burst, _onsets, _formant_sweep)


def synthesize_clip(rng: np.random.Generator, length: int, num_mel_bins: int):
  """Returns a float32 (length, num_mel_bins) log-mel-like fbank and its label ids.

  Every clip has a bed of two or three harmonic tones lasting the whole clip, so a masked
  patch is predictable from the visible patches of its frequency band and patches of
  different bands differ; one or two other sound types vary it over time.
  """
  t, bins = np.arange(length, dtype=np.float64), np.arange(num_mel_bins, dtype=np.float64)
  power = 2e-3 * _tilt(bins, num_mel_bins, 0.7) * rng.lognormal(0.0, 0.3,
                                                                 (length, num_mel_bins))
  for _ in range(rng.integers(2, 4)):
    power += 10.0 ** rng.uniform(-1.5, -0.3) * _harmonic(rng, t, bins, num_mel_bins)
  others = 1 + rng.choice(len(_GENERATORS) - 1, size=rng.integers(1, 3), replace=False)
  for kind in others:
    power += 10.0 ** rng.uniform(-2.0, -0.5) * _GENERATORS[kind](rng, t, bins, num_mel_bins)
  labels = ",".join(SOUND_TYPES[k][0] for k in [0, *sorted(others)])
  return np.log(power).astype(np.float32), labels


def _save_in_accepted_form(fbank: np.ndarray, path: Path, form: int) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  tensor = torch.from_numpy(fbank)
  obj = (tensor, tensor[None], {"fbank": tensor}, {"features": tensor})[form % 4]
  torch.save(obj, path)


def _write_split(out_dir: Path, split: str, num_clips: int, num_missing: int, rng,
                 target_length: int, num_mel_bins: int) -> tuple[Path, Path]:
  pt_dir = out_dir / split
  pt_dir.mkdir(parents=True, exist_ok=True)
  entries = []
  for i in range(num_clips):
    length = int(round(target_length * rng.uniform(0.88, 1.075)))
    fbank, labels = synthesize_clip(rng, length, num_mel_bins)
    _save_in_accepted_form(fbank, pt_dir / f"{split}_{i:05d}.pt", form=i)
    entries.append({"wav": f"/demo/audio/{split}/{split}_{i:05d}.flac", "labels": labels})
  for j in range(num_missing):
    position = (j + 1) * len(entries) // (num_missing + 1)
    entries.insert(position, {"wav": f"/demo/audio/{split}/{split}_missing_{j}.flac",
                              "labels": SOUND_TYPES[0][0]})
  json_path = out_dir / f"{split}.json"
  json_path.write_text(json.dumps({"data": entries}, indent=1))
  return json_path, pt_dir


def write_demo_dataset(out_dir, num_clips: int = 400, seed: int = 0, *,
                       target_length: int = 256, num_mel_bins: int = 128,
                       val_fraction: float = 0.1, num_missing: int = 3) -> dict:
  """Writes the demo dataset under `out_dir` and returns its paths.

  `num_clips` counts the clips with a file over both splits; `num_missing` extra train
  entries (and one validation entry) name files that do not exist. Returns a dict with
  train_json, train_pt_dir, val_json, val_pt_dir and label_csv.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  num_val = max(1, int(round(num_clips * val_fraction)))
  train_json, train_pt_dir = _write_split(out_dir, "train", num_clips - num_val, num_missing,
                                          rng, target_length, num_mel_bins)
  val_json, val_pt_dir = _write_split(out_dir, "val", num_val, min(num_missing, 1), rng,
                                      target_length, num_mel_bins)
  label_csv = out_dir / "labels.csv"
  with open(label_csv, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["index", "mid", "display_name"])
    writer.writerows((i, mid, name) for i, (mid, name) in enumerate(SOUND_TYPES))
  return {"train_json": train_json, "train_pt_dir": train_pt_dir, "val_json": val_json,
          "val_pt_dir": val_pt_dir, "label_csv": label_csv}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ssast_jax.data.demo",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, type=Path, help="output folder")
  parser.add_argument("--num-clips", type=int, default=400, help="clips over both splits")
  parser.add_argument("--target-length", type=int, default=256, help="typical frames per clip")
  parser.add_argument("--num-mel-bins", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.num_clips < 2 or args.target_length < 8 or args.num_mel_bins < 8:
    raise SystemExit("error: need --num-clips >= 2, --target-length >= 8, --num-mel-bins >= 8")
  paths = write_demo_dataset(args.out, args.num_clips, args.seed,
                             target_length=args.target_length, num_mel_bins=args.num_mel_bins)
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  main()
