"""Peak memory of a 1 mm participant run against --mem-gb and the per-node estimates.

One whole-head 1 mm T1w (fs-training sub-01, 256³) is segmented through the ``dlf-bids`` command
with a brain-cropped 1 mm atlas library, under ``--nprocs`` and ``--mem-gb``. The resident memory
of the whole process tree (the command and its MultiProc workers) is sampled from /proc every
0.2 s. Printed: the peak of the tree (what a scheduler's memory limit sees) against ``--mem-gb``,
and the peak of the largest single process against the largest per-node estimate of
``dlf_bids.resources`` (each worker runs one node: maxtasksperchild=1).

    python benchmarks/participant_memory.py --out bench-out/memory --mem-gb 6 --nprocs 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fs_training_bids_run import ATLASES, SHARED, make_bids, make_library  # noqa: E402  (sibling script)

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def run_sampled(cmd: list[str], log: Path):
    """Run ``cmd``; return (exit code, wall s, peak tree RSS, {pid: (peak RSS, first s, last s)}).

    Each MultiProc worker runs one node (maxtasksperchild=1), so a worker's lifetime, matched
    with the progress lines of the log, tells which node its peak belongs to."""
    peak_tree, procs = 0, {}
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            now = time.time() - t0
            sizes = {pid: rss_bytes(pid) for pid in tree(proc.pid)}
            peak_tree = max(peak_tree, sum(sizes.values()))
            for pid, size in sizes.items():
                peak, first, _ = procs.get(pid, (0, now, now))
                procs[pid] = (max(peak, size), first, now)
            time.sleep(0.2)
    return proc.returncode, time.time() - t0, peak_tree, procs


def main(argv=None) -> int:
    from dlf_bids.resources import plan_memory
    from dlf_bids.utils.atlas_library import load_atlas_library

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    parser.add_argument("--mem-gb", type=float, default=6.0)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--atlases", type=int, default=2, help="atlases from fs-training (max 3)")
    parser.add_argument("--fusion", nargs="+", default=["mv", "jlf"])
    parser.add_argument("--preset", default="fast")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"no {SHARED}: nothing to run", file=sys.stderr)
        return 66
    out = args.out.absolute()
    bids = make_bids(out)
    library_dir = make_library(out / f"atlases-{args.atlases}", ATLASES[: args.atlases])
    library = load_atlas_library(library_dir)
    t1w = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    plan = plan_memory(t1w, [a.t1w for a in library.atlases], args.fusion,
                       len(library.labels.indices))
    tag = f"n{args.nprocs}-m{args.mem_gb:g}-{'-'.join(args.fusion)}"
    cmd = [str(Path(sys.executable).parent / "dlf-bids"), str(bids), str(out / f"deriv-{tag}"),
           "participant", "--participant-label", "01", "--atlas-dir", str(library_dir),
           "--fusion", *args.fusion, "--registration-preset", args.preset,
           "--nprocs", str(args.nprocs), "--mem-gb", str(args.mem_gb),
           "--skip-bids-validation", "-w", str(out / f"work-{tag}")]
    code, wall, peak_tree, procs = run_sampled(cmd, out / f"run-{tag}.log")
    peak_one = max(p[0] for p in procs.values())
    gib = 2**30
    node, largest = plan.largest
    print(f"sub-01 T1w 256³ 1 mm, {len(library.atlases)} atlases ({args.preset}), "
          f"fusion {' '.join(args.fusion)}, --nprocs {args.nprocs} --mem-gb {args.mem_gb:g}: "
          f"exit {code}, {wall:.0f} s wall (log: {out / f'run-{tag}.log'})")
    print("estimates (GB): registration {:.2f}; {}".format(
        plan.registration, "; ".join(f"{m} {gb:.2f}" for m, gb in plan.fusion.items())))
    print("processes over 200 MB (peak GB, alive from-to s after start; match with the log):")
    for pid, (peak, first, last) in sorted(procs.items(), key=lambda kv: kv[1][1]):
        if peak > 2e8:
            print(f"  pid {pid}: {peak / 1e9:.2f} GB, {first:.0f}-{last:.0f} s")
    print(f"| peak RSS, whole tree | --mem-gb | tree / limit | peak RSS, largest process | "
          f"largest estimate ({node}) | process / estimate |")
    print(f"| {peak_tree / gib:.2f} GiB ({peak_tree / 1e9:.2f} GB) | {args.mem_gb:g} GB | "
          f"{peak_tree / 1e9 / args.mem_gb:.2f} | {peak_one / gib:.2f} GiB ({peak_one / 1e9:.2f} GB) "
          f"| {largest:.2f} GB | {peak_one / 1e9 / largest:.2f} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
