"""`difffeat store merge OUT STORE…`: stores written by independent jobs become one store, no array copied.

Jobs on several machines (``extract --shard-index i --num-shards n``, or whole `accelerate launch` runs
on separate file systems) each write a store of their part of the images. Merging makes one store equal
to what a single run over all images would have written, key for key:

- the configs must agree apart from the sharding fields (`SHARDING_FIELDS`); the merged store's
  config is the shared one without them, so its config hash is a one-job run's;
- every shard file is hard-linked into OUT under a renumbered rank (each source rank gets a new one, in
  the order the stores are given); a shard is never changed after it is written (a resumed run replaces
  a file, which leaves the link's other name alone), so sharing it is safe. Across file systems a hard
  link is impossible: ``symlink=True`` links by name instead (OUT then needs the sources to stay where
  they are), otherwise it is an error saying so;
- a key in two stores is an error naming the key and both stores; failure records are copied (they are
  appended to by a resumed run, so they are not shared); shard checksums are in the shard headers and so
  carried over as they are (``verify=True`` checks them first);
- a source still being written (its lock taken) is refused;
- the merge is atomic for readers: a record of it (``merge-unfinished.json``) is written before anything else and
  removed after the manifest, so no reader (`FeatureStore`, ``inspect --verify``, ``train-seg``) accepts a merge
  that was killed half-way, and ``--resume`` (the same stores) finishes it into what an uninterrupted merge makes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from difffeat.errors import UserError
from difffeat.spine.run import RunFolder

CROSS_DEVICE = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)


def _check_not_being_written(store: Path) -> None:
    from difffeat.utils.lock import FolderLock

    if not os.access(store, os.W_OK):  # a read-only store (an archive) is not being written, and cannot be locked
        return
    for lock in sorted(store.glob(".lock-r*")):
        # Taking and giving back the lock: a lock held by a running extract refuses, one left by a dead run is free.
        FolderLock(lock, f"the feature store {store}").acquire().release()


def _merged_config(stores: list[Path], manifests: list[dict]) -> dict:
    from difffeat.spine.run import differing_fields
    from difffeat.store.feature_store import SHARDING_FIELDS as sharding

    first = manifests[0]["config"]
    for store, manifest in zip(stores[1:], manifests[1:]):
        differ = differing_fields(first, manifest["config"], ignore=sharding)
        if differ:
            raise UserError(f"{store}: its config differs from {stores[0]}'s in {', '.join(differ)}; only "
                            f"{' and '.join(sharding)} may differ between stores that are merged")
    return {k: v for k, v in first.items() if k not in sharding}


def _shard_notes(manifests: list[dict]) -> list[str]:
    """Sharded jobs that are missing or given twice (not an error: a partial merge is allowed, but said)."""
    parts = [(m["config"].get("shard_index"), m["config"].get("num_shards")) for m in manifests]
    totals = {n for _, n in parts if n}
    if not totals:
        return []
    notes = []
    if len(totals) > 1:
        notes.append(f"the stores were made with different --num-shards: {sorted(totals)}")
    n = max(totals)
    have = {i for i, _ in parts if i is not None}
    missing = sorted(set(range(n)) - have)
    if missing:
        notes.append(f"shards {', '.join(map(str, missing))} of {n} are not among the merged stores")
    return notes


def _link(source: Path, target: Path, symlink: bool) -> str:
    try:
        os.link(source, target)
        return "hard"
    except OSError as e:
        if e.errno not in CROSS_DEVICE:
            raise UserError(f"{target}: cannot link {source} ({e.strerror or e})") from None
        if not symlink:
            raise UserError(f"{source}: cannot be hard-linked into {target.parent.parent} ({e.strerror or e}: another "
                            "file system?); put OUT on the sources' file system, or pass --symlink (OUT then needs "
                            "the source stores to stay where they are)") from None
    try:
        os.symlink(source.resolve(), target)
    except OSError as e:
        raise UserError(f"{target}: cannot link {source} ({e.strerror or e})") from None
    return "symbolic"


def _sources_report(store: Path) -> dict | None:
    from difffeat.spine.run import read_json

    file = store / "report.json"
    if not file.is_file():
        return None
    try:
        report = read_json(file, "report")
    except UserError:
        return None
    return report if isinstance(report, dict) else None


def _unfinished(out: Path) -> dict | None:
    """The record an unfinished merge left in `out` (what its manifest was going to be), None when there is none."""
    from difffeat.store.feature_store import MERGING

    try:
        saved = json.loads((out / MERGING).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


class _MergeFolder(RunFolder):
    """The merged store as a run folder (`difffeat.spine.run.RunFolder`'s rules): an unfinished merge counts as a store
    of the config its record names, so that ``resume`` finishes it (the same stores only) and ``overwrite`` replaces
    it."""

    def saved(self) -> dict | None:
        unfinished = _unfinished(self.path)
        return unfinished if unfinished is not None else super().saved()


def _clear_leftovers(out: Path) -> None:
    """A merge killed before its record was written leaves a folder holding only its lock file and temporary files:
    with the lock taken over (refused while a process holds it), those of processes that are gone are removed, so
    the folder is empty again. A folder holding anything else is left as it is."""
    from difffeat.utils.lock import FolderLock, pid_alive

    if not out.is_dir():
        return
    entries = list(out.iterdir())
    locks = [p for p in entries if p.name.startswith(".lock-r")]
    temp = {p: int(m[1]) for p in entries if p.name.startswith(".") and (m := re.search(r"\.tmp-(\d+)", p.name))}
    if not entries or len(locks) + len(temp) != len(entries):
        return
    held = []
    try:
        for lock in locks:
            held.append(FolderLock(lock, f"the feature store {out}").acquire())
        for p, pid in temp.items():
            if pid != os.getpid() and not pid_alive(pid):
                p.unlink(missing_ok=True)
    finally:
        for lock in held:
            lock.release()


def merge_stores(out: str | os.PathLike, stores: Sequence[str | os.PathLike], overwrite: bool = False,
                 symlink: bool = False, verify: bool = False, progress: bool = False, resume: bool = False) -> dict:
    """Merge `stores` into the new store `out` (see the module doc); returns what was done (also OUT/report.json).
    `progress` shows a bar over the source shards as their keys are read (and, with `verify`, their bytes).

    The merge is atomic for readers: its record (`difffeat.store.feature_store.MERGING`) is written before anything
    else and removed after the manifest, so a merge killed at any point is refused by every reader, and `resume` (the
    same stores) finishes it: the result equals an uninterrupted merge. `resume` on a finished merge of the same
    stores changes nothing."""
    from tqdm.auto import tqdm

    from difffeat.spine.run import is_inside, mkdir, read_json
    from difffeat.store.feature_store import (
        FORMAT,
        KIND,
        MANIFEST,
        MERGING,
        OWNED,
        SHARDS,
        check_shard,
        failure_files,
        failures_name,
        list_shards,
        read_manifest,
        shard_keys,
        shard_name,
    )
    from difffeat.utils.atomic import write_atomic, write_json_atomic
    from difffeat.utils.lock import FolderLock

    t0 = time.perf_counter()
    sources = [Path(s) for s in stores]
    if not sources:
        raise UserError("give at least one store to merge")
    out = Path(out)
    for s in sources:
        if is_inside(out, s) or is_inside(s, out):
            raise UserError(f"{out}: the merged store cannot be {s} or lie inside it (or the other way round)")
    if len({s.resolve() for s in sources}) < len(sources):
        raise UserError("the same store is given twice")
    manifests = [read_manifest(s) for s in sources]
    config = _merged_config(sources, manifests)
    for s in sources:
        _check_not_being_written(s)

    # Every key once: read from shard headers before anything is written.
    owner: dict[str, Path] = {}
    plan: list[tuple[Path, int, int, Path]] = []  # (source store, source rank, index, shard file)
    listed = [(store, shard) for store in sources for shard in list_shards(store)]
    for store, (rank, index, file) in tqdm(listed, desc="merge", unit="shard", disable=not progress):
        if verify and (why := check_shard(file)) is not None:
            raise UserError(f"{file}: {why}")
        for key in shard_keys(file):
            if key in owner:
                other = owner[key]
                where = f"both {other} and {store}" if other != store else f"two shards of {store}"
                raise UserError(f"key {key!r} is in {where}; stores to merge must hold disjoint images")
            owner[key] = store
        plan.append((store, rank, index, file))

    merged_from = [str(s.resolve()) for s in sources]
    _clear_leftovers(out)
    unfinished = _unfinished(out) if out.is_dir() else None
    if unfinished is not None and not (resume or overwrite):
        raise UserError(f"{out}: holds an unfinished store merge (it was interrupted); finish it (--resume, with the "
                        "same stores) or replace it (--overwrite)")
    folder = _MergeFolder(out, KIND, config, resume=resume, overwrite=overwrite, owned=OWNED, marker=MANIFEST,
                          ignore=(), format=FORMAT, extra={"merged_from": merged_from})
    if folder.continuing:
        if "merged_from" not in (folder.saved() or {}):
            raise UserError(f"{out}: holds a feature store that is not a merge; replace it (--overwrite) or choose "
                            "another folder")
        folder.check_saved(merged_from=merged_from)  # the same stores, in the same order
        if unfinished is None:  # finished already: nothing to do but let go of a lock a killed merge left
            for lock in out.glob(".lock-r*"):
                FolderLock(lock, f"the feature store {out}").acquire().release()
            return {**read_json(out / "report.json", "merge report"), "already_merged": True}

    new_rank: dict[tuple[Path, int], int] = {}
    for store in sources:  # every source rank with shards or failure records gets the next free rank
        ranks = sorted({r for s, r, _, _ in plan if s == store} | {r for r, _ in failure_files(store)})
        for r in ranks:
            new_rank[(store, r)] = len(new_rank)
    record = folder.marker_content()  # the manifest to be: written first as the record, last as the manifest
    existed = out.exists()
    mkdir(out)
    try:
        with FolderLock(out / ".lock-r000", f"the feature store {out}"):
            folder.remove_stale_temp_files()  # a killed merge's half-written files
            write_json_atomic(out / MERGING, record)  # from here on no reader takes the folder for a store
            try:
                folder.remove_owned()  # an old store being replaced, or what the unfinished merge had done
                kinds: set[str] = set()
                shards_dir = mkdir(out / SHARDS)
                for store, rank, index, file in plan:
                    kinds.add(_link(file, shards_dir / shard_name(new_rank[(store, rank)], index), symlink))
                for store in sources:
                    for rank, file in failure_files(store):
                        write_atomic(out / failures_name(new_rank[(store, rank)]), file.read_bytes())
                report = _report(sources, manifests, plan, owner, new_rank, kinds, t0)
                write_json_atomic(out / "report.json", report)
                write_json_atomic(out / MANIFEST, record)
                (out / MERGING).unlink()  # the store is whole
            except BaseException:
                folder.remove_owned()  # the store this merge began, then its record
                (out / MERGING).unlink(missing_ok=True)
                raise
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return report


def _report(sources: list[Path], manifests: list[dict], plan: list, owner: dict[str, Path],
            new_rank: dict[tuple[Path, int], int], kinds: set[str], t0: float) -> dict:
    """What the merge did (OUT/report.json), with the sources' own speed and memory."""
    reports = [_sources_report(s) for s in sources]
    seconds = [r.get("seconds") for r in reports if r and isinstance(r.get("seconds"), (int, float))]
    peaks = [r.get("peak_memory_bytes") for r in reports if r and isinstance(r.get("peak_memory_bytes"), int)]
    extracted = sum(r.get("extracted", 0) for r in reports if r)
    return {
        "merged_from": [{"store": str(s), "shards": sum(1 for p in plan if p[0] == s),
                         "images": sum(1 for k in owner.values() if k == s),
                         "ranks": {str(r): n for (src, r), n in new_rank.items() if src == s}} for s in sources],
        "images": len(owner),
        "links": sorted(kinds) or ["none"],
        "notes": _shard_notes(manifests),
        "extracted": extracted,
        "failed": [f for r in reports if r for f in r.get("failed", [])],
        # Jobs on separate machines run side by side: the merged rate is all images over the slowest job.
        "images_per_second": round(extracted / max(seconds), 3) if seconds and max(seconds) > 0 and extracted else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "merge_seconds": round(time.perf_counter() - t0, 3),
    }


# ----------------------------------------------------------------------------------------------- commands
def _cmd_merge(args) -> None:
    from difffeat.utils.progress import Stopwatch

    watch = Stopwatch()
    report = merge_stores(args.out, args.stores, overwrite=args.overwrite, symlink=args.symlink, verify=args.verify,
                          progress=not args.quiet, resume=args.resume)
    if report.get("already_merged"):
        print(f"store merge: {args.out} already holds this merge of {len(args.stores)} stores ({report['images']} "
              "images); nothing to do")
        return
    links = " and ".join(report["links"])
    for note in report["notes"]:
        print(f"  note: {note}")
    print(watch.finish_line(f"store merge: {len(args.stores)} stores ({report['images']} images) into {args.out} "
                            f"with {links} links, no array copied", count=report["images"], unit="images"))


def _cmd_parquet(args) -> None:
    from difffeat.store.feature_store import FeatureStore
    from difffeat.utils.progress import Stopwatch

    watch = Stopwatch()
    store = FeatureStore(args.store)
    files = store.to_parquet(args.out, shard_rows=args.shard_rows, progress=not args.quiet)
    print(watch.finish_line(f"store parquet: {len(store)} images in {len(files)} Parquet file(s) to {args.out} "
                            "(datasets.load_dataset('parquet', data_dir=...))", count=len(store), unit="images"))


def add_store_commands(sub) -> None:
    """`difffeat store merge` and `difffeat store parquet`."""
    store = sub.add_parser("store", help="whole-store operations").add_subparsers(dest="store_command", required=True)
    p = store.add_parser("merge", help="merge stores of independent jobs (--shard-index/--num-shards) into one, "
                                       "by hard links (no array copied)")
    p.add_argument("out", help="the merged store (a new or empty folder)")
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores to merge (their configs differ at most in "
                                                              "--shard-index and --num-shards)")
    p.add_argument("--symlink", action="store_true", help="link by name where a hard link is impossible (another "
                                                          "file system); OUT then needs the sources in place")
    p.add_argument("--verify", action="store_true", help="check every source shard against its checksum first")
    p.add_argument("--resume", action="store_true", help="finish an interrupted merge into OUT (the same stores)")
    p.add_argument("--overwrite", action="store_true", help="replace a store in OUT (its own files only)")
    p.set_defaults(func=_cmd_merge)
    p = store.add_parser("parquet", help="write a store as Parquet files for datasets.load_dataset / push_to_hub")
    p.add_argument("store")
    p.add_argument("out", help="a new or empty folder")
    p.add_argument("--shard-rows", type=int, help="images per file (default: about 256 MiB per file)")
    p.set_defaults(func=_cmd_parquet)
