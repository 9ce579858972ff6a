"""A spoken-keyword set made with espeak-ng, for measuring what pretraining is worth.

  python benchmarks/keywords.py --out DIR [--renditions 2] [--seed 0] [--workers 2]

espeak-ng (`apt-get install espeak-ng`) speaks every word of KEYWORDS (the ten labelled
classes, those of Speech Commands' 10-keyword task) and of OTHER_WORDS (unlabelled, for
pretraining only) in each of the voices of BASE_VOICES x VARIANTS, each rendition with its
own speed and pitch drawn from SPEEDS / PITCHES. The voices are split, seeded, into
training and validation voices (VAL_VOICE_FRACTION), so validation measures words said by
voices never heard in training. Each clip is CLIP_SECONDS long (128 frames of 10 ms at
16 kHz), the word placed at a random offset (cut when longer), with white noise at a
random signal-to-noise ratio from SNR_DB: 16-bit wav files, resampled from espeak-ng's
22,050 Hz to 16 kHz in the frequency domain.

DIR gets `audio/*.wav` and, in the original's JSON format (`{"data": [{"wav", "labels"}]}`,
paths relative to DIR):
  pretrain_train.json, pretrain_val.json   every word, training / validation voices
  train.json, val.json                     the keywords only, labelled
  labels.csv                               index,mid,display_name of the keywords
The set depends only on the flags and the espeak-ng version, so a rerun writes the same
files.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import soundfile

KEYWORDS = ('yes', 'no', 'up', 'down', 'left', 'right', 'on', 'off', 'stop', 'go')
OTHER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight',
               'nine', 'bed', 'bird', 'cat', 'dog', 'happy', 'house', 'tree', 'wow',
               'forward', 'learn')
BASE_VOICES = ('en-us', 'en-gb', 'en-gb-scotland', 'en-029', 'en-gb-x-rp',
               'en-gb-x-gbclan', 'en-gb-x-gbcwmd')
VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'f1', 'f2', 'f3', 'f4', 'f5')
SPEEDS = (110, 210)  # words per minute, uniform
PITCHES = (20, 80)  # espeak-ng's 0-99 scale, uniform
SNR_DB = (10.0, 30.0)
VAL_VOICE_FRACTION = 0.3
SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
CLIP_SECONDS = 1.3  # 128 fbank frames


def mid(word: str) -> str:
  """The label id of a keyword in labels.csv and the JSON `labels` fields."""
  return f'/kw/{word}'


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Band-limited resampling of a 1-D signal by truncating or padding its spectrum."""
  n_out = int(round(len(x) * rate_out / rate_in))
  spectrum = np.fft.rfft(x)
  kept = np.zeros(n_out // 2 + 1, complex)
  count = min(len(kept), len(spectrum))
  kept[:count] = spectrum[:count]
  return np.fft.irfft(kept, n_out) * (n_out / len(x))


def speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
  """espeak-ng's rendition of `word` at 16 kHz, float32."""
  with tempfile.NamedTemporaryFile(suffix='.wav') as f:
    subprocess.run(['espeak-ng', '-v', voice, '-s', str(speed), '-p', str(pitch), '-w',
                    f.name, word], check=True, capture_output=True)
    samples, rate = soundfile.read(f.name, dtype='float32')
  return resample(samples, rate, SAMPLE_RATE).astype(np.float32)


def make_clip(job: tuple) -> str:
  """Writes one clip; `job` = (path, word, voice, speed, pitch, seed). Returns the path."""
  path, word, voice, speed, pitch, seed = job
  rng = np.random.default_rng(seed)
  speech = speak(word, voice, speed, pitch)
  length = int(CLIP_SECONDS * SAMPLE_RATE)
  speech = speech[:length]
  clip = np.zeros(length, np.float32)
  offset = rng.integers(0, length - len(speech) + 1)
  clip[offset:offset + len(speech)] = speech
  power = np.mean(speech ** 2) if len(speech) else 1e-6
  snr = rng.uniform(*SNR_DB)
  clip += rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), length).astype(np.float32)
  clip *= 0.9 / max(1e-6, np.abs(clip).max())
  soundfile.write(path, clip, SAMPLE_RATE, subtype='PCM_16')
  return path


def plan(out: str, renditions: int, seed: int) -> tuple[list, dict]:
  """(clip jobs, {json name: entries}) of the whole set."""
  rng = np.random.default_rng(seed)
  voices = [f'{base}+{variant}' for base, variant in itertools.product(BASE_VOICES, VARIANTS)]
  order = rng.permutation(len(voices))
  num_val = int(round(VAL_VOICE_FRACTION * len(voices)))
  split_of = {voices[i]: ('val' if rank < num_val else 'train') for rank, i in enumerate(order)}
  jobs, lists = [], {name: [] for name in ('pretrain_train', 'pretrain_val', 'train', 'val')}
  for voice in voices:
    split = split_of[voice]
    for word in KEYWORDS + OTHER_WORDS:
      for r in range(renditions):
        name = f'audio/{word}_{voice.replace("+", "_")}_{r}.wav'
        jobs.append((os.path.join(out, name), word, voice, int(rng.integers(*SPEEDS)),
                     int(rng.integers(*PITCHES)), int(rng.integers(2 ** 31))))
        lists[f'pretrain_{split}'].append({'wav': name, 'labels': ''})
        if word in KEYWORDS:
          lists[split].append({'wav': name, 'labels': mid(word)})
  return jobs, lists


def make_dataset(out: str, renditions: int = 2, seed: int = 0, workers: int = 2) -> dict:
  """Writes the set into `out` (see the module docstring); returns its clip counts."""
  if shutil.which('espeak-ng') is None:
    raise SystemExit('error: espeak-ng not found; install it with apt-get install espeak-ng')
  os.makedirs(os.path.join(out, 'audio'), exist_ok=True)
  jobs, lists = plan(out, renditions, seed)
  todo = [job for job in jobs if not os.path.exists(job[0])]
  with concurrent.futures.ProcessPoolExecutor(workers) as pool:
    for done, _ in enumerate(pool.map(make_clip, todo, chunksize=16), 1):
      if done % 500 == 0 or done == len(todo):
        print(f'{done}/{len(todo)} clips', file=sys.stderr)
  for name, entries in lists.items():
    with open(os.path.join(out, f'{name}.json'), 'w', encoding='utf-8') as f:
      json.dump({'data': entries}, f, indent=1)
  with open(os.path.join(out, 'labels.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['index', 'mid', 'display_name'])
    for index, word in enumerate(KEYWORDS):
      writer.writerow([index, mid(word), word])
  return {name: len(entries) for name, entries in lists.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--renditions', type=int, default=2,
                      help='renditions of each word by each voice (default 2)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workers', type=int, default=2)
  args = parser.parse_args()
  print(json.dumps(make_dataset(args.out, args.renditions, args.seed, args.workers)))


if __name__ == '__main__':
  main()
