"""The README.md (model card) written beside a transformers export: what the model is, its
recipe, labels, validation results and how to use it."""

from __future__ import annotations

import json
import os

import numpy as np

from ssast_jax.model.classifier import ClassifierConfig

RECIPE_KEYS = ('task', 'pretrained', 'batch_size', 'lr', 'head_lr', 'num_epochs', 'freqm',
               'timem', 'mixup', 'bal', 'loss', 'metrics', 'mask_patch', 'fstride', 'tstride')
# result.csv's first columns (the original's `train()`): main metric, mAUC.
_RESULT_COLUMNS = 2

_CLS_USAGE = '''```python
from transformers import pipeline
classifier = pipeline('audio-classification', model='{out}')
classifier('clip.wav')  # 16 kHz mono; the feature extractor computes and normalises the fbank
```
Or with the model: `ASTForAudioClassification.from_pretrained('{out}')(input_values).logits`,
`input_values` `(B, {frames}, {bins})` normalised as `(fbank - {mean:g}) / (2 * {std:g})`.
transformers computes the head's LayerNorm with `layer_norm_eps` ({eps:g}) where this model
was trained with {head_eps:g}: the logits differ by about 1e-6 of their scale. For the
trained epsilon, set `model.classifier.layernorm.eps = model.config.ssast_head_layer_norm_eps`.
'''

_AVGTOK_USAGE = '''This classifier pools the mean of the patch tokens (SSAST's `ft_avgtok`), which
transformers' `ASTForAudioClassification` cannot do (it averages the two leading tokens). So
the encoder is an `ASTModel` and the head is in `ssast_head.safetensors`; the two pooling
lines are yours:
```python
import torch
from safetensors.torch import load_file
from transformers import ASTFeatureExtractor, ASTModel
encoder = ASTModel.from_pretrained('{out}').eval()
head = load_file('{out}/ssast_head.safetensors')
features = ASTFeatureExtractor.from_pretrained('{out}')
inputs = features(waveform, sampling_rate=16000, return_tensors='pt')  # 16 kHz mono
with torch.no_grad():
  tokens = encoder(**inputs).last_hidden_state[:, 2:]   # the patch tokens
  clip = torch.nn.functional.layer_norm(tokens.mean(1), ({dim},), head['classifier.layernorm.weight'],
                                        head['classifier.layernorm.bias'], eps={head_eps:g})
  logits = clip @ head['classifier.dense.weight'].T + head['classifier.dense.bias']
```
Do not load this folder with `ASTForAudioClassification` or `pipeline('audio-classification')`:
they would add an untrained head (transformers warns that its weights are newly initialised).
'''

_ENCODER_USAGE = '''```python
from transformers import ASTModel
encoder = ASTModel.from_pretrained('{out}')
hidden = encoder(input_values).last_hidden_state  # (B, N + 2, {dim})
```
`input_values` `(B, {frames}, {bins})` normalised as `(fbank - {mean:g}) / (2 * {std:g})`.
The pretext heads and mask embedding (for continued SSAST pretraining) are in
`ssast_pretext.safetensors`, which transformers does not read.
'''


def _recipe(workdir) -> dict:
  path = os.path.join(workdir or '', 'config.json')
  if not workdir or not os.path.isfile(path):
    return {}
  with open(path) as f:
    saved = json.load(f)
  return {k: saved[k] for k in RECIPE_KEYS if k in saved and saved[k] not in ('', None)}


def _results(workdir, metric: str) -> list[str]:
  path = os.path.join(workdir or '', 'result.csv')
  if not workdir or not os.path.isfile(path):
    return []
  rows = np.atleast_2d(np.loadtxt(path, delimiter=','))
  if rows.size == 0:
    return []
  best = int(np.argmax(rows[:, 0]))
  return [f'| {label} | {epoch + 1} | {rows[epoch, 0]:.4f} | {rows[epoch, 1]:.4f} |'
          for label, epoch in (('last epoch', len(rows) - 1), (f'best {metric}', best))]


def model_card(config, info: dict, labels, mean: float, std: float, out: str) -> str:
  """The card's Markdown for the export of a model of `config` whose source `info` says."""
  classifier = isinstance(config, ClassifierConfig)
  kind = ('an audio classifier' if classifier else 'a pretrained audio encoder')
  lines = [f'# SSAST {kind} (exported by ssast-jax)', '',
           f'A Self-Supervised Audio Spectrogram Transformer (SSAST, Gong et al., AAAI 2022) '
           f'trained with ssast-jax, in the layout of transformers\' Audio Spectrogram '
           f'Transformer. Source: `{info.get("source", "?")}`'
           + (f', step {info["step"]}' if info.get('step') is not None else '') + '.', '',
           '## Model', '',
           f'- {config.depth} blocks of width {config.embed_dim}, {config.num_heads} heads; '
           f'{config.fshape}x{config.tshape} patches with strides {config.fstride} '
           f'(frequency) and {config.tstride} (time)',
           f'- input: {config.input_tdim} frames x {config.input_fdim} mel bins of Kaldi '
           f'fbank (25 ms windows, 10 ms hop, 16 kHz), normalised as '
           f'`(fbank - {mean:g}) / (2 * {std:g})`']
  if classifier:
    pooled = ('mean of the patch tokens' if config.pooling == 'avgtok'
              else 'mean of the two leading tokens')
    lines.append(f'- {config.num_labels} labels, pooling `{config.pooling}` ({pooled})')
  recipe = _recipe(info.get('workdir'))
  if recipe:
    lines += ['', '## Recipe', '', '| key | value |', '|---|---|']
    lines += [f'| `{k}` | `{v}` |' for k, v in recipe.items()]
  results = _results(info.get('workdir'), recipe.get('metrics', 'mAP')) if classifier else []
  if results:
    lines += ['', '## Validation', '', f'| epoch | # | {recipe.get("metrics", "mAP")} | mAUC |',
              '|---|---|---|---|'] + results
  if classifier:
    shown = list(labels)[:20]
    lines += ['', '## Labels', '', ', '.join(f'{k}: {name}' for k, name in enumerate(shown))
              + (f', ... ({len(labels)} in all; `id2label` in config.json)'
                 if len(labels) > len(shown) else '')]
  fields = dict(out=out, frames=config.input_tdim, bins=config.input_fdim, mean=mean, std=std,
                dim=config.embed_dim, eps=config.layer_norm_epsilon,
                head_eps=getattr(config, 'head_layer_norm_epsilon', 0.0))
  usage = (_ENCODER_USAGE if not classifier else
           _CLS_USAGE if config.pooling == 'cls' else _AVGTOK_USAGE)
  lines += ['', '## Use', '', usage.format(**fields).rstrip(), '',
            '## Features', '',
            'The model was trained on the original SSAST\'s features (torchaudio\'s Kaldi '
            'fbank of the waveform minus its mean). `ASTFeatureExtractor` (its '
            'preprocessor_config.json holds this model\'s length and normalisation) '
            'approximates them when torchaudio is not installed; '
            '`ssast_jax.features.fbank` computes them exactly.', '']
  return '\n'.join(lines)
