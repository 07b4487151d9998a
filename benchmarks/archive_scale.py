"""Scoring a whole archive: peak memory and images/s of `predict` on 1,000 to 100,000 files, Ctrl-C and SIGKILL then
--resume, and torchrun shards against one process.

Usage:
  python benchmarks/archive_scale.py memory --checkpoint runs/X/best.pt [--sizes 1000 20000 100000]
                                            [--checkout new=. --checkout old=/tmp/wt_old]
      Builds flat archives of symlinks to the shared training films (cycled; outside the project, once), then runs
      `main.py predict ARCHIVE --quiet` from each checkout, one after the other: wall time, images/s and peak
      resident memory (GNU time's maximum RSS of the job's largest process).
  python benchmarks/archive_scale.py resume --checkpoint runs/X/best.pt [--files 20000] [--at 0.5]
      An uninterrupted run, then a run stopped by Ctrl-C (SIGINT) and one killed by SIGKILL when about `--at` of
      the files are scored, each continued with `predict --resume`: whether the final predictions.csv is
      byte-identical to the uninterrupted one, and the resume's wall time against the whole run's.
  python benchmarks/archive_scale.py shards --checkpoint runs/X/best.pt [--files 20000] [--procs 2]
      One process against `torchrun --nproc_per_node=N` (gloo on the CPU): identical CSV, and the wall-time ratio.
Name the CPU beside every figure; compare ratios measured in one run.
"""
import argparse
import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MB = 1 << 20


def build_archive(n: int, work: Path, shared: Path) -> Path:
    """A flat folder of n symlinks to the shared training films (cycled), built once."""
    folder = work / f"archive-{n}"
    if folder.is_dir() and len(os.listdir(folder)) == n:
        return folder
    sources = sorted(p for p in (shared / "chest_xray_224sq" / "train").rglob("*.jpeg"))
    if not sources:
        sys.exit(f"no training films under {shared}: pass --shared")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        os.symlink(sources[i % len(sources)], folder / f"film{i:06d}.jpeg")
    return folder


def predict_command(checkout: Path, archive: Path, checkpoint: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(checkout / "main.py"), "predict", str(archive), "--checkpoint", checkpoint,
            "--out", str(out), "--quiet", *extra]


def timed(command: list[str]) -> tuple[float, float]:
    """Run under GNU time: (wall seconds, peak RSS in MB of the job's largest process)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    return wall, peak


def memory(args) -> None:
    work = Path(args.work)
    checkouts = [c.split("=", 1) for c in args.checkout]
    print(f"{'checkout':>10} {'files':>8} {'wall s':>8} {'images/s':>9} {'peak RSS MB':>12}")
    for n in args.sizes:
        archive = build_archive(n, work, Path(args.shared))
        for name, checkout in checkouts:
            out = work / f"out-{name}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            wall, peak = timed(predict_command(Path(checkout).resolve(), archive, args.checkpoint, out))
            print(f"{name:>10} {n:>8} {wall:>8.1f} {n / wall:>9.1f} {peak:>12.0f}", flush=True)


def scored_rows(out: Path) -> int:
    """How many chunks of rows a running predict has finished (its part files)."""
    parts = out / ".parts"
    return sum(1 for _ in parts.glob("*.jsonl")) if parts.is_dir() else 0


def stop_midway(command: list[str], out: Path, chunks: int, sig: int) -> float:
    """Start `command`, send `sig` once `chunks` chunks are written; return the seconds it ran."""
    start = time.perf_counter()
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while job.poll() is None and scored_rows(out) < chunks:
        time.sleep(0.2)
    if job.poll() is not None:
        sys.exit("the run finished before it could be stopped: use more --files")
    os.killpg(job.pid, sig)  # the terminal's Ctrl-C reaches every process of the group, decode workers included
    job.wait()
    return time.perf_counter() - start


def resume(args) -> None:
    work = Path(args.work)
    archive = build_archive(args.files, work, Path(args.shared))
    whole = work / "resume-whole"
    shutil.rmtree(whole, ignore_errors=True)
    wall, _ = timed(predict_command(ROOT, archive, args.checkpoint, whole))
    chunks = int(args.at * args.files / 1024)
    print(f"uninterrupted: {args.files} files in {wall:.1f} s")
    for name, sig in (("Ctrl-C", signal.SIGINT), ("SIGKILL", signal.SIGKILL)):
        out = work / f"resume-{name}"
        shutil.rmtree(out, ignore_errors=True)
        ran = stop_midway(predict_command(ROOT, archive, args.checkpoint, out), out, chunks, sig)
        done = scored_rows(out)
        rest, _ = timed([sys.executable, str(ROOT / "main.py"), "predict", "--resume", str(out), "--quiet"])
        same = filecmp.cmp(whole / "predictions.csv", out / "predictions.csv", shallow=False)
        print(f"{name}: stopped after {ran:.1f} s with {done} chunks written; resume {rest:.1f} s "
              f"({rest / wall:.2f} of the whole); predictions.csv byte-identical: {same}; "
              f"INCOMPLETE left: {(out / 'INCOMPLETE').exists()}")


def shards(args) -> None:
    work = Path(args.work)
    archive = build_archive(args.files, work, Path(args.shared))
    one, many = work / "shards-1", work / f"shards-{args.procs}"
    for out in (one, many):
        shutil.rmtree(out, ignore_errors=True)
    wall1, peak1 = timed(predict_command(ROOT, archive, args.checkpoint, one))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}"]
    walln, peakn = timed([*torchrun, *predict_command(ROOT, archive, args.checkpoint, many)[1:]])
    same = filecmp.cmp(one / "predictions.csv", many / "predictions.csv", shallow=False)
    print(f"1 process: {wall1:.1f} s, peak {peak1:.0f} MB; {args.procs} processes: {walln:.1f} s, "
          f"peak {peakn:.0f} MB per process; wall ratio {walln / wall1:.2f}; predictions.csv identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["memory", "resume", "shards"])
    parser.add_argument("--checkpoint", required=True, help="a best.pt to score with")
    parser.add_argument("--shared", default=str(SHARED), help="the shared data folder (default: %(default)s)")
    parser.add_argument("--work", default="/tmp/pneumonia-archive", help="where the archives and outputs go")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000, 100000], help="memory: archive sizes")
    parser.add_argument("--checkout", action="append", default=None,
                        help="memory: NAME=DIR, a checkout to run main.py from (repeatable; default new=.)")
    parser.add_argument("--files", type=int, default=20000, help="resume, shards: archive size")
    parser.add_argument("--at", type=float, default=0.5, help="resume: share of the files scored before the stop")
    parser.add_argument("--procs", type=int, default=2, help="shards: torchrun processes")
    args = parser.parse_args()
    args.checkout = args.checkout or [f"new={ROOT}"]
    {"memory": memory, "resume": resume, "shards": shards}[args.step](args)


if __name__ == "__main__":
    main()
