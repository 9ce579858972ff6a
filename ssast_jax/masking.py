"""Patch masks for SSAST pretraining, drawn inside `jax.jit` with explicit keys.

Every mask is a `(B, M)` int32 array of distinct patch indices in ascending order (patch
`n = f * p_t + t`, no offset for the leading tokens). One key per clip: callers that need
results independent of how a batch is split over devices derive those keys from the global
example index (`masks_from_keys`).

Modes:
  cluster          the original's distribution, quirks included (SPEC section 4);
  cluster_uniform  k x k clusters clipped at the grid edges, every patch equally likely;
  frame            M patches uniformly without replacement.
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


def _clusters_per_round(num_patches: int, num_masked: int, min_side: int) -> int:
  """Clusters drawn per loop round: about enough to finish in one round on average."""
  coverage = -math.log(max(1.0 - (num_masked + 1) / num_patches, 1e-3))
  return max(8, int(1.5 * coverage * num_patches / min_side ** 2) + 1)


def _cover_ranks(key, patch_grid, num_masked: int, sides, clipped: bool, max_side: int):
  """For one clip, the index of the first cluster covering each patch, `(N,)` int32.

  Clusters are drawn i.i.d. in rounds of fixed size until more than `num_masked` patches
  are covered, so shapes stay static. `sides` are the possible cluster sides (one is drawn
  per clip). `clipped=False` places clusters like the original: a flat start index, cells
  `start + p_t * i + j` kept when `0 < c < N` (so clusters wrap into the next row and patch
  0 is never masked). `clipped=True` draws the top-left corner from the grid extended by
  `k - 1` rows and columns above and left, and drops cells outside the grid, so every patch
  is equally likely to be covered by a cluster.
  """
  p_f, p_t = patch_grid
  num_patches = p_f * p_t
  side_key, key = jax.random.split(key)
  side = jax.random.choice(side_key, jnp.asarray(sides, jnp.int32))
  per_round = _clusters_per_round(num_patches, num_masked, min(sides))
  rows, cols = jnp.meshgrid(jnp.arange(max_side), jnp.arange(max_side), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  in_cluster = (rows < side) & (cols < side)

  def draw_round(ranks, round_index):
    round_key = jax.random.fold_in(key, round_index)
    if clipped:
      row_key, col_key = jax.random.split(round_key)
      top = jax.random.randint(row_key, (per_round, 1), 1 - side, p_f)
      left = jax.random.randint(col_key, (per_round, 1), 1 - side, p_t)
      r, c = top + rows, left + cols
      valid = in_cluster & (r >= 0) & (r < p_f) & (c >= 0) & (c < p_t)
      cells = r * p_t + c
    else:
      start = jax.random.randint(round_key, (per_round, 1), 0, num_patches)
      cells = start + p_t * rows + cols
      valid = in_cluster & (cells > 0) & (cells < num_patches)
    rank = round_index * per_round + jnp.arange(per_round, dtype=jnp.int32)[:, None]
    rank = jnp.broadcast_to(rank, cells.shape)
    return ranks.at[jnp.where(valid, cells, num_patches)].min(rank, mode='drop')

  def not_done(carry):
    ranks, _ = carry
    return jnp.sum(ranks != _NEVER) <= num_masked

  def body(carry):
    ranks, round_index = carry
    return draw_round(ranks, round_index), round_index + 1

  ranks = jnp.full((num_patches,), _NEVER, jnp.int32)
  ranks, _ = jax.lax.while_loop(not_done, body, (ranks, jnp.int32(0)))
  return ranks


def _smallest_indices(priority, num_masked: int):
  """Indices of the `num_masked` smallest priorities, ascending by index."""
  _, indices = jax.lax.top_k(-priority, num_masked)
  return jnp.sort(indices).astype(jnp.int32)


def _cluster_mask(key, patch_grid, num_masked: int, cluster_factor: int):
  """The original: side 3 + randrange(3), whole clusters until > M distinct, M smallest."""
  del cluster_factor  # parsed but unused by the original
  ranks = _cover_ranks(key, patch_grid, num_masked, (3, 4, 5), clipped=False, max_side=5)
  # The stopping cluster is the (M+1)-th smallest cover rank; keep what it and earlier
  # clusters covered, then the M smallest patch indices of that set.
  last_cluster = jnp.sort(ranks)[num_masked]
  index = jnp.arange(ranks.shape[0])
  return _smallest_indices(jnp.where(ranks <= last_cluster, index, index + ranks.shape[0]),
                           num_masked)


def _cluster_uniform_mask(key, patch_grid, num_masked: int, cluster_factor: int):
  """Clipped clusters until >= M patches; the cluster that crosses M is cut at random."""
  sides = tuple(range(cluster_factor, 2 * cluster_factor))
  rank_key, cut_key = jax.random.split(key)
  ranks = _cover_ranks(rank_key, patch_grid, num_masked - 1, sides, clipped=True,
                       max_side=sides[-1])
  # rank + U[0, 1): earlier clusters first, ties within the last one broken at random.
  priority = ranks.astype(jnp.float32) + jax.random.uniform(cut_key, ranks.shape)
  return _smallest_indices(jnp.where(ranks == _NEVER, jnp.inf, priority), num_masked)


def _frame_mask(key, patch_grid, num_masked: int, cluster_factor: int):
  del cluster_factor
  scores = jax.random.uniform(key, (patch_grid[0] * patch_grid[1],))
  return _smallest_indices(scores, num_masked)


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
