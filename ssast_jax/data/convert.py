"""Converts per-clip `.pt` fbank files, or audio files, into numpy shards; checks shards.

  python -m ssast_jax.data.convert --json J (--pt-dir D | --audio [--audio-root R]) \
      --out DIR [--workers N] [--dtype float16|float32] [--label-csv CSV]
  python -m ssast_jax.data.convert --verify DIR

The JSON entries (`{"data": [{"wav": ..., "labels": ...}]}`) are split in JSON order into
shards of a fixed number of entries, so the plan is the same on every run and an interrupted
run resumes by converting only the shards it has not finished. A clip's features are read
from `<D>/<stem of wav>.pt`, or computed from the audio file `wav` (absolute, or relative to
R, by default the JSON file's folder) as the original computes them. Entries whose features
cannot be had are skipped and listed in the manifest with the reason (`sources`). The
manifest, written last, records every file's size and sha256; its presence means the output
is complete. `--verify` checks a finished output against it (`shards.check_shards`).
"""

import argparse
import collections
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import tqdm

from ssast_jax.data import shard_writer
from ssast_jax.data import shards
from ssast_jax.data import sources

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


def _resolve_source(json_path: Path, pt_dir, audio: bool, audio_root) -> tuple[str, Path]:
  """The source kind and its folder: the .pt folder, or where relative audio paths start."""
  if (pt_dir is not None) == bool(audio):
    raise ConversionError("give exactly one of --pt-dir D (precomputed .pt features) and "
                          "--audio (features computed from the audio files)")
  if audio_root is not None and not audio:
    raise ConversionError("--audio-root is only for --audio")
  if pt_dir is not None:
    kind, root, flag = sources.PT, Path(pt_dir).resolve(), "--pt-dir"
  else:
    kind, flag = sources.AUDIO, "--audio-root"
    root = Path(audio_root if audio_root is not None else json_path.parent).resolve()
  if not root.is_dir():
    raise ConversionError(f"{flag} {root} is not a directory")
  return kind, root


def _probe_num_mel_bins(entries, pt_dir: Path) -> int:
  """F of the first clip in JSON order that converts cleanly."""
  reasons = collections.Counter()
  for wav, _ in entries:
    try:
      return sources.load_clip(sources.PT, sources.clip_path(sources.PT, pt_dir, wav),
                               None).shape[1]
    except sources.SkippedClip as e:
      reasons[e.reason] += 1
  raise ConversionError(f"no entry has a usable .pt file in {pt_dir} "
                        f"({_format_counts(reasons, sources.SKIP_REASONS[sources.PT])}); "
                        "nothing to convert")


def _format_counts(counts, reasons) -> str:
  return ", ".join(f"{counts[r]} {r}" for r in reasons if counts.get(r))


def _plan(entries, kind: str, root: Path, out_dir: Path, dtype: str, num_mel_bins: int,
          clips_per_shard: int) -> list[shard_writer.ShardTask]:
  tasks = []
  for shard, first in enumerate(range(0, len(entries), clips_per_shard)):
    chunk = tuple(entries[first:first + clips_per_shard])
    digest = hashlib.sha256(json.dumps(
        [kind, str(root), dtype, num_mel_bins, chunk]).encode()).hexdigest()
    tasks.append(shard_writer.ShardTask(shard, chunk, kind, str(root), str(out_dir), dtype,
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


def _build_manifest(converted, request, source, dtype, num_mel_bins, label_table):
  """Returns the manifest and the content of the index file: (shard, first frame, length) of
  every clip, int64."""
  stats, skipped, shard_rows, index = (0, 0.0, 0.0), [], [], []
  for shard in converted:
    clip_list = shard.clip_list
    stats = shard_writer.merge_stats(stats, (clip_list["stats"]["count"],
                                             clip_list["stats"]["mean"],
                                             clip_list["stats"]["m2"]))
    skipped += clip_list["skipped"]
    lengths = np.asarray(clip_list["clips"]["length"], np.int64)
    starts = np.cumsum(lengths) - lengths
    index.append(np.stack([np.full_like(lengths, clip_list["shard"]), starts, lengths], 1))
    shard_rows.append({"frames": shards.frames_name(clip_list["shard"]),
                       "clips": shards.clips_name(clip_list["shard"]),
                       "num_clips": len(lengths), "num_frames": clip_list["num_frames"],
                       "frames_bytes": clip_list["frames_bytes"],
                       "frames_sha256": clip_list["frames_sha256"],
                       "clips_bytes": shard.clips_bytes, "clips_sha256": shard.clips_sha256})
  reasons = collections.Counter(item["reason"] for item in skipped)
  clip_lists = [shard.clip_list for shard in converted]
  num_clips = sum(row["num_clips"] for row in shard_rows)
  index_data = shard_writer.npy_bytes(np.concatenate(index).astype(np.int64))
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
                 **{r: reasons.get(r, 0) for r in sources.SKIP_REASONS[source["kind"]]}},
      "skipped": skipped,
      "index_file": shards.INDEX_NAME,
      "index_bytes": len(index_data),
      "index_sha256": hashlib.sha256(index_data).hexdigest(),
      "shards": shard_rows,
      "labels": label_table,
      "labels_not_in_csv": _label_check(clip_lists, label_table),
  }
  return manifest, index_data


def _print_summary(manifest, clip_lists, out_dir, reused, seconds) -> None:
  counts = manifest["counts"]
  reasons = sources.SKIP_REASONS[manifest["source"]["kind"]]
  print(f"converted {counts['converted']:,} of {counts['entries']:,} clips into "
        f"{len(manifest['shards'])} shards in {out_dir} ({manifest['dtype']}, "
        f"{manifest['num_mel_bins']} mel bins, {manifest['num_frames']:,} frames)")
  if counts["skipped"]:
    print(f"skipped {counts['skipped']:,}: {_format_counts(counts, reasons)}")
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


def convert(json_path, pt_dir=None, out_dir=None, *, audio: bool = False, audio_root=None,
            workers: int = 2, dtype: str = "float16", label_csv=None, overwrite: bool = False,
            num_mel_bins: int | None = None, clips_per_shard: int = DEFAULT_CLIPS_PER_SHARD,
            verbose: bool = True, start_method: str = "spawn") -> dict:
  """Converts the clips listed in `json_path` into `out_dir` and returns the manifest.

  The features come from `pt_dir`'s `.pt` files, or with `audio=True` (and pt_dir None) are
  computed from the entries' audio files, relative paths taken from `audio_root` or else the
  JSON file's folder; F is then `num_mel_bins` or 128. Re-running on a finished output returns
  its manifest without work unless `overwrite`; an interrupted output is completed, reusing
  the shards already written. `verbose` shows a progress bar on stderr and a summary on
  stdout. Worker processes start with `start_method`: "fork" starts them fastest but is unsafe
  in a process that has started the JAX runtime (the CLI, which never does, uses it). Audio
  input is always converted in spawned workers, even for one, so that its features do not
  depend on this process's BLAS threads (`shard_writer.worker_pool`).
  Raises ConversionError for bad arguments or when no clip survives.
  """
  started = time.perf_counter()
  if out_dir is None:
    raise ConversionError("the output directory (--out) is required")
  json_path, out_dir = Path(json_path), Path(out_dir)
  entries = read_entries(json_path)
  kind, root = _resolve_source(json_path, pt_dir, audio, audio_root)
  if dtype not in shards.STORED_DTYPES:
    raise ConversionError(f"--dtype {dtype!r} is not one of {shards.STORED_DTYPES}")
  if workers < 1 or clips_per_shard < 1 or (num_mel_bins is not None and num_mel_bins < 1):
    raise ConversionError("--workers, --clips-per-shard and --num-mel-bins must be positive")
  if kind == sources.AUDIO and num_mel_bins is not None and num_mel_bins <= 3:
    raise ConversionError("--num-mel-bins must be above 3 for --audio (as in Kaldi)")
  label_table = read_label_csv(Path(label_csv)) if label_csv is not None else None
  root_key = "pt_dir" if kind == sources.PT else "audio_root"
  request = {"json_sha256": _sha256(json_path), "source_kind": kind, root_key: str(root),
             "dtype": dtype, "num_mel_bins": num_mel_bins, "clips_per_shard": clips_per_shard,
             "label_csv_sha256": _sha256(Path(label_csv)) if label_csv is not None else None}
  source = {"kind": kind, "json": str(json_path.resolve()), root_key: str(root),
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
    # Manifests written before audio input have no source_kind: they are .pt conversions.
    previous = {"source_kind": sources.PT, **existing.get("request", {})}
    if previous != request:
      changed = sorted(k for k in {*request, *previous} if previous.get(k) != request.get(k))
      raise ConversionError(f"{out_dir} already holds a conversion of other input or options "
                            f"({', '.join(changed)} differ); pass --overwrite to replace it")
    if verbose:
      print(f"{out_dir} is up to date ({existing['num_clips']:,} clips); nothing to do "
            "(pass --overwrite to rebuild)")
    return existing
  if num_mel_bins is not None:
    num_mel_bins_used = num_mel_bins
  elif kind == sources.AUDIO:
    num_mel_bins_used = sources.AUDIO_NUM_MEL_BINS
  else:
    num_mel_bins_used = _probe_num_mel_bins(entries, root)
  tasks = _plan(entries, kind, root, out_dir, dtype, num_mel_bins_used, clips_per_shard)
  _remove_unplanned(out_dir, len(tasks))
  converted = {task.shard: shard_writer.finished_shard(task) for task in tasks}
  todo = [task for task in tasks if converted[task.shard] is None]
  reused = len(tasks) - len(todo)
  if kind == sources.AUDIO:  # always in spawned workers: one BLAS thread (worker_pool)
    processes, start_method = min(workers, len(todo)), "spawn"
  else:
    processes = min(workers, len(todo)) if workers > 1 and len(todo) > 1 else 0
  # The pool starts before the progress bar's monitor thread so that forking is clean.
  with (shard_writer.worker_pool(processes, start_method) as pool,
        tqdm.tqdm(total=len(entries), unit="clip", desc="convert", file=sys.stderr,
                  disable=not verbose, smoothing=0.1) as bar):
    bar.update(len(entries) - sum(len(task.entries) for task in todo))
    run = pool.imap_unordered if pool is not None else map
    for shard in run(shard_writer.convert_shard, todo):
      converted[shard.clip_list["shard"]] = shard
      bar.update(len(shard.clip_list["clips"]["wav"]) + len(shard.clip_list["skipped"]))
  ordered = [converted[task.shard] for task in tasks]
  manifest, index_data = _build_manifest(ordered, request, source, dtype, num_mel_bins_used,
                                         label_table)
  if manifest["num_clips"] == 0:
    raise ConversionError(f"no clip of {json_path} survived conversion "
                          f"({_format_counts(manifest['counts'], sources.SKIP_REASONS[kind])})")
  shard_writer.write_atomically(out_dir / shards.INDEX_NAME, [index_data])
  shard_writer.write_atomically(manifest_path, [json.dumps(manifest, indent=1).encode()])
  if verbose:
    _print_summary(manifest, [shard.clip_list for shard in ordered], out_dir, reused,
                   time.perf_counter() - started)
  return manifest


def verify(shards_dir) -> str:
  """Checks every file of a finished output, content included (`shards.check_shards`), and
  returns the line that says what was verified; raises ManifestError naming the first bad
  file."""
  shards.check_shards(shards_dir, verify_content=True)
  manifest = shards.read_manifest(shards_dir)
  line = f"ok: {len(manifest['shards'])} shards, {manifest['num_clips']} clips verified"
  if "index_sha256" not in manifest:
    line += (" (sizes only: the manifest predates content hashes; rebuild with --overwrite "
             "to add them)")
  return line


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ssast_jax.data.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", type=Path, help="dataset JSON {'data': [...]}")
  parser.add_argument("--pt-dir", type=Path, help="folder of <stem>.pt files")
  parser.add_argument("--audio", action="store_true",
                      help="compute the features from the entries' audio files")
  parser.add_argument("--audio-root", type=Path,
                      help="folder relative audio paths start from (default: the JSON's)")
  parser.add_argument("--out", type=Path, help="output shard directory")
  parser.add_argument("--workers", type=int, default=2, help="parallel processes")
  parser.add_argument("--dtype", choices=shards.STORED_DTYPES, default="float16")
  parser.add_argument("--label-csv", type=Path, help="index,mid,display_name CSV")
  parser.add_argument("--num-mel-bins", type=int,
                      help="required F (default: .pt: F of the first good clip; audio: 128)")
  parser.add_argument("--clips-per-shard", type=int, default=DEFAULT_CLIPS_PER_SHARD)
  parser.add_argument("--overwrite", action="store_true", help="rebuild a finished output")
  parser.add_argument("--verify", type=Path, metavar="DIR",
                      help="check a converted directory's files, content included; exit 2 "
                      "if one is bad")
  args = parser.parse_args(argv)
  if args.verify is not None:
    if any(v is not None for v in (args.json, args.pt_dir, args.audio_root, args.out)) or (
        args.audio):
      raise SystemExit("error: --verify DIR takes no --json, --pt-dir, --audio or --out")
    try:
      print(verify(args.verify))
    except shards.ManifestError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    return
  if args.json is None or args.out is None:
    raise SystemExit("error: --json and --out are required (or --verify DIR)")
  try:
    convert(args.json, args.pt_dir, args.out, audio=args.audio, audio_root=args.audio_root,
            workers=args.workers, dtype=args.dtype, label_csv=args.label_csv,
            overwrite=args.overwrite, num_mel_bins=args.num_mel_bins,
            clips_per_shard=args.clips_per_shard, start_method="fork")
  except (ConversionError, shards.ManifestError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
