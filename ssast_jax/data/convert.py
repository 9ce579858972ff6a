"""Converts per-clip `.pt` fbank files into numpy shards.

  python -m ssast_jax.data.convert --json J --pt-dir D --out DIR \
      [--workers N] [--dtype float16|float32] [--label-csv CSV]

The JSON entries (`{"data": [{"wav": ..., "labels": ...}]}`) are split in JSON order into
shards of a fixed number of entries, so the plan is the same on every run and an interrupted
run resumes by converting only the shards it has not finished. Entries whose `.pt` file is
missing, unreadable, of the wrong shape or non-finite are skipped and listed in the manifest.
The manifest is written last; its presence means the output is complete.
"""

import argparse
import collections
import contextlib
import csv
import hashlib
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import tqdm

from ssast_jax.data import pt_features
from ssast_jax.data import shard_writer
from ssast_jax.data import shards

DEFAULT_CLIPS_PER_SHARD = 256


class ConversionError(Exception):
  """The conversion cannot run or produced no clip; the message names the cause."""


def read_entries(json_path: Path) -> list[tuple[str, str]]:
  """Returns the (wav, labels) pairs of a dataset JSON, checking its structure."""
  try:
    data = json.loads(json_path.read_text())
  except FileNotFoundError:
    raise ConversionError(f"--json {json_path} does not exist") from None
  except (OSError, ValueError) as e:
    raise ConversionError(f"--json {json_path} is not readable JSON: {e}") from None
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise ConversionError(f"--json {json_path} must be an object with a list under 'data'")
  entries = []
  for position, item in enumerate(data["data"]):
    if not (isinstance(item, dict) and isinstance(item.get("wav"), str)
            and isinstance(item.get("labels", ""), str)):
      raise ConversionError(f"--json {json_path}: entry {position} needs a string 'wav' and "
                            "optionally a string 'labels'")
    entries.append((item["wav"], item.get("labels", "")))
  if not entries:
    raise ConversionError(f"--json {json_path} lists no clips")
  return entries


def read_label_csv(csv_path: Path) -> dict:
  """Returns the label table of an `index,mid,display_name` CSV ordered by index."""
  try:
    with open(csv_path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f, skipinitialspace=True))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ConversionError(f"--label-csv {csv_path} is not readable: {e}") from None
  if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
    raise ConversionError(f"--label-csv {csv_path} needs the columns index,mid,display_name "
                          "and at least one row")
  table = {}
  for line, row in enumerate(rows, start=2):
    try:
      index = int(row["index"])
    except (TypeError, ValueError):
      raise ConversionError(f"--label-csv {csv_path} line {line}: index {row['index']!r} is "
                            "not an integer") from None
    if index in table or not row["mid"]:
      raise ConversionError(f"--label-csv {csv_path} line {line}: duplicate index or empty mid")
    table[index] = (row["mid"], row["display_name"] or "")
  if sorted(table) != list(range(len(table))):
    raise ConversionError(f"--label-csv {csv_path}: indices must be 0..{len(table) - 1}")
  mids = [table[i][0] for i in range(len(table))]
  if len(set(mids)) != len(mids):
    raise ConversionError(f"--label-csv {csv_path}: a mid appears twice")
  return {"mids": mids, "display_names": [table[i][1] for i in range(len(table))]}


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _probe_num_mel_bins(entries, pt_dir: Path) -> int:
  """F of the first clip in JSON order that converts cleanly."""
  reasons = collections.Counter()
  for wav, _ in entries:
    try:
      return pt_features.load_clip(shard_writer.pt_path(pt_dir, wav), None).shape[1]
    except pt_features.SkippedClip as e:
      reasons[e.reason] += 1
  raise ConversionError(f"no entry has a usable .pt file in {pt_dir} "
                        f"({_format_counts(reasons)}); nothing to convert")


def _format_counts(counts) -> str:
  return ", ".join(f"{counts[r]} {r}" for r in pt_features.SKIP_REASONS if counts.get(r))


def _plan(entries, pt_dir: Path, out_dir: Path, dtype: str, num_mel_bins: int,
          clips_per_shard: int) -> list[shard_writer.ShardTask]:
  tasks = []
  for shard, first in enumerate(range(0, len(entries), clips_per_shard)):
    chunk = tuple(entries[first:first + clips_per_shard])
    digest = hashlib.sha256(json.dumps(
        [str(pt_dir), dtype, num_mel_bins, chunk]).encode()).hexdigest()
    tasks.append(shard_writer.ShardTask(shard, chunk, str(pt_dir), str(out_dir), dtype,
                                        num_mel_bins, digest))
  return tasks


def _owned_files(out_dir: Path):
  """Files in out_dir this converter writes (so overwrite/cleanup never touch others)."""
  for pattern in ("shard-*.frames.npy", "shard-*.clips.json", ".shard-*.tmp",
                  shards.MANIFEST_NAME, f".{shards.MANIFEST_NAME}.*.tmp",
                  shards.INDEX_NAME, f".{shards.INDEX_NAME}.*.tmp"):
    yield from out_dir.glob(pattern)


def _remove_unplanned(out_dir: Path, num_shards: int) -> None:
  """Removes temporaries of an interrupted run and shards beyond the current plan."""
  planned = {shards.frames_name(k) for k in range(num_shards)}
  planned |= {shards.clips_name(k) for k in range(num_shards)}
  for path in _owned_files(out_dir):
    if path.name not in planned and path.name != shards.MANIFEST_NAME:
      path.unlink()


def _worker_pool(workers: int, num_tasks: int, start_method: str):
  """A process pool, or a null context (meaning: convert in this process) for one worker."""
  if workers <= 1 or num_tasks <= 1:
    return contextlib.nullcontext()
  return multiprocessing.get_context(start_method).Pool(min(workers, num_tasks))


def _label_check(clip_lists, label_table) -> dict | None:
  if label_table is None:
    return None
  known = set(label_table["mids"])
  unknown, clips = set(), 0
  for clip_list in clip_lists:
    for labels in clip_list["clips"]["labels"]:
      missing = {mid.strip() for mid in labels.split(",") if mid.strip()} - known
      unknown |= missing
      clips += bool(missing)
  return {"clips": clips, "mids": sorted(unknown)}


def _build_manifest(clip_lists, request, source, dtype, num_mel_bins, label_table):
  """Returns the manifest and the clip index (shard, first frame, length) of all clips."""
  stats, skipped, shard_rows, index = (0, 0.0, 0.0), [], [], []
  for clip_list in clip_lists:
    stats = shard_writer.merge_stats(stats, (clip_list["stats"]["count"],
                                             clip_list["stats"]["mean"],
                                             clip_list["stats"]["m2"]))
    skipped += clip_list["skipped"]
    lengths = np.asarray(clip_list["clips"]["length"], np.int64)
    starts = np.cumsum(lengths) - lengths
    index.append(np.stack([np.full_like(lengths, clip_list["shard"]), starts, lengths], 1))
    shard_rows.append({"frames": shards.frames_name(clip_list["shard"]),
                       "clips": shards.clips_name(clip_list["shard"]),
                       "num_clips": len(lengths), "num_frames": clip_list["num_frames"]})
  reasons = collections.Counter(item["reason"] for item in skipped)
  num_clips = sum(row["num_clips"] for row in shard_rows)
  manifest = {
      "format_version": shards.FORMAT_VERSION,
      "dtype": dtype,
      "num_mel_bins": num_mel_bins,
      "num_clips": num_clips,
      "num_frames": sum(row["num_frames"] for row in shard_rows),
      "mean": stats[1],
      "std": float(np.sqrt(stats[2] / stats[0])) if stats[0] else 0.0,
      "source": source,
      "request": request,
      "counts": {"entries": num_clips + len(skipped), "converted": num_clips,
                 "skipped": len(skipped),
                 **{r: reasons.get(r, 0) for r in pt_features.SKIP_REASONS}},
      "skipped": skipped,
      "index_file": shards.INDEX_NAME,
      "shards": shard_rows,
      "labels": label_table,
      "labels_not_in_csv": _label_check(clip_lists, label_table),
  }
  return manifest, np.concatenate(index).astype(np.int64)


def _print_summary(manifest, clip_lists, out_dir, reused, seconds) -> None:
  counts = manifest["counts"]
  print(f"converted {counts['converted']:,} of {counts['entries']:,} clips into "
        f"{len(manifest['shards'])} shards in {out_dir} ({manifest['dtype']}, "
        f"{manifest['num_mel_bins']} mel bins, {manifest['num_frames']:,} frames)")
  if counts["skipped"]:
    print(f"skipped {counts['skipped']:,}: {_format_counts(counts)}")
    examples = {}
    for clip_list in clip_lists:
      for item, detail in zip(clip_list["skipped"], clip_list["skip_details"]):
        examples.setdefault(item["reason"], detail)
    for reason, detail in examples.items():
      print(f"  e.g. {reason}: {detail}")
  print(f"feature mean {manifest['mean']:.6f}, std {manifest['std']:.6f} "
        "(normalisation statistics of the stored clips)")
  print(f"{reused} shards reused from an earlier run; {seconds:.1f} s, "
        f"{counts['entries'] / seconds:,.0f} entries/s")
  unknown = manifest["labels_not_in_csv"]
  if unknown and unknown["clips"]:
    print(f"warning: {unknown['clips']:,} clips carry {len(unknown['mids'])} label ids not in "
          f"the label CSV (e.g. {', '.join(unknown['mids'][:3])})", file=sys.stderr)


def convert(json_path, pt_dir, out_dir, *, workers: int = 2, dtype: str = "float16",
            label_csv=None, overwrite: bool = False, num_mel_bins: int | None = None,
            clips_per_shard: int = DEFAULT_CLIPS_PER_SHARD, verbose: bool = True,
            start_method: str = "spawn") -> dict:
  """Converts the clips listed in `json_path` and returns the manifest.

  Re-running on a finished output returns its manifest without work unless `overwrite`;
  an interrupted output is completed, reusing the shards already written.
  `verbose` shows a progress bar on stderr and a summary on stdout. Worker processes start
  with `start_method`: "fork" starts them fastest but is unsafe in a process that has started
  the JAX runtime (the CLI, which never does, uses it).
  Raises ConversionError for bad arguments or when no clip survives.
  """
  started = time.perf_counter()
  json_path, pt_dir, out_dir = Path(json_path), Path(pt_dir).resolve(), Path(out_dir)
  if dtype not in shards.STORED_DTYPES:
    raise ConversionError(f"--dtype {dtype!r} is not one of {shards.STORED_DTYPES}")
  if workers < 1 or clips_per_shard < 1 or (num_mel_bins is not None and num_mel_bins < 1):
    raise ConversionError("--workers, --clips-per-shard and --num-mel-bins must be positive")
  entries = read_entries(json_path)
  label_table = read_label_csv(Path(label_csv)) if label_csv is not None else None
  if not pt_dir.is_dir():
    raise ConversionError(f"--pt-dir {pt_dir} is not a directory")
  request = {"json_sha256": _sha256(json_path), "pt_dir": str(pt_dir), "dtype": dtype,
             "num_mel_bins": num_mel_bins, "clips_per_shard": clips_per_shard,
             "label_csv_sha256": _sha256(Path(label_csv)) if label_csv is not None else None}
  source = {"json": str(json_path.resolve()), "pt_dir": str(pt_dir),
            "label_csv": str(Path(label_csv).resolve()) if label_csv is not None else None}
  out_dir.mkdir(parents=True, exist_ok=True)
  manifest_path = out_dir / shards.MANIFEST_NAME
  if overwrite:
    manifest_path.unlink(missing_ok=True)
    for path in _owned_files(out_dir):
      path.unlink()
  elif manifest_path.exists():
    try:
      existing = shards.read_manifest(out_dir)
    except shards.ManifestError as e:
      raise ConversionError(f"{e}; pass --overwrite to replace it") from None
    if existing.get("request") != request:
      changed = sorted(k for k in request if existing.get("request", {}).get(k) != request[k])
      raise ConversionError(f"{out_dir} already holds a conversion of other input or options "
                            f"({', '.join(changed)} differ); pass --overwrite to replace it")
    if verbose:
      print(f"{out_dir} is up to date ({existing['num_clips']:,} clips); nothing to do "
            "(pass --overwrite to rebuild)")
    return existing
  num_mel_bins_used = num_mel_bins or _probe_num_mel_bins(entries, pt_dir)
  tasks = _plan(entries, pt_dir, out_dir, dtype, num_mel_bins_used, clips_per_shard)
  _remove_unplanned(out_dir, len(tasks))
  clip_lists = {task.shard: shard_writer.finished_shard(task) for task in tasks}
  todo = [task for task in tasks if clip_lists[task.shard] is None]
  reused = len(tasks) - len(todo)
  # The pool starts before the progress bar's monitor thread so that forking is clean.
  with (_worker_pool(workers, len(todo), start_method) as pool,
        tqdm.tqdm(total=len(entries), unit="clip", desc="convert", file=sys.stderr,
                  disable=not verbose, smoothing=0.1) as bar):
    bar.update(len(entries) - sum(len(task.entries) for task in todo))
    run = pool.imap_unordered if pool is not None else map
    for clip_list in run(shard_writer.convert_shard, todo):
      clip_lists[clip_list["shard"]] = clip_list
      bar.update(len(clip_list["clips"]["wav"]) + len(clip_list["skipped"]))
  ordered = [clip_lists[task.shard] for task in tasks]
  manifest, index = _build_manifest(ordered, request, source, dtype, num_mel_bins_used,
                                    label_table)
  if manifest["num_clips"] == 0:
    raise ConversionError(f"no clip of {json_path} survived conversion "
                          f"({_format_counts(manifest['counts'])})")
  shard_writer.write_atomically(out_dir / shards.INDEX_NAME, lambda f: np.save(f, index))
  encoded = json.dumps(manifest, indent=1).encode()
  shard_writer.write_atomically(manifest_path, lambda f: f.write(encoded))
  if verbose:
    _print_summary(manifest, ordered, out_dir, reused, time.perf_counter() - started)
  return manifest


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ssast_jax.data.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", required=True, type=Path, help="dataset JSON {'data': [...]}")
  parser.add_argument("--pt-dir", required=True, type=Path, help="folder of <stem>.pt files")
  parser.add_argument("--out", required=True, type=Path, help="output shard directory")
  parser.add_argument("--workers", type=int, default=2, help="parallel processes")
  parser.add_argument("--dtype", choices=shards.STORED_DTYPES, default="float16")
  parser.add_argument("--label-csv", type=Path, help="index,mid,display_name CSV")
  parser.add_argument("--num-mel-bins", type=int,
                      help="required F (default: F of the first good clip)")
  parser.add_argument("--clips-per-shard", type=int, default=DEFAULT_CLIPS_PER_SHARD)
  parser.add_argument("--overwrite", action="store_true", help="rebuild a finished output")
  args = parser.parse_args(argv)
  try:
    convert(args.json, args.pt_dir, args.out, workers=args.workers, dtype=args.dtype,
            label_csv=args.label_csv, overwrite=args.overwrite,
            num_mel_bins=args.num_mel_bins, clips_per_shard=args.clips_per_shard,
            start_method="fork")
  except (ConversionError, shards.ManifestError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
