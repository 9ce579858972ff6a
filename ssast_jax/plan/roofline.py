"""A step's time on a chip at least, from its FLOPs, the bytes it moves and its
collectives: the plan's estimate (a compiler estimate, not a measurement)."""

from __future__ import annotations


def recompute_factor(remat: bool, policy: str, model) -> float:
  """The work of a rematerialised step over that without remat: 'nothing_saveable'
  recomputes the encoder's forward pass (a third of forward and backward), the
  'dots_with_no_batch_dims_saveable' policy only attention's two batched products (their
  share of the forward: N / 6D of the dense layers' for N tokens of width D),
  'dots_saveable' no product."""
  if not remat:
    return 1.0
  if policy == 'nothing_saveable':
    return 4 / 3
  if policy == 'dots_with_no_batch_dims_saveable':
    attention = (model.num_patches + 2) / (6 * model.embed_dim)
    return 1 + attention / (1 + attention) / 3
  return 1.0


def roofline(chip, dtype: str, flops: float, moved: float, collective_bytes: float) -> dict:
  """Seconds a step needs at least, per device, for its FLOPs at the chip's peak for
  `dtype`, its bytes at the memory bandwidth and its collectives' at the interconnect's."""
  return {'compute': flops / chip.peak_flops[dtype], 'memory': moved / chip.memory_bandwidth,
          'collectives': collective_bytes / chip.interconnect_bandwidth}


def estimate(chip, dtype: str, cost: dict, collective_bytes: float, batch_size: int,
             count: int, run_clips: int | None, recompute: float,
             bytes_recompute: float) -> dict:
  """The step takes at least its FLOPs (times remat's recomputation) at the chip's peak,
  its bytes (times `bytes_recompute`: the recomputed forward moves its bytes again, where
  they are those of the step without remat) at the memory bandwidth and its collectives'
  bytes at the interconnect bandwidth; the largest of the three bounds it.
  `flops_per_device_per_step` and `bytes_accessed_per_device` leave the recomputation out
  (as MFU does)."""
  flops, moved = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  bounds = roofline(chip, dtype, flops * recompute, moved * bytes_recompute,
                    collective_bytes if count > 1 else 0)
  bound = max(bounds, key=bounds.get)
  step_s = bounds[bound]
  clips_per_s = batch_size / step_s if step_s > 0 else None
  return {'flops_per_device_per_step': flops, 'bytes_accessed_per_device': moved,
          'roofline_s': bounds, 'bound': bound, 'estimated_step_s': step_s,
          'estimated_clips_per_s': clips_per_s,
          'estimated_clips_per_s_per_chip': clips_per_s / count if clips_per_s else None,
          'run_clips': run_clips,
          'estimated_run_hours': (run_clips / clips_per_s / 3600
                                  if run_clips and clips_per_s else None)}
