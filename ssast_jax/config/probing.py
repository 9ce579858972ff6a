"""The pretraining config's `probe` group, resolved into `ProbeSettings`.

A linear probe of the frozen encoder inside pretraining (training/probing.py): when
`probe.train_json` and `probe.val_json` are set, the clips they list are embedded with the
current parameters and a `ssast_jax.probe` probe is fitted and scored at step 0, every
`probe_every` steps (0: at each validation) and at the last step. `settings.resolve` calls
`probe_settings`, so a bad probe key fails before any work, like every other key.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

KINDS = ('logistic', 'ridge')  # ssast_jax.probe.KINDS (not imported: that module loads the model)


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """Which labelled clips the probe sees and how often; `enabled` when both JSONs are set.
  `label_csv` falls back to `data.label_csv`."""
  train_json: str
  val_json: str
  train_pt_dir: str
  val_pt_dir: str
  audio: bool
  audio_root: str
  label_csv: str
  kind: str
  every: int  # steps; 0: at each validation (every epoch_iter steps)

  @property
  def enabled(self) -> bool:
    return bool(self.train_json)


def default_config() -> ml_collections.ConfigDict:
  """The `probe` group of the pretraining defaults: off."""
  probe = ml_collections.ConfigDict()
  probe.train_json = ''  # labelled dataset JSONs ({"data": [{"wav", "labels"}]}); '': no probe
  probe.val_json = ''
  probe.train_pt_dir = ''  # their .pt features ...
  probe.val_pt_dir = ''
  probe.audio = False  # ... or True: the wav fields are audio files, featurised as in training
  probe.audio_root = ''  # where relative audio paths start ('': each JSON's folder)
  probe.label_csv = ''  # index,mid,display_name; '': data.label_csv
  probe.kind = 'logistic'  # or 'ridge' (ssast_jax.probe)
  return probe


def probe_settings(config, check_paths: bool, require) -> ProbeSettings:
  """`config.probe` and `config.probe_every` checked; `require(condition, message)` raises
  the error naming the key (settings.resolve's ConfigError). `check_paths`: the files too."""
  p = config.probe
  for key in ('train_json', 'val_json', 'train_pt_dir', 'val_pt_dir', 'audio_root',
              'label_csv'):
    require(isinstance(p[key], str), f'probe.{key} must be a string; got {p[key]!r}')
  require(isinstance(p.audio, bool), f'probe.audio must be True or False; got {p.audio!r}')
  require(p.kind in KINDS, f'probe.kind must be one of {", ".join(KINDS)}; got {p.kind!r}')
  every = config.probe_every
  require(isinstance(every, int) and not isinstance(every, bool) and every >= 0,
          f'probe_every must be an integer >= 0 (0: at each validation); got {every!r}')
  settings = ProbeSettings(
      train_json=p.train_json, val_json=p.val_json, train_pt_dir=p.train_pt_dir,
      val_pt_dir=p.val_pt_dir, audio=p.audio, audio_root=p.audio_root,
      label_csv=p.label_csv or config.data.label_csv, kind=p.kind, every=every)
  require(bool(p.train_json) == bool(p.val_json),
          'probe.train_json and probe.val_json go together: give both or neither')
  if not settings.enabled:
    given = [k for k in ('train_pt_dir', 'val_pt_dir', 'audio_root') if p[k]]
    require(not given and not p.audio,
            f'probe.{given[0] if given else "audio"} is set but probe.train_json is empty')
    return settings
  require(bool(settings.label_csv),
          'probe.train_json is set but there is no label CSV: give probe.label_csv '
          '(or data.label_csv)')
  if p.audio:
    for split in ('train', 'val'):
      require(not p[f'{split}_pt_dir'], f'probe.{split}_pt_dir is set with probe.audio=True:'
              f" the audio paths are the JSON's wav fields; leave it empty")
  else:
    require(not p.audio_root, 'probe.audio_root is only for probe.audio=True')
    for split in ('train', 'val'):
      require(bool(p[f'{split}_pt_dir']), f'probe.{split}_pt_dir is empty: give the folder '
              f'of the {split} clips\' .pt files (or probe.audio=True)')
  if check_paths:
    files = {'probe.train_json': p.train_json, 'probe.val_json': p.val_json,
             'probe.label_csv' if p.label_csv else 'data.label_csv': settings.label_csv}
    for key, path in files.items():
      require(os.path.isfile(path), f'{key}: file not found: {path}')
    folders = {'probe.audio_root': p.audio_root, 'probe.train_pt_dir': p.train_pt_dir,
               'probe.val_pt_dir': p.val_pt_dir}
    for key, path in folders.items():
      require(not path or os.path.isdir(path), f'{key}: not a directory: {path}')
  return settings
