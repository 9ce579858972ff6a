"""Masks: validity, the original's cluster statistics (SPEC section 4), evenness, jit, and
the fast paths against plain reference algorithms fed the same random words."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssast_jax import masking

GRID = (8, 64)


def _row_fractions_and_neighbours(masks, grid):
  p_f, p_t = grid
  hit = np.zeros((masks.shape[0], p_f * p_t), bool)
  hit[np.arange(masks.shape[0])[:, None], masks] = True
  hit = hit.reshape(-1, p_f, p_t)
  padded = np.pad(hit, ((0, 0), (1, 1), (1, 1)))
  inside = np.pad(np.ones((p_f, p_t), bool), 1)
  masked_neighbours = np.zeros(hit.shape)
  neighbours = np.zeros((p_f, p_t))
  for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
    window = (slice(1 + dr, 1 + dr + p_f), slice(1 + dc, 1 + dc + p_t))
    masked_neighbours += padded[(slice(None),) + window]
    neighbours += inside[window]
  return hit.mean(axis=(0, 2)), (masked_neighbours / neighbours)[hit].mean(), hit


@pytest.fixture(scope='module')
def draws():
  return {(mode, m): np.asarray(masking.sample_masks(jax.random.key(7), 4000, GRID, m, mode))
          for mode in masking.MASK_MODES for m in (100, 400)}


@pytest.mark.parametrize('mode', masking.MASK_MODES)
@pytest.mark.parametrize('grid, m', [((8, 64), 400), ((8, 16), 50), ((4, 9), 20), ((1, 512), 300),
                                     ((12, 101), 1000)])
def test_masks_are_distinct_sorted_in_range(mode, grid, m):
  masks = masking.sample_masks(jax.random.key(0), 16, grid, m, mode)
  assert masks.shape == (16, m) and masks.dtype == jnp.int32
  masks = np.asarray(masks)
  assert np.all(np.diff(masks, axis=1) > 0)
  assert masks.min() >= (1 if mode == 'cluster' else 0) and masks.max() < grid[0] * grid[1]


@pytest.mark.parametrize('m, rows, neighbours', [
    (400, [0.416, 0.671, 0.816, 0.873, 0.889, 0.885, 0.882, 0.819], 0.917),
    (100, [0.072, 0.138, 0.203, 0.241, 0.258, 0.256, 0.246, 0.150], 0.766)])
def test_cluster_statistics_match_original(draws, m, rows, neighbours):
  masks = draws[('cluster', m)]
  got_rows, got_neighbours, hit = _row_fractions_and_neighbours(masks, GRID)
  np.testing.assert_allclose(got_rows, rows, atol=0.012)
  assert abs(got_neighbours - neighbours) < 0.006
  assert not hit[:, 0, 0].any()  # patch 0 is never masked


@pytest.mark.parametrize('m', [100, 400])
def test_cluster_uniform_is_even(draws, m):
  masks = draws[('cluster_uniform', m)]
  rows, neighbours, hit = _row_fractions_and_neighbours(masks, GRID)
  columns = hit.mean(axis=(0, 1))
  assert rows.max() / rows.min() <= 1.2
  assert columns.max() / columns.min() <= 1.35  # 64 columns of 4000 x 8 draws: noisier
  assert neighbours > _row_fractions_and_neighbours(draws[('frame', m)], GRID)[1] + 0.1


def test_cluster_uniform_sides_follow_cluster_factor():
  """With few patches the mask is usually one k x k square, k in {c..2c-1}; clusters
  clipped at an edge can need a second one."""
  masks = np.asarray(masking.sample_masks(jax.random.key(3), 500, (40, 40), 4, 'cluster_uniform',
                                          cluster_factor=2))
  rows, cols = masks // 40, masks % 40
  spans = np.maximum(rows.max(1) - rows.min(1), cols.max(1) - cols.min(1)) + 1
  assert np.mean(spans <= 3) > 0.8
  assert set(spans[spans <= 3]) == {2, 3}


@pytest.mark.parametrize('m', [100, 400])
def test_frame_masking_is_uniform(draws, m):
  masks = draws[('frame', m)]
  counts = np.bincount(masks.ravel(), minlength=512) / masks.shape[0]
  expected = m / 512
  assert np.abs(counts - expected).max() < 5 * np.sqrt(expected * (1 - expected) / 4000)


def _reference_cluster(key, grid, m, per_round):
  """SPEC section 4 step by step with a Python set, from the words `_cover_ranks` draws."""
  p_f, p_t = grid
  n = p_f * p_t
  covered, side, round_index = set(), None, 0
  while True:
    words = [int(w) for w in jax.random.bits(jax.random.fold_in(key, round_index),
                                             (per_round + 1,))]
    side = (3, 4, 5)[words[per_round] % 3] if side is None else side
    for word in words[:per_round]:
      start = word % n
      covered.update(c for i in range(side) for j in range(side)
                     if 0 < (c := start + p_t * i + j) < n)
      if len(covered) > m:
        return sorted(covered)[:m]
    round_index += 1


def _reference_cluster_uniform(key, grid, m, per_round, factor):
  """Clipped clusters until >= M patches, the crossing one's new cells kept in score order."""
  p_f, p_t = grid
  sides, big = range(factor, 2 * factor), 2 * factor - 1
  covered, side, round_index = set(), None, 0
  while True:
    words = [int(w) for w in jax.random.bits(jax.random.fold_in(key, round_index),
                                             (2 * per_round + 1 + big * big,))]
    side = sides[words[2 * per_round] % len(sides)] if side is None else side
    score = words[2 * per_round + 1:]
    for c in range(per_round):
      top = words[c] % (p_f + side - 1) + 1 - side
      left = words[per_round + c] % (p_t + side - 1) + 1 - side
      new = [(i * big + j, (top + i) * p_t + left + j) for i in range(side) for j in range(side)
             if 0 <= top + i < p_f and 0 <= left + j < p_t
             and (top + i) * p_t + left + j not in covered]
      if len(covered) + len(new) >= m:
        new.sort(key=lambda cell: (score[cell[0]], cell[0]))
        return sorted(covered | {patch for _, patch in new[:m - len(covered)]})
      covered.update(patch for _, patch in new)
    round_index += 1


@pytest.mark.parametrize('mode', ['cluster', 'cluster_uniform'])
@pytest.mark.parametrize('grid, m', [((8, 64), 400), ((8, 64), 100), ((4, 9), 20),
                                     ((1, 512), 300), ((12, 101), 1000)])
@pytest.mark.parametrize('small_rounds', [False, True], ids=['one_round', 'while_loop'])
def test_cluster_modes_match_reference(monkeypatch, mode, grid, m, small_rounds):
  """The sliding-minimum cover, the stopping-cluster search, the random cut and the
  ascending extraction equal the plain algorithm, both when the first round of clusters
  suffices and when 3 clusters a round force the `while_loop` through many rounds."""
  if small_rounds:
    monkeypatch.setattr(masking, '_clusters_per_round', lambda *args: 3)
  more_than, factor = (m, 3) if mode == 'cluster' else (m - 1, 3)
  per_round = masking._clusters_per_round(grid[0] * grid[1], more_than + 1, factor)
  keys = jax.random.split(jax.random.key(11), 8)
  sampler = functools.partial(masking._SAMPLERS[mode], patch_grid=grid, num_masked=m,
                              cluster_factor=factor)
  got = np.asarray(jax.jit(jax.vmap(sampler))(keys))  # a fresh trace, under the patch
  for key, mask in zip(keys, got):
    want = (_reference_cluster(key, grid, m, per_round) if mode == 'cluster' else
            _reference_cluster_uniform(key, grid, m, per_round, factor))
    np.testing.assert_array_equal(mask, want)


def test_frame_masks_are_the_smallest_uniform_scores():
  """Frame masks equal the M smallest `jax.random.uniform` scores, ties to the lower index."""
  keys = jax.random.split(jax.random.key(4), 64)
  got = np.asarray(masking.masks_from_keys(keys, GRID, 400, 'frame'))
  for key, mask in zip(keys, got):
    scores = np.asarray(jax.random.uniform(key, (512,)))
    np.testing.assert_array_equal(mask, np.sort(np.argsort(scores, kind='stable')[:400]))


@pytest.mark.parametrize('n', [1, 2, 36, 100, 512, 1212])
def test_running_count_and_first_members(n):
  """The matmul running count equals cumsum; the scatter extraction equals the sorted
  indices of `top_k` (and the first members of `nonzero`), without a sort."""
  rng = np.random.default_rng(n)
  for density in (0.05, 0.5, 0.95, 1.0):
    member = rng.random(n) < density
    member[rng.integers(n)] = True
    np.testing.assert_array_equal(masking._running_count(jnp.asarray(member)),
                                  np.cumsum(member))
    for num in {1, int(member.sum()), max(1, int(member.sum()) // 2)}:
      np.testing.assert_array_equal(masking._first_members(jnp.asarray(member), num),
                                    np.nonzero(member)[0][:num])
  priority = jnp.asarray(rng.permutation(n).astype(np.float32))
  for num in sorted({1, (n + 1) // 2, n}):
    chosen = priority <= jnp.sort(priority)[num - 1]
    np.testing.assert_array_equal(masking._first_members(chosen, num),
                                  jnp.sort(jax.lax.top_k(-priority, num)[1]))


@pytest.mark.parametrize('mode', masking.MASK_MODES)
def test_masks_depend_on_own_key_only(mode):
  keys = jax.random.split(jax.random.key(5), 5)
  whole = masking.masks_from_keys(keys, GRID, 400, mode)
  np.testing.assert_array_equal(whole[3:], masking.masks_from_keys(keys[3:], GRID, 400, mode))


def test_jit_and_keys():
  @jax.jit
  def draw(key):
    keys = jax.random.split(key, 3)
    return masking.masks_from_keys(keys, GRID, 400, 'cluster')
  a, b = draw(jax.random.key(1)), draw(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, draw(jax.random.key(2)))
  # one clip's mask depends on its key only, not on the rest of the batch
  keys = jax.random.split(jax.random.key(5), 4)
  whole = masking.masks_from_keys(keys, GRID, 400, 'cluster')
  np.testing.assert_array_equal(whole[2:], masking.masks_from_keys(keys[2:], GRID, 400, 'cluster'))


@pytest.mark.parametrize('mode, m, limit', [('cluster', 511, 510), ('frame', 513, 512),
                                            ('cluster_uniform', 0, 512)])
def test_impossible_mask_sizes_are_refused(mode, m, limit):
  with pytest.raises(ValueError, match=f'needs 1 <= masked patches <= {limit}, got {m}'):
    masking.sample_masks(jax.random.key(0), 2, GRID, m, mode)
  with pytest.raises(ValueError, match='mask mode must be one of'):
    masking.sample_masks(jax.random.key(0), 2, GRID, 10, 'blocks')
