"""benchmarks/keywords.py: the spoken-keyword set's resampling and voice split."""

import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
import keywords  # pylint: disable=wrong-import-position


def test_resampling_keeps_a_tones_frequency_and_amplitude():
  t = np.arange(22050) / 22050
  tone = 0.5 * np.sin(2 * np.pi * 440 * t)
  out = keywords.resample(tone, 22050, 16000)
  assert len(out) == 16000
  expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_validation_voices_are_never_heard_in_training(tmp_path):
  jobs, lists = keywords.plan(str(tmp_path), renditions=2, seed=0)
  voices = {split: {entry['wav'].split('_', 1)[1].rsplit('_', 1)[0] for entry in lists[split]}
            for split in ('pretrain_train', 'pretrain_val', 'train', 'val')}
  assert not voices['pretrain_train'] & voices['pretrain_val']
  assert voices['train'] <= voices['pretrain_train'] and voices['val'] <= voices['pretrain_val']
  num_voices = len(keywords.BASE_VOICES) * len(keywords.VARIANTS)
  assert len(voices['pretrain_val']) == round(keywords.VAL_VOICE_FRACTION * num_voices)
  words = len(keywords.KEYWORDS) + len(keywords.OTHER_WORDS)
  assert len(jobs) == num_voices * words * 2
  assert len(lists['train']) + len(lists['val']) == num_voices * len(keywords.KEYWORDS) * 2
  assert {e['labels'] for e in lists['val']} == {keywords.mid(w) for w in keywords.KEYWORDS}
  assert keywords.plan(str(tmp_path), renditions=2, seed=0) == (jobs, lists)


@pytest.mark.skipif(shutil.which('espeak-ng') is None, reason='espeak-ng is not installed')
def test_a_clip_is_1_3_seconds_at_16_khz(tmp_path):
  import soundfile  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / 'yes.wav')
  keywords.make_clip((path, 'yes', 'en-us+m3', 150, 50, 0))
  samples, rate = soundfile.read(path)
  assert rate == 16000 and len(samples) == int(keywords.CLIP_SECONDS * 16000)
  assert 0.8 < np.abs(samples).max() <= 0.91
