"""The positional embedding carried from the pretraining patch grid to a fine-tuning one.

The original (`ASTModel.__init__` with `pretrain_stage=False`, SPEC section 10) views the
patch part of the embedding as a `(D, p_f, p_t)` image and adapts it in two steps:
- time: centre crop when the new `t_dim < p_t`, else a bilinear resize to `(8, t_dim)`;
  the 8 is hard-coded (the frequency rows of the published 128-bin, 16-high patches), so
  a grid with `p_f != 8` has its frequency axis resized to 8 rows here as well;
- frequency, compared with the pretraining `p_f` (not with the rows the time step left):
  centre crop when `f_dim < p_f`, else a bilinear resize to `(f_dim, t_dim)`.
The two leading tokens' embeddings are kept. Bilinear is PyTorch's `align_corners=False`
without antialiasing. Computed once on the host, in numpy.

The quirk: the frequency crop slices `t_dim` rows where `f_dim` are meant. Where that
slice holds exactly `f_dim` rows it is the correct centre crop; elsewhere the original
fails (its reshape to `f_dim * t_dim` patches does not fit), and so does this default,
naming `fix_crop`, the corrected slice.
"""

from __future__ import annotations

import numpy as np

from ssast_jax.model import NUM_LEADING_TOKENS

TIME_RESIZE_ROWS = 8  # the original's hard-coded frequency size of the time resize


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`(out_size, in_size)` weights of PyTorch's 1-D linear interpolation with
  `align_corners=False`: source coordinate `(i + 0.5) * in / out - 0.5`, clamped at 0,
  mixing its floor and the next sample (the last sample repeats at the far edge). The
  coordinate is computed in float32, as PyTorch computes it for float32 tensors."""
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  source = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0))
  low = np.floor(source).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = (source - low.astype(f32)).astype(np.float64)
  weights = np.zeros((out_size, in_size))
  np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), high), frac)
  return weights


def bilinear_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`image` `(D, H, W)` resized to `(D, *size)` as `F.interpolate(mode='bilinear')`
  (which is separable: the frequency weights times the time weights)."""
  rows = bilinear_matrix(image.shape[1], size[0])
  cols = bilinear_matrix(image.shape[2], size[1])
  return np.einsum('fh,dhw,tw->dft', rows, image.astype(np.float64), cols)


def centre_start(old: int, new: int) -> int:
  """The original's crop offset `int(old / 2) - int(new / 2)`."""
  return old // 2 - new // 2


def adapt_pos_embed(pos_embed: np.ndarray, pretrain_grid: tuple[int, int],
                    grid: tuple[int, int], fix_crop: bool = False) -> np.ndarray:
  """`pos_embed` `(1, p_f * p_t + 2, D)` of the pretraining grid `(p_f, p_t)` adapted to
  `grid` `(f_dim, t_dim)`: `(1, f_dim * t_dim + 2, D)` float32, as the original does it.

  `fix_crop` slices `f_dim` rows in the frequency crop (the original slices `t_dim`).
  Raises ValueError where the frequency crop does not yield `f_dim` rows (the original
  fails there too).
  """
  (p_f, p_t), (f_dim, t_dim) = pretrain_grid, grid
  lead, patches = pos_embed[:, :NUM_LEADING_TOKENS], pos_embed[0, NUM_LEADING_TOKENS:]
  dim = patches.shape[-1]
  if patches.shape[0] != p_f * p_t:
    raise ValueError(f'pos_embed holds {patches.shape[0]} patch embeddings, but the '
                     f'pretraining grid {p_f} x {p_t} has {p_f * p_t}')
  image = patches.T.reshape(dim, p_f, p_t)  # patch n = f * p_t + t
  if t_dim < p_t:
    start = centre_start(p_t, t_dim)
    image = image[:, :, start:start + t_dim]
  else:
    image = bilinear_resize(image, (TIME_RESIZE_ROWS, t_dim))
  if f_dim < p_f:
    start = centre_start(p_f, f_dim)
    image = image[:, start:start + (f_dim if fix_crop else t_dim)]
    if image.shape[1] != f_dim:
      hint = ('' if fix_crop else '; the original slices t_dim rows where f_dim are meant '
              'and fails here as well: pass fix_pos_embed_crop=True for the corrected slice')
      raise ValueError(f'positional embedding: cropping the frequency axis from {p_f} to '
                       f'{f_dim} patches (grid {f_dim} x {t_dim}) leaves {image.shape[1]} '
                       f'rows{hint}')
  else:
    image = bilinear_resize(image, (f_dim, t_dim))
  adapted = image.reshape(dim, f_dim * t_dim).T[None]
  return np.concatenate([lead, adapted], axis=1).astype(np.float32)
