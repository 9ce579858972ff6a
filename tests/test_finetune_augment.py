"""Fine-tuning augmentation against the original `dataloader.py` / torchaudio formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssast_jax.finetune import augment

T, F, B, K = 40, 16, 8, 8
_augment = jax.jit(augment.augment_batch, static_argnames=('freqm', 'timem', 'noise'))
_mixup_jit = jax.jit(augment.mixup)


def _mixup(keys, x, y, rate, num_frames=None, pad_value=0.0):
  # every argument passed, so calls of one shape share one compiled program
  return _mixup_jit(keys, x, y, rate, num_frames, pad_value)


_noise = jax.jit(jax.vmap(augment.add_noise, in_axes=(0, None)))
_noise_draws = jax.jit(jax.vmap(lambda k: augment.noise_draws(k, (T, F))))
# one program for all mix-up draw tests: 20000 clips, rate traced, partners among B
_mixup_draws = jax.jit(jax.vmap(lambda k, rate: augment.mixup_draws(k, rate, B),
                                in_axes=(0, None)))


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _torchaudio_bounds(u_value, u_min, mask_param, size):
  """torchaudio's mask_along_axis in float32, from its two uniform draws."""
  value = np.float32(u_value) * np.float32(mask_param)
  min_value = np.float32(u_min) * (np.float32(size) - value)
  start = int(min_value)  # Tensor.long() truncates
  return start, start + int(value)


def test_mask_bounds_follow_torchaudio_formula():
  bounds = jax.jit(jax.vmap(lambda k: augment.mask_bounds(k, 24, F * 8)))
  keys = _keys(200)
  starts, ends = map(np.asarray, bounds(keys))
  for key, start, end in zip(keys, starts, ends):
    u_value, u_min = np.asarray(jax.random.uniform(key, (2,), jnp.float32))
    assert (start, end) == _torchaudio_bounds(u_value, u_min, 24, F * 8)


@pytest.mark.parametrize('param, size', [(48, 128), (192, 1024), (5, 5), (1, 10)])
def test_mask_widths_and_positions_within_bounds(param, size):
  starts, ends = map(np.asarray, jax.jit(jax.vmap(
      lambda k: augment.mask_bounds(k, param, size)))(_keys(20000, seed=1)))
  widths = ends - starts
  assert widths.min() >= 0 and widths.max() <= param - 1
  assert starts.min() >= 0 and ends.max() <= size
  if param > 1:  # width = trunc(U * param): uniform over 0 .. param - 1
    assert set(np.unique(widths)) == set(range(param))
    assert abs(widths.mean() - (param - 1) / 2) < 0.03 * param
  else:
    assert widths.max() == 0  # a parameter of 1 never masks


def test_mask_parameter_larger_than_axis_is_refused():
  with pytest.raises(ValueError, match='exceeds the axis length'):
    augment.mask_bounds(jax.random.key(0), 11, 10)


@pytest.mark.parametrize('axis', [augment.TIME_AXIS, augment.FREQ_AXIS])
def test_mask_sets_exactly_the_band(axis):
  x = jnp.arange(1.0, T * F + 1).reshape(T, F)
  param = 12
  for key in _keys(30, seed=2):
    out = np.asarray(augment.mask_along_axis(key, x, param, axis, mask_value=-3.5))
    start, end = map(int, augment.mask_bounds(key, param, x.shape[axis]))
    band = np.zeros(x.shape[axis], bool)
    band[start:end] = True
    band = band[:, None] if axis == 0 else band[None, :]
    expected = np.where(band, np.float32(-3.5), np.asarray(x))
    np.testing.assert_array_equal(out, expected)


def test_fixed_key_masks_a_known_band():
  key = jax.random.key(42)
  start, end = map(int, augment.mask_bounds(key, 48, 128))
  assert 0 < end - start < 48  # this key draws a real band
  out = np.asarray(augment.frequency_mask(key, jnp.ones((T, 128)), 48))
  assert np.all(out[:, start:end] == 0) and np.all(out[:, :start] == 1)
  assert np.all(out[:, end:] == 1)


def test_zero_parameter_is_identity_and_spec_augment_order():
  x = jax.random.normal(jax.random.key(3), (T, F))
  assert augment.mask_along_axis(jax.random.key(0), x, 0, 0) is x
  key = jax.random.key(7)
  freq_key, time_key = jax.random.split(key)
  expected = augment.time_mask(time_key, augment.frequency_mask(freq_key, x, 8, -1.0), 10, -1.0)
  np.testing.assert_array_equal(augment.spec_augment(key, x, 8, 10, -1.0), expected)


def test_normalised_zero_matches_normalising_an_fbank_zero():
  mean, std = -4.2677393, 4.5689974
  assert augment.normalised_zero(mean, std) == (np.float32(0) - np.float32(mean)) / \
      np.float32(2 * std)


def test_mixup_lambda_beta_10_10_and_labels_mixed_alike():
  _, _, lam = _mixup_draws(_keys(20000, seed=4), 1.0)
  lam = np.asarray(lam)
  assert abs(lam.mean() - 0.5) < 0.005
  assert abs(lam.var() - 100 / (400 * 21)) < 0.0008  # Beta(10, 10) variance
  assert 0 < lam.min() and lam.max() < 1

  x = jax.random.normal(jax.random.key(5), (B, T, F))
  y = jnp.eye(B, K)  # clip i has class i only
  x_out, y_out, info = _mixup(_keys(B, seed=6), x, y, 1.0)
  assert np.all(np.asarray(info['mixed']))
  for i in range(B):
    lam_i, j = np.float32(info['lam'][i]), int(info['partner'][i])
    np.testing.assert_allclose(x_out[i], lam_i * x[i] + (1 - lam_i) * x[j], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(y_out[i], lam_i * y[i] + (1 - lam_i) * y[j], rtol=1e-6)
    if j != i:  # the weights of the two clips' classes are lam and 1 - lam
      np.testing.assert_allclose([y_out[i, i], y_out[i, j]], [lam_i, 1 - lam_i], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y_out).sum(1), 1, rtol=1e-6)


def test_mixup_rate_partner_and_identity():
  mixed, partner, _ = _mixup_draws(_keys(20000, seed=8), 0.6)
  assert abs(np.asarray(mixed).mean() - 0.6) < 0.015
  counts = np.bincount(np.asarray(partner), minlength=B)  # uniform, the clip itself included
  assert np.all(np.abs(counts / counts.sum() - 1 / B) < 0.01)

  x = jax.random.normal(jax.random.key(9), (B, T, F))
  y = jnp.ones((B, K))
  x_out, y_out, info = _mixup(_keys(B), x, y, 0.0)
  assert not np.any(np.asarray(info['mixed']))
  np.testing.assert_array_equal(x_out, x)
  np.testing.assert_array_equal(y_out, y)
  x_out, _, info = _mixup(_keys(B, seed=10), x, y, 0.5)
  for i in np.flatnonzero(~np.asarray(info['mixed'])):
    np.testing.assert_array_equal(x_out[i], x[i])


def test_mixup_num_frames_restores_the_clips_padding():
  x = jax.random.normal(jax.random.key(11), (B, T, F))
  num_frames = jnp.asarray([T, 30, 10, 1, T + 5, 25, 0, T - 1])
  x_out, _, info = _mixup(_keys(B, seed=12), x, jnp.eye(B, K), 1.0, num_frames, -2.0)
  for i, n in enumerate(np.minimum(np.asarray(num_frames), T)):
    lam_i, j = np.float32(info['lam'][i]), int(info['partner'][i])
    assert np.all(np.asarray(x_out[i, n:]) == -2.0)
    np.testing.assert_allclose(x_out[i, :n], lam_i * x[i, :n] + (1 - lam_i) * x[j, :n],
                               rtol=1e-6, atol=1e-6)


def test_noise_is_uniform_scaled_then_rolled_like_torch():
  torch = pytest.importorskip('torch')
  x = jax.random.normal(jax.random.key(13), (T, F))
  keys = _keys(400, seed=14)  # the count of the roll test: one compiled program
  outs = np.asarray(_noise(keys, x))
  fields, scales, shifts = map(np.asarray, _noise_draws(keys))
  for out, field, scale, shift in zip(outs, fields, scales, shifts):
    noisy = np.asarray(x) + field * scale / np.float32(10)
    expected = torch.roll(torch.from_numpy(noisy), int(shift), 0).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
  # on zeros the noise is in [0, 0.1)
  out = np.asarray(_noise(keys, jnp.zeros((T, F))))
  assert out.min() >= 0 and out.max() < 0.1


def test_noise_roll_shifts_the_time_axis():
  frames = jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32)[:, None] * 10, (T, F))
  keys = _keys(400, seed=16)
  outs = np.asarray(_noise(keys, frames))
  shifts = np.asarray(_noise_draws(keys)[2])
  for out, shift in zip(outs, shifts):
    # frame t of the output is (noisy) frame t - shift: values stay within 0.1 of 10*(t-s)
    source = (np.arange(T) - shift) % T
    assert np.all(np.abs(out - source[:, None] * 10) < 0.1)
  assert shifts.min() == -10 and shifts.max() == 9


@jax.jit
def _mask_then_noise(split, x_mix):
  """augment_batch's steps after mix-up, spelt out from the pieces."""
  masked = jax.vmap(lambda k, c: augment.spec_augment(k, c, 6, 12, -0.25))(split[:, 1], x_mix)
  return jax.vmap(augment.add_noise)(split[:, 2], masked)


TRAIN = dict(freqm=6, timem=12, noise=True, mask_value=-0.25)


def test_augment_batch_eval_is_identity_and_train_composes():
  x = jax.random.normal(jax.random.key(17), (B, T, F))
  y = jnp.eye(B, K)
  keys = augment.example_keys(0, 5, B)
  x_eval, y_eval = _augment(keys, x, y)
  np.testing.assert_array_equal(x_eval, x)
  np.testing.assert_array_equal(y_eval, y)

  x_out, y_out = _augment(keys, x, y, mixup_rate=0.5, **TRAIN)
  split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  x_mix, y_expected, _ = _mixup(split[:, 0], x, y, 0.5, None, -0.25)
  x_expected = _mask_then_noise(split, x_mix)
  np.testing.assert_allclose(x_out, x_expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y_out, y_expected, rtol=1e-6)


def test_example_keys_depend_on_seed_step_index_only():
  keys = augment.example_keys(3, 10, B)
  data = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
  half = B // 2
  np.testing.assert_array_equal(data(keys[half:]), data(augment.example_keys(3, 10, half, half)))
  assert len({tuple(row.ravel()) for row in data(keys)}) == B
  assert not np.array_equal(data(keys), data(augment.example_keys(3, 11, B)))
  assert not np.array_equal(data(keys), data(augment.example_keys(4, 10, B)))
  # without mix-up a clip's augmentation is the same whatever batch it is in
  x = jax.random.normal(jax.random.key(18), (2 * B, T, F))
  other = augment.example_keys(3, 99, half)
  y = jnp.ones((B, K))
  full, _ = _augment(keys, x[:B], y, mixup_rate=0.0, **TRAIN)
  moved, _ = _augment(jnp.concatenate([other, keys[half:]]),
                      jnp.concatenate([x[B:B + half], x[half:B]]), y, mixup_rate=0.0, **TRAIN)
  np.testing.assert_array_equal(full[half:], moved[half:])
