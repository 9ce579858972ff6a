"""Fine-tuning data augmentation of the original (`src/dataloader.py`,
`AudioDataset.__getitem__` and `_wav2fbank`) as pure, batched, jit-able JAX functions.

What the original does to one training clip, in this order:

1. with probability `mixup` (`random.random() < self.mixup`) it draws a partner clip
   uniformly from the whole training set (`random.randint(0, len(self.data) - 1)`, which
   may be the clip itself) and `lam ~ Beta(10, 10)` (`np.random.beta(10, 10)`), mixes the
   two *waveforms* `lam * w_a + (1 - lam) * w_b` (partner zero-padded or cut to the clip's
   length) and takes the fbank of the mix; the target is `lam` at the clip's classes plus
   `1 - lam` at the partner's (added, so a shared class gets 1);
2. the fbank is cut or zero-padded to `target_length` frames;
3. SpecAugment on the *unnormalised* fbank viewed `(1, F, T)`: torchaudio's
   `FrequencyMasking(freqm)` and then `TimeMasking(timem)` (`iid_masks` off, each skipped
   when its parameter is 0), both filling with 0;
4. normalisation `(fbank - mean) / (2 * std)`;
5. if `noise`: `x + torch.rand(T, F) * np.random.rand() / 10` (uniform, not Gaussian), then
   `torch.roll(x, np.random.randint(-10, 10), 0)`: a circular shift of the time axis by
   an integer in [-10, 9].

Evaluation clips get only steps 2 and 4 (`freqm = timem = mixup = 0`, no noise).

Here the input is the batch this project's pipeline yields: already cut/padded and
*normalised* `(B, T, F)` features, with `(B, K)` multi-hot targets. Steps 1, 3, 5 run on it
in the original order, which gives the same result because normalisation is affine:
mixing commutes with it (`lam + (1 - lam) = 1`), and the masks fill with the normalised
zero `(0 - mean) / (2 * std)` (`normalised_zero`), which is what the original's 0 becomes
after step 4. Deviations, all forced by working on stored fbanks in a batch:

* mix-up mixes the fbanks (log-mel features), not the waveforms; the log makes these
  differ. The lambda distribution, the mixing formula and the targets are exact.
* the partner is a clip of the same batch (drawn uniformly, the clip itself included, as
  the original includes it), not of the whole dataset; the partner enters unaugmented, as
  in the original, where its raw waveform is mixed before any masking.
* the original's mix has the clip's own length, so frames past its end are padding; pass
  `num_frames` (the clips' lengths before padding) to restore that padding after mixing.

Randomness: every clip has its own key (`example_keys` derives them from
(seed, step, global example index)), so a clip's augmentation does not depend on the
batch layout or the number of devices, except through the partner's index. SpecAugment's
draws reproduce torchaudio's `mask_along_axis` formula (`mask_bounds`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MIXUP_BETA = 10.0  # lam ~ Beta(10, 10), `np.random.beta(10, 10)` in `_wav2fbank`
NOISE_SCALE = 10.0  # x + rand(T, F) * rand() / 10
ROLL_LOW, ROLL_HIGH = -10, 10  # np.random.randint(-10, 10): shifts -10 .. 9
TIME_AXIS, FREQ_AXIS = 0, 1  # of one clip (T, F)
_AUGMENT_STREAM = 0x61756721  # salt keeping these keys apart from other uses of the seed


def normalised_zero(mean: float, std: float) -> np.float32:
  """The normalised value of an fbank 0 (masking fill, padding): `(0 - mean) / (2 * std)`,
  in float32 as `ssast_jax.data.pipeline` normalises."""
  return (np.float32(0) - np.float32(mean)) / np.float32(2 * std)


def example_keys(seed: int, step, batch_size: int, first_index=0) -> jax.Array:
  """One key per clip of a batch: `fold_in(fold_in(base, step), index)`, where `base` is
  `key(seed)` folded with a constant of this module (a stream of its own).

  `index` runs over `first_index + arange(batch_size)`; pass the global position of this
  process's first clip so every clip's key is the same however the batch is split.
  Jit-able (`step`, `first_index` may be traced; `seed` and `batch_size` static).
  """
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)
  indices = first_index + jnp.arange(batch_size)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def mask_bounds(key, mask_param: int, size: int):
  """`(start, end)` of one torchaudio mask: `mask_along_axis` (torchaudio 0.9 to 2.x).

  torchaudio draws `value = rand() * mask_param` and `min_value = rand() * (size - value)`
  (float32) and masks `[long(min_value), long(min_value) + long(value))`; `long` truncates.
  So the width is in `0 .. mask_param - 1` and the band lies within `[0, size)`.
  """
  if mask_param > size:
    raise ValueError(f'mask parameter {mask_param} exceeds the axis length {size}')
  value_u, min_u = jax.random.uniform(key, (2,), jnp.float32)
  value = value_u * jnp.float32(mask_param)
  min_value = min_u * (jnp.float32(size) - value)
  start = jnp.trunc(min_value).astype(jnp.int32)
  return start, start + jnp.trunc(value).astype(jnp.int32)


def mask_along_axis(key, x, mask_param: int, axis: int, mask_value=0.0):
  """One clip `(T, F)` with a band of `axis` (0 time, 1 frequency) set to `mask_value`.

  torchaudio's `FrequencyMasking` / `TimeMasking` with `iid_masks=False` on the original's
  `(1, F, T)` view; `mask_param == 0` returns `x` unchanged and draws nothing, as the
  original skips the transform.
  """
  if mask_param == 0:
    return x
  size = x.shape[axis]
  start, end = mask_bounds(key, mask_param, size)
  position = jnp.arange(size)
  band = (position >= start) & (position < end)
  band = band[:, None] if axis == TIME_AXIS else band[None, :]
  return jnp.where(band, jnp.asarray(mask_value, x.dtype), x)


def frequency_mask(key, x, freqm: int, mask_value=0.0):
  """`torchaudio.transforms.FrequencyMasking(freqm)` on one clip `(T, F)`."""
  return mask_along_axis(key, x, freqm, FREQ_AXIS, mask_value)


def time_mask(key, x, timem: int, mask_value=0.0):
  """`torchaudio.transforms.TimeMasking(timem)` on one clip `(T, F)`."""
  return mask_along_axis(key, x, timem, TIME_AXIS, mask_value)


def spec_augment(key, x, freqm: int, timem: int, mask_value=0.0):
  """Frequency masking, then time masking (the original's order), of one clip `(T, F)`."""
  freq_key, time_key = jax.random.split(key)
  return time_mask(time_key, frequency_mask(freq_key, x, freqm, mask_value), timem,
                   mask_value)


def mixup_draws(key, rate, batch_size: int):
  """One clip's mix-up decisions: `(mixed, partner, lam)`.

  `mixed`: `uniform() < rate` (the original's `random.random() < self.mixup`); `partner`:
  uniform in `[0, batch_size)`, the clip itself included; `lam ~ Beta(10, 10)`, float32.
  """
  gate_key, partner_key, lam_key = jax.random.split(key, 3)
  mixed = jax.random.uniform(gate_key, (), jnp.float32) < rate
  partner = jax.random.randint(partner_key, (), 0, batch_size)
  lam = jax.random.beta(lam_key, MIXUP_BETA, MIXUP_BETA, (), jnp.float32)
  return mixed, partner, lam


def mix(x_a, y_a, x_b, y_b, lam):
  """One clip mixed with its partner: `lam * a + (1 - lam) * b` for the features and the
  targets alike (`_wav2fbank`'s `mix_lambda * waveform1 + (1 - mix_lambda) * waveform2` and
  the `+= mix_lambda` / `+= 1 - mix_lambda` targets of `__getitem__`)."""
  lam = jnp.asarray(lam, jnp.float32)
  return lam * x_a + (1 - lam) * x_b, lam * y_a + (1 - lam) * y_b


def mixup(keys, x, y, rate, num_frames=None, pad_value=0.0):
  """Batched mix-up: `(x, y, info)` with `info = {'mixed', 'partner', 'lam'}` per clip.

  `keys` `(B,)`, `x` `(B, T, F)`, `y` `(B, K)`; a clip not drawn for mixing is returned
  unchanged. With `num_frames` `(B,)`, frames of a mixed clip from its own length on are
  set to `pad_value` (the original's mix has the clip's length; see the module docstring).
  `rate` may be traced; `rate = 0` mixes nothing.
  """
  batch_size, length = x.shape[0], x.shape[1]
  mixed, partner, lam = jax.vmap(lambda k: mixup_draws(k, rate, batch_size))(keys)
  x_mix, y_mix = jax.vmap(mix)(x, y, x[partner], y[partner], lam)
  if num_frames is not None:
    past_end = jnp.arange(length)[None, :] >= jnp.asarray(num_frames)[:, None]
    x_mix = jnp.where(past_end[:, :, None], jnp.asarray(pad_value, x_mix.dtype), x_mix)
  x_out = jnp.where(mixed[:, None, None], x_mix.astype(x.dtype), x)
  y_out = jnp.where(mixed[:, None], y_mix.astype(y.dtype), y)
  return x_out, y_out, {'mixed': mixed, 'partner': partner, 'lam': lam}


def noise_draws(key, shape):
  """One clip's noise: `(field, scale, shift)`: uniform `(T, F)` field, uniform scalar
  scale, integer time shift in [-10, 9]."""
  field_key, scale_key, shift_key = jax.random.split(key, 3)
  field = jax.random.uniform(field_key, shape, jnp.float32)
  scale = jax.random.uniform(scale_key, (), jnp.float32)
  shift = jax.random.randint(shift_key, (), ROLL_LOW, ROLL_HIGH)
  return field, scale, shift


def add_noise(key, x):
  """`roll(x + rand(T, F) * rand() / 10, randint(-10, 10), time)` of one clip `(T, F)`.

  The roll is circular (`torch.roll`): frame `t` of the result is frame `t - shift`.
  """
  field, scale, shift = noise_draws(key, x.shape)
  noisy = x + (field * scale / NOISE_SCALE).astype(x.dtype)
  return jnp.roll(noisy, shift, axis=TIME_AXIS)


def augment_batch(keys, x, y, *, freqm: int = 0, timem: int = 0, mixup_rate=0.0,
                  noise: bool = False, mask_value=0.0, num_frames=None):
  """The original's training-time augmentation of a normalised batch: `(x, y)`.

  Mix-up (rate `mixup_rate`), then per clip frequency masking (`freqm`), time masking
  (`timem`) filling with `mask_value` (pass `normalised_zero(mean, std)` for normalised
  input; it also fills the padding that `num_frames` restores after mixing), then noise
  and roll if `noise`. `keys` `(B,)` one per clip, `x` `(B, T, F)`, `y` `(B, K)` float
  (multi-hot from `labels.multi_hot_batch`). Jit with
  `static_argnames=('freqm', 'timem', 'noise')`; with all off (a static `mixup_rate` of 0)
  it returns the inputs, as the original's evaluation loader does.
  """
  split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  mix_keys, mask_keys, noise_keys = split[:, 0], split[:, 1], split[:, 2]
  if not (isinstance(mixup_rate, (int, float)) and mixup_rate == 0):
    x, y, _ = mixup(mix_keys, x, y, mixup_rate, num_frames, mask_value)
  if freqm or timem:
    x = jax.vmap(lambda k, c: spec_augment(k, c, freqm, timem, mask_value))(mask_keys, x)
  if noise:
    x = jax.vmap(add_noise)(noise_keys, x)
  return x, y
