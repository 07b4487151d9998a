"""Scale-out figures: memory and wall time of 1 against 2 processes, and a 100,000-image simulation.

Usage:
  python benchmarks/scale_out.py memory [--shared ../shared/data]
      The default real run (main.py --data chest_xray_224sq --external official_test_a_224sq) in one
      process, then under `torchrun --nproc_per_node=2`, one after the other on a warm decode cache:
      wall time, peak resident (RSS) and proportional (PSS: shared pages split between the processes
      that map them) memory per rank and for the whole job, and the test metrics side by side.
  python benchmarks/scale_out.py simulate [--images 100000] [--root /tmp/pneumonia-synthetic]
      Writes a synthetic archive of demo phantoms as JPEG (once, outside the project), then times
      discovery, hashing and the first decode into a fresh cache, measures the cache on disk, and runs
      `main.py --epochs 1` on it, sampling its memory: peak RSS during the epoch against the size of the
      decoded dataset.
Memory is sampled every 0.5 s from /proc/<pid>/smaps_rollup of every process of the job (Linux only).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import cache  # noqa: E402
import data  # noqa: E402
from lib import demo  # noqa: E402
from lib import runs  # noqa: E402
from lib.images import cache_size  # noqa: E402
from app.settings import default_cache_dir  # noqa: E402

MB = 1 << 20


# ---------------------------------------------------------------- sampling a job's memory
def _children() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _tree(root: int, parents: dict[int, int]) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += [p for p, pp in parents.items() if pp == pid]
    return pids


def _memory(pid: int) -> dict[str, int] | None:
    """Rss, Pss and Anonymous of one process, in bytes (None once it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines[1:])
    return {k: int(fields[k].split()[0]) * 1024 for k in ("Rss", "Pss", "Anonymous")}


def _role(pid: int, root: int, parents: dict[int, int], torchrun: bool) -> str:
    """'rank N' for a training process, 'rank N helper' for its decode workers, 'torchrun agent' for torchrun."""
    if pid == root:
        return "torchrun agent" if torchrun else "rank 0"
    try:
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    except OSError:
        return "gone"
    if "RANK" not in env:
        return "rank 0 helper"
    return f"rank {env['RANK']}" + (" helper" if parents.get(pid) != root else "")


class Sampler(threading.Thread):
    """Samples every process of a job until stopped: per role peak RSS and PSS, and the job's peak sums."""

    def __init__(self, root: int, torchrun: bool, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.torchrun, self.interval, self.done = root, torchrun, interval, threading.Event()
        self.samples: list[tuple[float, dict[str, dict[str, int]]]] = []

    def run(self):
        roles: dict[int, str] = {}
        while not self.done.is_set():
            parents = _children()
            now = {}
            for pid in _tree(self.root, parents):
                mem = _memory(pid)
                if mem is None:
                    continue
                role = roles.setdefault(pid, _role(pid, self.root, parents, self.torchrun))
                total = now.setdefault(role, {"Rss": 0, "Pss": 0, "Anonymous": 0})
                for k, v in mem.items():
                    total[k] += v
            self.samples.append((time.perf_counter(), now))
            time.sleep(self.interval)

    def peaks(self, since: float = 0.0, until: float = float("inf")) -> dict:
        """Per role the peak of each figure (MB), and the job's peak total RSS and PSS, between two times."""
        out: dict[str, dict[str, float]] = {}
        job, ranks = {"Rss": 0, "Pss": 0}, {"Rss": 0, "Pss": 0}
        for t, now in self.samples:
            if not since <= t <= until:
                continue
            for role, mem in now.items():
                peak = out.setdefault(role, {"Rss": 0, "Pss": 0, "Anonymous": 0})
                for k, v in mem.items():
                    peak[k] = max(peak[k], v / MB)
            for k in job:
                job[k] = max(job[k], sum(m[k] for m in now.values()) / MB)
                ranks[k] = max(ranks[k], sum(m[k] for r, m in now.items() if r != "torchrun agent") / MB)
        return {"per_role": out, "job": job, "ranks": ranks}


def run_sampled(cmd: list[str], log: Path, marker: str = "model:", env: dict | None = None) -> dict:
    """Run `cmd`, sampling its memory; returns wall seconds, exit code, the time `marker` was printed, the sampler."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})  # lines as they are printed
    sampler = Sampler(proc.pid, torchrun="torch.distributed.run" in cmd)
    sampler.start()
    marked = None
    with open(log, "w") as f:
        for line in proc.stdout:
            f.write(line)
            if marked is None and line.startswith(marker):
                marked = time.perf_counter()
    proc.wait()
    sampler.done.set()
    sampler.join()
    return {"wall": time.perf_counter() - started, "rc": proc.returncode, "marked": marked, "sampler": sampler}


def _roles_text(peaks: dict) -> str:
    rows = [f"    {role:<18} peak RSS {m['Rss']:7.0f} MB  PSS {m['Pss']:7.0f} MB  anonymous {m['Anonymous']:7.0f} MB"
            for role, m in sorted(peaks["per_role"].items()) if role != "gone"]
    rows.append(f"    {'all ranks':<18} peak RSS {peaks['ranks']['Rss']:7.0f} MB  PSS {peaks['ranks']['Pss']:7.0f} MB "
                f"(sums over the training processes and their helpers at one moment)")
    rows.append(f"    {'whole job':<18} peak RSS {peaks['job']['Rss']:7.0f} MB  PSS {peaks['job']['Pss']:7.0f} MB "
                f"(the same, with the torchrun agent)")
    return "\n".join(rows)


# ---------------------------------------------------------------- memory: 1 against 2 processes
def memory(args) -> None:
    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dir, external = shared / "chest_xray_224sq", shared / "official_test_a_224sq"
    size = cache_size(128)
    for folder in (train_dir, external):  # warm the decode cache, so that neither run pays for the first decode
        data.decode_found(data.find_labelled(str(folder)), cache.ImageCache(default_cache_dir(), size), progress=False)
    common = ["--data", str(train_dir), "--external", str(external), "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    results = {}
    for name, launcher in (("1 process", [sys.executable]), ("2 processes", torchrun)):
        run_dir = out / name.replace(" ", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        got = run_sampled([*launcher, "main.py", *common, "--out", str(run_dir)], out / f"{run_dir.name}.log")
        assert got["rc"] == 0, (out / f"{run_dir.name}.log").read_text()[-3000:]
        results[name] = (got, runs.read_metrics(run_dir / "metrics.json"))
    print(f"default real run, {os.cpu_count()} CPU cores, warm decode cache ({train_dir.name}, external "
          f"{external.name})")
    for name, (got, metrics) in results.items():
        t, a = (metrics["sets"][name]["rates"] for name in ("test split", external.name))
        print(f"  {name}: {got['wall']:.0f} s wall; test AUC {t['auc']:.4f} accuracy {t['accuracy']:.4f} "
              f"sensitivity {t['sensitivity']:.4f} specificity {t['specificity']:.4f}; half A AUC {a['auc']:.4f} "
              f"specificity {a['specificity']:.4f}")
        print(_roles_text(got["sampler"].peaks()))
    one, two = (results[k][0]["sampler"].peaks() for k in ("1 process", "2 processes"))
    print("  2 processes / 1 process: wall "
          f"{results['2 processes'][0]['wall'] / results['1 process'][0]['wall']:.2f}x; "
          f"peak PSS of the ranks {two['ranks']['Pss'] / one['ranks']['Pss']:.2f}x, of the whole job "
          f"{two['job']['Pss'] / one['job']['Pss']:.2f}x; peak RSS of the ranks "
          f"{two['ranks']['Rss'] / one['ranks']['Rss']:.2f}x")


# ---------------------------------------------------------------- simulate: a 100,000-image archive
def _write_patients(job: tuple[str, str, int, int, int]) -> int:
    """Write the phantoms of patients [first, last) of one class; returns the number of files."""
    root, label, first, last, per_patient = job
    folder = Path(root, "chest_xray", "train", label)
    rng = np.random.default_rng((0 if label == "NORMAL" else 1) * 10**7 + first)  # the same archive every time
    written = 0
    for p in range(first, last):
        look = np.random.default_rng(rng.integers(2**32))
        for k in range(1, per_patient + 1):
            img, lungs = demo._anatomy(rng, np.random.default_rng(look.integers(2**32)))
            if label == "PNEUMONIA":
                img = img + 0.45 * demo._opacities(rng, lungs)
                name = f"person{p}_{'bacteria' if p % 3 else 'virus'}_{p * 10 + k}.jpeg"
            else:
                name = f"IM-{p:06d}-{k:04d}.jpeg"
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / name, quality=90)
            written += 1
    return written


def make_archive(root: Path, images: int, per_patient: int = 3) -> float:
    """A Kaggle-like archive of `images` phantom JPEGs (half per class), written once; returns the seconds it took."""
    marker = root / f"COMPLETE-{images}"
    if marker.exists():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    patients = -(-images // (2 * per_patient))
    jobs = []
    for label in ("NORMAL", "PNEUMONIA"):
        (root / "chest_xray" / "train" / label).mkdir(parents=True)
        jobs += [(str(root), label, a, min(a + 500, patients + 1), per_patient) for a in range(1, patients + 1, 500)]
    with ProcessPoolExecutor() as pool:
        written = sum(pool.map(_write_patients, jobs))
    marker.write_text(f"{written} synthetic phantom JPEGs written by benchmarks/scale_out.py\n")
    return time.perf_counter() - started


def simulate(args) -> None:
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wrote = make_archive(root, args.images)
    cache_dir = root.parent / (root.name + "-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    size = cache_size(args.image_size)
    store = cache.ImageCache(str(cache_dir), size)
    t0 = time.perf_counter()
    found = data.find_images(str(root))
    t1 = time.perf_counter()
    data.deduplicate(found, store)
    t2 = time.perf_counter()
    decoded, errors = cache.load_images(found.paths, size, store, show=False)
    t3 = time.perf_counter()
    del decoded
    again, _ = cache.load_images(found.paths, size, cache.ImageCache(str(cache_dir), size), show=False)
    t4 = time.perf_counter()
    n = len(found.paths)
    on_disk = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    archive = sum(p.stat().st_size for p in root.rglob("*.jpeg"))
    decoded_bytes = n * size * size
    print(f"synthetic archive: {n:,} phantom JPEGs, {archive / MB:,.0f} MB ({root}; written in {wrote:.0f} s"
          f"{'' if wrote else ', reused'}), {os.cpu_count()} CPU cores")
    print(f"  discovery     {t1 - t0:7.1f} s  {n / (t1 - t0):9,.0f} files/s")
    print(f"  hashing       {t2 - t1:7.1f} s  {n / (t2 - t1):9,.0f} files/s  (content hashes, for de-duplication)")
    failed = sum(e is not None for e in errors)
    print(f"  first decode  {t3 - t2:7.1f} s  {n / (t3 - t2):9,.0f} images/s  ({failed} failed)")
    print(f"  warm load     {t4 - t3:7.1f} s  {n / (t4 - t3):9,.0f} images/s  (every row's CRC checked, then mapped)")
    print(f"  cache on disk {on_disk / MB:7.0f} MB  (decoded dataset {decoded_bytes / MB:,.0f} MB: {n:,} x {size} x "
          f"{size} uint8)")
    run_dir = out / "simulate_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    got = run_sampled([sys.executable, "main.py", "--data", str(root), "--epochs", "1", "--image-size",
                       str(args.image_size), "--cache-dir", str(cache_dir), "--quiet", "--out", str(run_dir)],
                      out / "simulate_run.log")
    assert got["rc"] == 0, (out / "simulate_run.log").read_text()[-3000:]
    timing = json.loads((run_dir / "timing.json").read_text())
    epoch_end = got["marked"] + float(np.genfromtxt(run_dir / "history.csv", delimiter=",", names=True)["seconds"])
    epoch = got["sampler"].peaks(got["marked"], epoch_end)
    whole = got["sampler"].peaks()
    print(f"  main.py --epochs 1: {got['wall']:.0f} s wall ({timing['seconds_since_data_loaded']:.0f} s after data "
          f"load; the epoch {epoch_end - got['marked']:.0f} s)")
    print("  during the epoch:\n" + _roles_text(epoch))
    print("  the whole run (discovery to report):\n" + _roles_text(whole))
    peak = epoch["per_role"]["rank 0"]["Rss"]
    print(f"  peak RSS during the epoch / decoded dataset: {peak:.0f} / {decoded_bytes / MB:.0f} MB = "
          f"{peak * MB / decoded_bytes:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory", help="1 against 2 processes on the real data")
    m.add_argument("--shared", default=os.environ.get("PNEUMONIA_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    s = sub.add_parser("simulate", help="a synthetic archive of --images phantoms")
    s.add_argument("--images", type=int, default=100_000)
    s.add_argument("--root", default="/tmp/pneumonia-synthetic", help="where the synthetic archive is written (kept)")
    s.add_argument("--image-size", type=int, default=128)
    for q in (m, s):
        q.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_out"))
    args = p.parse_args()
    memory(args) if args.what == "memory" else simulate(args)


if __name__ == "__main__":
    main()
