"""Fine-tuning metrics against hand-computed values and scikit-learn (when installed)."""

import math
import warnings

import numpy as np
import pytest

from ssast_jax.finetune import evaluation as ev


def _mann_whitney_auc(y, s):
  """AUC as the fraction of (positive, negative) pairs ranked right, ties counting 1/2."""
  pos, neg = s[y == 1], s[y == 0]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def _random_case(rng, n, levels=None):
  y = (rng.random(n) < 0.3).astype(np.float32)
  y[:2] = (0, 1)
  s = rng.random(n).astype(np.float32)
  if levels:  # quantised scores: many ties
    s = np.round(s * levels) / levels
  return y, s


def test_hand_computed_ap_and_auc():
  y = np.array([1, 0, 1, 0])
  # thresholds 0.9 (P 1, R 1/2), 0.8 (P 1/2, R 1/2), 0.7 (P 2/3, R 1)
  assert ev.average_precision(y, [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
  assert ev.roc_auc(y, [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.75)
  # a tie at 0.5 between a positive and a negative is one threshold (P 1/2, R 1/2)
  assert ev.average_precision(y, [0.5, 0.5, 0.2, 0.1]) == pytest.approx(0.25 + 0.5 * 2 / 3)
  assert ev.roc_auc(y, [0.5, 0.5, 0.2, 0.1]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
  # all scores tied: AP is the positive rate, AUC one half
  assert ev.average_precision(y, [0.3] * 4) == pytest.approx(0.5)
  assert ev.roc_auc(y, [0.3] * 4) == pytest.approx(0.5)
  assert ev.average_precision([0, 1, 1], [0.1, 0.2, 0.3]) == 1.0
  assert ev.roc_auc([1, 1, 0], [0.1, 0.2, 0.3]) == 0.0


def test_hand_computed_curves():
  precision, recall, thresholds = ev.precision_recall_curve([1, 0, 1, 0], [0.5, 0.5, 0.2, 0.1])
  # scikit-learn 0.24: reversed, stopping at the first full-recall threshold (0.2)
  np.testing.assert_allclose(precision, [2 / 3, 0.5, 1])
  np.testing.assert_allclose(recall, [1, 0.5, 0])
  np.testing.assert_allclose(thresholds, [0.2, 0.5])
  fpr, tpr, thresholds = ev.roc_curve([1, 0, 1, 0], [0.5, 0.5, 0.2, 0.1])
  np.testing.assert_allclose(fpr, [0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
  np.testing.assert_allclose(thresholds, [1.5, 0.5, 0.2, 0.1])


def test_auc_is_mann_whitney_with_ties():
  rng = np.random.default_rng(0)
  for n, levels in [(50, None), (200, 5), (31, 2), (500, 20)]:
    y, s = _random_case(rng, n, levels)
    assert ev.roc_auc(y, s) == pytest.approx(_mann_whitney_auc(y, s), abs=1e-12)


def test_ap_is_mean_precision_at_positives_without_ties():
  rng = np.random.default_rng(1)
  y, s = _random_case(rng, 300)
  order = np.argsort(-s)
  hits = np.cumsum(y[order])
  at_positives = (hits / np.arange(1, len(y) + 1))[y[order] == 1]
  assert ev.average_precision(y, s) == pytest.approx(at_positives.mean(), abs=1e-12)


def test_against_sklearn():
  metrics = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(2)
  for n, levels in [(40, None), (300, 4), (1000, 50), (2500, None), (7, 1)]:
    y, s = _random_case(rng, n, levels)
    assert ev.average_precision(y, s) == pytest.approx(
        metrics.average_precision_score(y, s), rel=1e-12, abs=1e-15)
    assert ev.roc_auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), rel=1e-12)
    fpr, tpr, _ = ev.roc_curve(y, s)
    sk_fpr, sk_tpr, _ = metrics.roc_curve(y, s)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    # newer scikit-learn no longer cuts the PR curve at full recall: ours is its tail
    precision, recall, thresholds = ev.precision_recall_curve(y, s)
    sk_p, sk_r, sk_t = metrics.precision_recall_curve(y, s)
    np.testing.assert_allclose(precision, sk_p[-len(precision):])
    np.testing.assert_allclose(recall, sk_r[-len(recall):])
    np.testing.assert_allclose(thresholds, sk_t[-len(thresholds):])
    y2 = np.stack([y, 1 - y], 1)
    s2 = np.stack([s, rng.random(n)], 1)
    assert ev.accuracy(s2, y2) == metrics.accuracy_score(y2.argmax(1), s2.argmax(1))


def test_undefined_classes_are_nan():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert math.isnan(ev.average_precision([0, 0, 0], [0.1, 0.5, 0.2]))
    assert math.isnan(ev.roc_auc([0, 0, 0], [0.1, 0.5, 0.2]))
    assert math.isnan(ev.roc_auc([1, 1], [0.1, 0.5]))
  assert ev.average_precision([1, 1], [0.1, 0.5]) == 1.0
  with pytest.raises(ValueError, match='targets must be 0 or 1'):
    ev.average_precision([0.5, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match='finite'):
    ev.roc_auc([0, 1], [np.nan, 0.2])


def test_accuracy_argmax_of_both():
  target = np.eye(3)[[0, 1, 2, 2]]
  output = np.array([[0.9, 0.1, 0.0], [0.2, 0.2, 0.1], [0.0, 0.3, 0.7], [0.5, 0.5, 0.5]])
  # row 1: tie -> first index 0 (wrong); row 3: tie -> 0 (wrong)
  assert ev.accuracy(output, target) == 0.5


def test_d_prime():
  assert ev.d_prime(0.5) == 0.0
  assert ev.d_prime(0.9) == pytest.approx(1.2815515655446004 * math.sqrt(2), rel=1e-12)
  assert ev.d_prime(1.0) == math.inf and ev.d_prime(0.0) == -math.inf
  assert math.isnan(ev.d_prime(math.nan)) and math.isnan(ev.d_prime(1.5))
  stats = pytest.importorskip('scipy.stats')
  for auc in (0.01, 0.3, 0.77, 0.95, 0.999):
    assert ev.d_prime(auc) == pytest.approx(stats.norm().ppf(auc) * np.sqrt(2.0), rel=1e-12)


def test_calculate_stats_and_summary():
  rng = np.random.default_rng(3)
  n, k = 2500, 3
  target = (rng.random((n, k)) < 0.2).astype(np.float32)
  output = rng.random((n, k)).astype(np.float32)
  stats = ev.calculate_stats(output, target)
  assert len(stats) == k
  assert set(stats[0]) == {'precisions', 'recalls', 'AP', 'fpr', 'fnr', 'auc', 'acc'}
  for c, stat in enumerate(stats):
    precision, recall, _ = ev.precision_recall_curve(target[:, c], output[:, c])
    np.testing.assert_array_equal(stat['precisions'], precision[::1000])
    np.testing.assert_array_equal(stat['recalls'], recall[::1000])
    assert stat['AP'] == ev.average_precision(target[:, c], output[:, c])
    assert stat['auc'] == ev.roc_auc(target[:, c], output[:, c])
    assert stat['acc'] == ev.accuracy(output, target)
  summary = ev.summarize(stats)
  assert summary == ev.evaluate(output, target)
  assert summary['mAP'] == pytest.approx(np.mean([s['AP'] for s in stats]))
  assert summary['mAUC'] == pytest.approx(np.mean([s['auc'] for s in stats]))
  assert summary['d_prime'] == ev.d_prime(summary['mAUC'])
  middle = [s['precisions'][len(s['precisions']) // 2] for s in stats]
  assert summary['average_precision'] == pytest.approx(np.mean(middle))
  with pytest.raises(ValueError, match='one shape'):
    ev.calculate_stats(output, target[:, :2])


def test_ensemble_is_running_mean_and_matches_csv_round_trip(tmp_path):
  rng = np.random.default_rng(4)
  epochs = [rng.random((5, 3)).astype(np.float32) for _ in range(4)]
  cum = None
  for epoch, predictions in enumerate(epochs, start=1):
    cum = ev.ensemble_update(cum, predictions, epoch)
    np.testing.assert_allclose(cum, np.mean(np.asarray(epochs[:epoch], np.float64), 0),
                               rtol=1e-15)
  # the original's file round trip (validate / validate_ensemble) gives the same numbers
  original = None
  for epoch, predictions in enumerate(epochs, start=1):
    np.savetxt(tmp_path / f'predictions_{epoch}.csv', predictions, delimiter=',')
    if epoch == 1:
      original = np.loadtxt(tmp_path / 'predictions_1.csv', delimiter=',')
    else:
      original = np.loadtxt(tmp_path / 'cum.csv', delimiter=',') * (epoch - 1)
      original = original + np.loadtxt(tmp_path / f'predictions_{epoch}.csv', delimiter=',')
    original = original / epoch
    np.savetxt(tmp_path / 'cum.csv', original, delimiter=',')
  np.testing.assert_array_equal(cum, original)
  with pytest.raises(ValueError):
    ev.ensemble_update(None, epochs[0], 0)


def test_average_params():
  trees = [{'a': np.full(2, float(i)), 'b': {'c': np.float32(i * 2)}} for i in range(1, 4)]
  average = ev.average_params(trees)
  np.testing.assert_allclose(average['a'], [2.0, 2.0])
  assert average['b']['c'] == pytest.approx(4.0)
