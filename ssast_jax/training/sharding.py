"""The device mesh and where arrays live on it: data parallelism with FSDP.

The mesh has axes ('data', 'fsdp'); `fsdp` devices share one copy of the parameters and
optimiser state. The batch is split over all devices (both axes). Each parameter and Adam
moment is split over 'fsdp' along its largest dimension that the axis size divides
(MaxText's rule); tensors too small to matter or with no such dimension are replicated.
The step constrains the parameters it computes with to be whole on every device and the
gradients to the parameters' layout, and XLA inserts the collectives: an all-gather of the
parameters, a reduction of the gradients over the batch that keeps each device's shard.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over every device
# Replicating tensors under 64 KiB (float32) costs little memory and saves a collective each.
MIN_SHARDED_ELEMENTS = 2 ** 14


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A (device_count // fsdp) x fsdp mesh over `devices`: all devices (of every process)
  by default, or those of a topology compiled for without being present (`ssast_jax.plan`)."""
  count = jax.device_count() if devices is None else len(devices)
  if fsdp < 1 or count % fsdp:
    raise ValueError(f'fsdp is {fsdp}, which does not divide the {count} devices')
  return jax.make_mesh((count // fsdp, fsdp), MESH_AXES,
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays whose leading dimension is the batch, split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """The partition of an array of `shape`: its largest dimension divisible by `fsdp_size`
  over 'fsdp' (the last such on ties), or replicated when small or indivisible."""
  size = 1
  for dim in shape:
    size *= dim
  if fsdp_size == 1 or size < MIN_SHARDED_ELEMENTS:
    return P()
  candidates = [(dim, axis) for axis, dim in enumerate(shape) if dim % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*(['fsdp' if i == axis else None for i in range(len(shape))]))


def state_shardings(tree, mesh: Mesh):
  """The FSDP sharding of every array in `tree` (arrays or shape-dtype structs)."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size)), tree)


def with_shardings(abstract_tree, shardings):
  """Shape-dtype structs carrying `shardings`: restore and compilation targets."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def gather(tree, mesh: Mesh | None):
  """`tree` constrained to be whole on every device (FSDP's all-gather); no-op without a
  mesh."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def shard_like_state(tree, mesh: Mesh | None):
  """`tree` (e.g. gradients) constrained to the FSDP layout of same-shaped state."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, state_shardings(tree, mesh))


def shard_batch(tree, mesh: Mesh | None):
  """`tree`'s leading (batch) dimension constrained to be split over every device."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh))
