"""Data: `.pt` or audio -> numpy shard conversion, the shard reader and integrity check, and
the Grain input pipelines.

The pipeline names are resolved on first use so that the converter and its worker processes
start without importing Grain (about a second per process).
"""

from ssast_jax.data.shards import ManifestError, ShardedFeatures, check_shards, read_manifest

_PIPELINE_NAMES = ("train_loader", "eval_loader", "steps_per_epoch", "num_eval_batches")

__all__ = ["ManifestError", "ShardedFeatures", "check_shards", "read_manifest",
           *_PIPELINE_NAMES]


def __getattr__(name):
  if name in _PIPELINE_NAMES:
    from ssast_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return getattr(pipeline, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
