"""Fine-tuning evaluation metrics of the original (`src/utilities/stats.py`,
`calculate_stats` and `d_prime`; `src/traintest.py`, `validate`, `validate_ensemble`,
`validate_wa`) in numpy, without scikit-learn.

`calculate_stats(output, target)` gives, per class `k`, what the original's does with
scikit-learn 0.24 (the version its `requirements.txt` pins):

* `AP`: `average_precision_score(target[:, k], output[:, k])`, the non-interpolated
  `sum_n (R_n - R_{n-1}) P_n` over the distinct score thresholds in decreasing order (tied
  scores form one threshold, so ties are neither optimistic nor pessimistic);
* `auc`: `roc_auc_score`, the trapezoidal area under the ROC curve of those thresholds
  (a tie between a positive and a negative counts 1/2);
* `precisions`, `recalls`: `precision_recall_curve` (0.24: reversed, cut where full recall
  is first reached, ending with (1, 0)), every 1000th point, as the original stores them;
  `fpr`, `fnr = 1 - tpr`: `roc_curve` (`drop_intermediate=True`), every 1000th point;
* `acc`: `accuracy_score(argmax(target, 1), argmax(output, 1))`, the same for all classes
  (the first maximum wins a tie, as numpy's argmax does).

`summarize(stats)` is what `train()` prints and writes to `result.csv` each epoch: mAP and
mAUC (plain means over classes), acc, "Avg Precision"/"Avg Recall" (the mean over classes of
the middle element of the subsampled `precisions`/`recalls`) and `d_prime(mAUC)` (the
original's d-prime is of the mean AUC: `norm.ppf(mAUC) * sqrt(2)`).

Undefined cases: a class whose targets are all 0 has AP nan (scikit-learn 0.24 divides 0
by 0; newer versions return 0 with a warning); a class whose targets hold one value only
has AUC nan (scikit-learn raises, so the original run stops). Means then are nan, as
`np.mean` in the original would be.

The predictions the original evaluates are `sigmoid(logits)` for every task (also with the
CE loss), saved per epoch; `ensemble_update` is its running mean over epochs
(`validate_ensemble`'s `cum_predictions`) and `average_params` its weight averaging.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

SAVE_EVERY = 1000  # `save_every_steps` in calculate_stats: curve subsampling


def _binary_curve(y_true, y_score):
  """(fps, tps, thresholds) at each distinct score, decreasing: sklearn's _binary_clf_curve."""
  y_true = np.asarray(y_true).ravel()
  y_score = np.asarray(y_score).ravel()
  if y_true.shape != y_score.shape:
    raise ValueError(f'{y_true.shape[0]} targets for {y_score.shape[0]} scores')
  if y_true.size == 0 or not np.all(np.isfinite(y_score)):
    raise ValueError('scores must be finite and non-empty')
  values = np.unique(y_true)
  if not np.all(np.isin(values, (0, 1))):
    raise ValueError(f'targets must be 0 or 1, got values {values[:5]}')
  order = np.argsort(y_score, kind='mergesort')[::-1]
  score = y_score[order]
  positive = (y_true[order] == 1).astype(np.float64)
  distinct = np.where(np.diff(score))[0]
  last = np.r_[distinct, positive.size - 1]
  tps = np.cumsum(positive)[last]
  fps = 1 + last - tps
  return fps, tps, score[last]


def precision_recall_curve(y_true, y_score):
  """(precision, recall, thresholds) as scikit-learn 0.24 returns them.

  Recall decreasing; the curve stops at the highest threshold that reaches full recall and
  ends with precision 1, recall 0 (which has no threshold).
  """
  fps, tps, thresholds = _binary_curve(y_true, y_score)
  with np.errstate(invalid='ignore', divide='ignore'):
    precision = tps / (tps + fps)
    precision[np.isnan(precision)] = 0
    recall = tps / tps[-1]
  last = tps.searchsorted(tps[-1])
  reverse = slice(last, None, -1)
  return np.r_[precision[reverse], 1], np.r_[recall[reverse], 0], thresholds[reverse]


def average_precision(y_true, y_score) -> float:
  """scikit-learn's `average_precision_score` of one binary class (nan without positives)."""
  precision, recall, _ = precision_recall_curve(y_true, y_score)
  return float(-np.sum(np.diff(recall) * precision[:-1]))


def roc_curve(y_true, y_score):
  """(fpr, tpr, thresholds) as scikit-learn 0.24's `roc_curve` (`drop_intermediate=True`):
  collinear points dropped, (0, 0) prepended with threshold `max + 1`."""
  fps, tps, thresholds = _binary_curve(y_true, y_score)
  if len(fps) > 2:
    keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  tps, fps = np.r_[0, tps], np.r_[0, fps]
  thresholds = np.r_[thresholds[0] + 1, thresholds]
  with np.errstate(invalid='ignore', divide='ignore'):
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_auc(y_true, y_score) -> float:
  """scikit-learn's `roc_auc_score` of one binary class; nan when only one class is present
  (where scikit-learn raises ValueError)."""
  if np.unique(np.asarray(y_true)).size != 2:
    _binary_curve(y_true, y_score)  # the input checks
    return math.nan
  fpr, tpr, _ = roc_curve(y_true, y_score)
  return float(np.trapezoid(tpr, fpr))


def accuracy(output, target) -> float:
  """`accuracy_score(argmax(target, 1), argmax(output, 1))`: single-label accuracy."""
  output, target = np.asarray(output), np.asarray(target)
  return float(np.mean(np.argmax(target, 1) == np.argmax(output, 1)))


def d_prime(auc) -> float:
  """`norm.ppf(auc) * sqrt(2)` (`stats.py`): the d' of an AUC; +-inf at 1 and 0."""
  auc = float(auc)
  if math.isnan(auc):
    return math.nan
  if auc <= 0.0 or auc >= 1.0:
    return math.copysign(math.inf, auc - 0.5) if auc in (0.0, 1.0) else math.nan
  return statistics.NormalDist().inv_cdf(auc) * math.sqrt(2.0)


def calculate_stats(output, target) -> list[dict]:
  """Per-class statistics of predictions `output` `(N, K)` against targets `(N, K)`.

  One dict per class with the original's keys `AP`, `auc`, `acc`, `precisions`, `recalls`,
  `fpr`, `fnr` (the curves subsampled every 1000th point).
  """
  output, target = np.asarray(output), np.asarray(target)
  if output.ndim != 2 or output.shape != target.shape:
    raise ValueError(f'need output and target of one shape (N, K), got {output.shape}, '
                     f'{target.shape}')
  acc = accuracy(output, target)
  stats = []
  for k in range(target.shape[1]):
    precisions, recalls, _ = precision_recall_curve(target[:, k], output[:, k])
    fpr, tpr, _ = roc_curve(target[:, k], output[:, k])
    stats.append({'precisions': precisions[::SAVE_EVERY], 'recalls': recalls[::SAVE_EVERY],
                  'AP': average_precision(target[:, k], output[:, k]),
                  'fpr': fpr[::SAVE_EVERY], 'fnr': 1. - tpr[::SAVE_EVERY],
                  'auc': roc_auc(target[:, k], output[:, k]), 'acc': acc})
  return stats


def summarize(stats: list[dict]) -> dict:
  """The epoch's numbers as `train()` derives them from `calculate_stats`:
  `mAP`, `mAUC`, `acc`, `average_precision`, `average_recall`, `d_prime`."""
  m_auc = float(np.mean([s['auc'] for s in stats]))
  middle = lambda curve: curve[int(len(curve) / 2)]  # noqa: E731
  return {'mAP': float(np.mean([s['AP'] for s in stats])), 'mAUC': m_auc,
          'acc': float(stats[0]['acc']),
          'average_precision': float(np.mean([middle(s['precisions']) for s in stats])),
          'average_recall': float(np.mean([middle(s['recalls']) for s in stats])),
          'd_prime': d_prime(m_auc)}


def evaluate(output, target) -> dict:
  """`summarize(calculate_stats(output, target))`."""
  return summarize(calculate_stats(output, target))


def ensemble_update(cum_predictions, predictions, epoch: int) -> np.ndarray:
  """The mean of the predictions of epochs 1..`epoch` (1-based), from that of 1..epoch-1.

  `validate_ensemble`: epoch 1 gives `predictions`; later epochs
  `(cum_predictions * (epoch - 1) + predictions) / epoch`, in float64 (the original
  round-trips through `np.savetxt`/`np.loadtxt`, which is exact for float32 predictions at
  its '%.18e' format). `cum_predictions` is ignored (may be None) at epoch 1.
  """
  predictions = np.asarray(predictions, np.float64)
  if epoch < 1:
    raise ValueError(f'epochs count from 1, got {epoch}')
  if epoch == 1:
    return predictions / 1
  cum_predictions = np.asarray(cum_predictions, np.float64)
  if cum_predictions.shape != predictions.shape:
    raise ValueError(f'cumulative predictions {cum_predictions.shape} and predictions '
                     f'{predictions.shape} differ in shape')
  return (cum_predictions * (epoch - 1) + predictions) / epoch


def average_params(param_trees):
  """Parameter averaging of `validate_wa` (`--wa`, epochs wa_start..wa_end): the
  leaf-wise sum of the trees in order, then divided by their number."""
  import jax  # local: the metrics above need numpy only

  trees = list(param_trees)
  if not trees:
    raise ValueError('no parameters to average')
  total = trees[0]
  for tree in trees[1:]:
    total = jax.tree.map(lambda a, b: a + b, total, tree)
  return jax.tree.map(lambda a: a / float(len(trees)), total)
