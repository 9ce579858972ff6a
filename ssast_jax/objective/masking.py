"""Patch masks for SSAST pretraining, drawn inside `jax.jit` with explicit keys.

Every mask is a `(B, M)` int32 array of distinct patch indices in ascending order (patch
`n = f * p_t + t`, no offset for the leading tokens). One key per clip: callers that need
results independent of how a batch is split over devices derive those keys from the global
example index (`masks_from_keys`). A clip's mask is a pure function of its own key.

Modes:
  cluster          the original's distribution, quirks included (SPEC section 4);
  cluster_uniform  k x k clusters clipped at the grid edges, every patch equally likely;
  frame            M patches uniformly without replacement.

Speed (masks are drawn every step; a batch of 12 on 8 x 64 with M = 400 takes well under
1 ms on two CPU cores). On XLA:CPU a float sort is slow (about 0.6 ms for 12 x 512
values), `jnp.cumsum` (a cascade of reduce-windows) is slow, scatters cost per element and
every threefry call is a rolled loop, so:
  * each cluster is scattered as one start point, and the cells clusters cover follow from
    a separable k x k sliding minimum (`_flat_cover`, `_clipped_cover`);
  * one round of clusters, drawn with one call for random words, almost always suffices;
    a `while_loop` of further rounds is the exact fallback;
  * the stopping cluster comes from a bisection over cluster numbers, not a sort;
  * a membership mask becomes ascending indices through a running count (two small
    triangular matmuls, exact in float32) and a scatter (`_first_members`);
  * frame masking sorts distinct integer scores once, then takes a threshold.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASK_MODES = ('cluster', 'cluster_uniform', 'frame')
_NEVER = 2**31 - 1  # cover rank of a patch that no cluster has reached


def default_mode(num_mel_bins: int, fshape: int) -> str:
  """The original's choice: frame masking for frame models, cluster masking otherwise."""
  return 'frame' if num_mel_bins == fshape else 'cluster'


def check_mask_size(patch_grid, num_masked: int, mode: str) -> None:
  """Raises ValueError when `mode` cannot draw `num_masked` patches on `patch_grid`."""
  if mode not in MASK_MODES:
    raise ValueError(f'mask mode must be one of {MASK_MODES}, got {mode!r}')
  num_patches = patch_grid[0] * patch_grid[1]
  # The original's cluster loop stops only once it holds MORE than M distinct patches, and
  # it never masks patch 0, so it needs M < N - 1.
  limit = num_patches - 2 if mode == 'cluster' else num_patches
  if not 1 <= num_masked <= limit:
    raise ValueError(f'{mode} masking on a {patch_grid[0]}x{patch_grid[1]} patch grid '
                     f'needs 1 <= masked patches <= {limit}, got {num_masked}')


# ----------------------------------------------------------------------------- helpers


def _running_count(member):
  """Inclusive running count of a `(N,)` bool array, `(N,)` int32 (`cumsum`, but fast).

  On CPU `jnp.cumsum` (a cascade of reduce-windows) takes about 3x longer for 12 x 512;
  here the array is cut into `nb` blocks of `b ~ sqrt(N)` and counted with a `(b, b)` and
  an `(nb, nb)` triangular matmul. The sums are integers below 2**24, so float32 at full
  precision is exact.
  """
  n = member.shape[0]
  b = max(1, math.isqrt(n - 1) + 1)
  nb = -(-n // b)
  blocks = jnp.pad(member.astype(jnp.float32), (0, nb * b - n)).reshape(nb, b)
  hi = jax.lax.Precision.HIGHEST
  within = jnp.dot(blocks, jnp.triu(jnp.ones((b, b), jnp.float32)), precision=hi)
  before = jnp.dot(within[:, -1], jnp.triu(jnp.ones((nb, nb), jnp.float32), 1), precision=hi)
  return (within + before[:, None]).reshape(-1)[:n].astype(jnp.int32)


def _first_members(member, num: int):
  """The `num` smallest indices `n` with `member[n]`, ascending, `(num,)` int32.

  `member` must hold at least `num` True. Each member's running count is its slot in the
  output; slots `>= num` fall off the end of the scatter. Equal to
  `jnp.sort(jnp.nonzero(member)[0][:num])`, without a sort.
  """
  slot = jnp.where(member, _running_count(member) - 1, num)
  return jnp.zeros((num,), jnp.int32).at[slot].set(
      jnp.arange(member.shape[0], dtype=jnp.int32), mode='drop')


def _window_min(values, side, max_side: int, stride: int, axis: int = 0):
  """`min(values[n - stride * i] for i < side)` along `axis`, indices below 0 as `_NEVER`.

  The `max_side` shifted copies are static slices of one padded array, stacked and reduced
  at once (a chain of separate shifted minima costs several times more on CPU).
  """
  size, pad = values.shape[axis], stride * (max_side - 1)
  widths = [(0, 0)] * values.ndim
  widths[axis] = (pad, 0)
  padded = jnp.pad(values, widths, constant_values=_NEVER)
  shifted = jnp.stack([jax.lax.slice_in_dim(padded, pad - stride * i, pad - stride * i + size,
                                            axis=axis) for i in range(max_side)])
  used = (jnp.arange(max_side) < side).reshape((max_side,) + (1,) * values.ndim)
  return jnp.min(jnp.where(used, shifted, _NEVER), axis=0)


def _flat_cover(starts, ids, side, patch_grid, max_side: int):
  """Cover ranks of the original's clusters: the smallest id of a cluster covering each patch.

  Cluster `c` starts at flat index `starts[c]` and holds the cells `start + p_t * i + j`,
  `i, j < side`, kept when `0 < cell < N`: it wraps into the next row past the last time
  column and never covers patch 0. A cell `n` is covered by a cluster starting at
  `n - p_t * i - j`, so the ranks are a sliding minimum of the per-start minimum id.
  """
  p_f, p_t = patch_grid
  num_patches = p_f * p_t
  first = jnp.full((num_patches,), _NEVER, jnp.int32).at[starts].min(ids)
  ranks = _window_min(_window_min(first, side, max_side, 1), side, max_side, p_t)
  return ranks.at[0].set(_NEVER)


def _clipped_cover(tops, lefts, ids, side, patch_grid, max_side: int):
  """Cover ranks of `side x side` clusters with top-left corners `(tops, lefts)` that may lie
  up to `side - 1` rows / columns above or left of the grid; cells outside it are dropped.

  The corners are scattered into the grid extended by `max_side - 1` rows and columns above
  and left; a patch's rank is the minimum over the `side x side` corners above-left of it.
  """
  p_f, p_t = patch_grid
  pad = max_side - 1
  width = p_t + pad
  first = jnp.full(((p_f + pad) * width,), _NEVER, jnp.int32).at[
      (tops + pad) * width + lefts + pad].min(ids).reshape(p_f + pad, width)
  first = _window_min(_window_min(first, side, max_side, 1, axis=1), side, max_side, 1, axis=0)
  return first[pad:, pad:].reshape(-1)


def _clusters_per_round(num_patches: int, covered: int, min_side: int) -> int:
  """Clusters drawn per round: enough that one round almost always covers `covered` patches.

  `N * -log(1 - covered / N) / k^2` clusters cover `covered` patches on average if they were
  scattered cells; overlapping squares need about 1.25 times that, and the spread across
  clips is small (8 x 64, M = 400, k = 3: mean 107 clusters, 99.9th percentile 141), so
  twice that plus 8 leaves a second round to well under one clip in a thousand.
  """
  coverage = -math.log(max(1.0 - covered / num_patches, 1e-3))
  return 8 + int(2.0 * coverage * num_patches / min_side ** 2)


def _below(words, n):
  """Integers in `[0, n)` from uniform uint32 `words`, by remainder.

  Exactly uniform when `n` divides 2**32 (e.g. N = 512 patches); otherwise a value is at
  most `n / 2**32` (about 1e-7 here) more or less likely than another, the same order as
  `jax.random.randint`'s and far below anything a mask statistic can see.
  """
  return (words % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


def _cover_ranks(key, patch_grid, more_than: int, sides, clipped: bool, extra_words: int = 0):
  """Clusters drawn until more than `more_than` patches are covered, for one clip.

  Returns `(ranks, side, first, R, corners, extra)`: `ranks` `(N,)` int32 holds, per patch,
  the number of the first cluster covering it (`_NEVER` for none); `side` is the clip's
  cluster side, drawn once per clip from `sides`; the last round holds clusters
  `first .. first + R - 1` placed at `corners` (`(starts,)` or `(tops, lefts)`), and
  `extra` is `extra_words` further uniform uint32 words drawn with that round, for the
  caller (independent of where the round's clusters fell).

  Clusters are i.i.d., so the round size `R` changes only the speed: the first round almost
  always suffices, and a `while_loop` of further rounds keeps the result exact. Each round
  is a single draw of random words from `fold_in(key, round)`: the corners (`R` starts, or
  `R` tops then `R` lefts), one word for the side (used from the first round only), then
  the `extra_words`. On CPU a threefry call costs tens of microseconds even for a few words.
  `clipped=False` places clusters like the original (`_flat_cover`), `clipped=True` with the
  edges clipped (`_clipped_cover`), which makes every patch equally likely to be covered.
  """
  p_f, p_t = patch_grid
  num_patches = p_f * p_t
  max_side = max(sides)
  per_round = _clusters_per_round(num_patches, more_than + 1, min(sides))
  corner_words = per_round * (2 if clipped else 1)

  def draw_words(round_index):
    return jax.random.bits(jax.random.fold_in(key, round_index),
                           (corner_words + 1 + extra_words,))

  def draw_round(ranks, round_index, words, side):
    ids = round_index * per_round + jnp.arange(per_round, dtype=jnp.int32)
    if clipped:
      corners = (_below(words[:per_round], p_f + side - 1) + 1 - side,
                 _below(words[per_round:corner_words], p_t + side - 1) + 1 - side)
      new = _clipped_cover(*corners, ids, side, patch_grid, max_side)
    else:
      corners = (_below(words[:per_round], num_patches),)
      new = _flat_cover(*corners, ids, side, patch_grid, max_side)
    extra = words[corner_words + 1:]
    return jnp.minimum(ranks, new), corners, extra  # earlier rounds hold the smaller ids

  words = draw_words(0)
  side = jnp.asarray(sides, jnp.int32)[_below(words[corner_words], len(sides))]
  ranks, corners, extra = draw_round(jnp.full((num_patches,), _NEVER, jnp.int32), 0, words,
                                     side)

  def not_done(carry):
    return jnp.sum(carry[0] != _NEVER) <= more_than

  def body(carry):
    ranks, round_index, _, _ = carry
    round_index = round_index + 1
    ranks, corners, extra = draw_round(ranks, round_index, draw_words(round_index), side)
    return ranks, round_index, corners, extra

  ranks, last_round, corners, extra = jax.lax.while_loop(
      not_done, body, (ranks, jnp.int32(0), corners, extra))
  return ranks, side, last_round * per_round, per_round, corners, extra


def _stopping_cluster(ranks, more_than: int, first, count: int):
  """The first cluster `c` in `[first, first + count)` with more than `more_than` patches of
  rank `<= c` (there is one: the clusters before `first` covered at most `more_than`), by
  bisection over the cluster numbers instead of a sort over the patches."""
  lo, size = first, count  # the answer lies in [lo, lo + size)
  for _ in range(max(1, (count - 1).bit_length())):
    half = size // 2
    enough = jnp.sum(ranks <= lo + half - 1) > more_than
    lo = jnp.where(enough, lo, lo + half)
    size = jnp.where(enough, half, size - half)
  return lo


# ----------------------------------------------------------------------------- samplers


def _cluster_mask(key, patch_grid, num_masked: int, cluster_factor: int):
  """The original: side 3 + randrange(3), whole clusters until > M distinct, M smallest."""
  del cluster_factor  # parsed but unused by the original
  ranks, _, first, per_round, _, _ = _cover_ranks(key, patch_grid, num_masked, (3, 4, 5),
                                                  clipped=False)
  # The stopping cluster is the first to take the count above M; keep what it and earlier
  # clusters covered, then the M smallest patch indices of that set.
  last = _stopping_cluster(ranks, num_masked, first, per_round)
  return _first_members(ranks <= last, num_masked)


def _cluster_uniform_mask(key, patch_grid, num_masked: int, cluster_factor: int):
  """Clipped clusters until >= M patches; the cluster that crosses M is cut at random.

  The patches new in the crossing cluster `L` are ordered by a uniform score drawn per cell
  of its `k x k` square (ties by cell), and the first `M - #(rank < L)` of them are kept:
  a uniformly random subset of the size needed.
  """
  sides = tuple(range(cluster_factor, 2 * cluster_factor))
  max_side = sides[-1]
  p_f, p_t = patch_grid
  ranks, side, first, per_round, (tops, lefts), score = _cover_ranks(
      key, patch_grid, num_masked - 1, sides, clipped=True, extra_words=max_side ** 2)
  last = _stopping_cluster(ranks, num_masked - 1, first, per_round)
  before = ranks < last
  wanted = num_masked - jnp.sum(before)
  # The crossing cluster's cells, `(max_side ** 2,)`, and which of them it covers first.
  cell = jnp.arange(max_side ** 2, dtype=jnp.int32)
  i, j = cell // max_side, cell % max_side
  rows, cols = tops[last - first] + i, lefts[last - first] + j
  inside = (i < side) & (j < side) & (rows >= 0) & (rows < p_f) & (cols >= 0) & (cols < p_t)
  cells = jnp.where(inside, rows * p_t + cols, 0)
  new = inside & (ranks[cells] == last)
  ahead = (score[None, :] < score[:, None]) | ((score[None, :] == score[:, None]) &
                                               (cell[None, :] < cell[:, None]))
  place = jnp.sum(ahead & new[None, :], axis=1)  # order among the new cells
  keep = new & (place < wanted)
  member = before.at[jnp.where(keep, cells, ranks.shape[0])].set(True, mode='drop')
  return _first_members(member, num_masked)


def _frame_mask(key, patch_grid, num_masked: int, cluster_factor: int):
  """The `M` patches with the smallest uniform scores: a uniform `M`-subset.

  Each score is a random word with its low `b = bit_length(N - 1)` bits replaced by the
  patch index, so scores are distinct and compare as (top `32 - b` random bits, index),
  and the `M`-th smallest is a threshold. For N <= 512 that is 23 or more random bits,
  the resolution of a float32 uniform (for N = 512 the same order as ranking
  `jax.random.uniform` scores with ties to the lower index, so the same masks). An integer
  sort: XLA's float sort on CPU is several times slower, and `top_k` of `min(M, N - M)`
  plus a scatter slower too.
  """
  del cluster_factor
  num_patches = patch_grid[0] * patch_grid[1]
  index_bits = max(1, (num_patches - 1).bit_length())
  score = (jax.random.bits(key, (num_patches,)) >> index_bits << index_bits) | jnp.arange(
      num_patches, dtype=jnp.uint32)
  return _first_members(score <= jnp.sort(score)[num_masked - 1], num_masked)


_SAMPLERS = {'cluster': _cluster_mask, 'cluster_uniform': _cluster_uniform_mask,
             'frame': _frame_mask}


@functools.partial(jax.jit, static_argnames=('patch_grid', 'num_masked', 'mode',
                                             'cluster_factor'))
def masks_from_keys(keys: jax.Array, patch_grid: tuple[int, int], num_masked: int,
                    mode: str = 'cluster', cluster_factor: int = 3) -> jax.Array:
  """One mask per key: `keys` `(B,)` -> `(B, num_masked)` int32 patch indices."""
  check_mask_size(patch_grid, num_masked, mode)
  sampler = functools.partial(_SAMPLERS[mode], patch_grid=tuple(patch_grid),
                              num_masked=num_masked, cluster_factor=cluster_factor)
  return jax.vmap(lambda k: sampler(k))(keys)


def sample_masks(key: jax.Array, batch_size: int, patch_grid: tuple[int, int],
                 num_masked: int, mode: str = 'cluster', cluster_factor: int = 3) -> jax.Array:
  """`batch_size` independent masks `(batch_size, num_masked)` int32 from one key."""
  return masks_from_keys(jax.random.split(key, batch_size), tuple(patch_grid), num_masked,
                         mode, cluster_factor)
