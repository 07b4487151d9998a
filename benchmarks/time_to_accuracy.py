"""Wall time against accuracy: sweep image size, width and epochs, 3 seeds a point, and mark the Pareto front.

Usage: `python benchmarks/time_to_accuracy.py [--seeds 3] [--only NAME ...] [--time] [--docs]`.
Every point is a real default `main.py` run with the point's flags (see generalisation.py, whose runner
this reuses: finished runs are read, not repeated). Metrics are re-scored at the validation-chosen
`sens=0.95` threshold from the runs' prediction CSVs, so runs made under another default policy
compare fairly. Writes time_to_accuracy.csv and front.png under --out (benchmarks/results/, ignored by
git); --docs also writes the plot to docs/time_to_accuracy.png for the README. --time adds a timing
pass: one run per point of the plain command a user types (`main.py --data ... <flags>`, seed 0, no
external set), one after another; those walls, not the sweep's, place the points. Wall times are only
comparable within one quiet machine: run nothing else meanwhile.
"""
import csv
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalisation as gen  # noqa: E402

GRID = {  # in the order they run: the likeliest candidates for a 2-minute default first
    "128 px, 25 ep": ["--image-size", "128", "--epochs", "25"],
    "96 px, 25 ep": ["--image-size", "96", "--epochs", "25"],
    "112 px, 20 ep": ["--image-size", "112", "--epochs", "20"],
    "96 px, 20 ep": ["--image-size", "96", "--epochs", "20"],
    "128 px, widths 16/32/64, 25 ep": ["--image-size", "128", "--epochs", "25", "--widths", "16", "32", "64"],
    "112 px, 25 ep": ["--image-size", "112", "--epochs", "25"],
    "128 px, 20 ep": ["--image-size", "128", "--epochs", "20"],
}
POLICY = "sens=0.95"
# issue 9's floor, on 3-seed means: (set, metric) -> minimum
TARGETS = {("ext", "auc"): 0.99, ("ext", "accuracy"): 0.95, ("ext", "sensitivity"): 0.95, ("ext", "specificity"): 0.90,
           ("test", "auc"): 0.99, ("test", "accuracy"): 0.96, ("test", "sensitivity"): 0.94, ("test",
                                                                                              "specificity"): 0.94}


def point(figs: list[dict]) -> dict:
    """Means and sds over seeds of wall time and every target metric at POLICY."""
    out = {"seeds": len(figs), "wall": statistics.median(f["wall"] for f in figs),
           "walls": [round(f["wall"]) for f in figs]}
    for (where, key) in TARGETS:
        values = [f[f"{POLICY}|{where} {key}"] for f in figs]
        out[f"{where} {key}"] = statistics.mean(values)
        out[f"{where} {key} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["meets"] = all(out[f"{w} {k}"] >= floor for (w, k), floor in TARGETS.items())
    return out


def timed_wall(args, name: str, flags: list[str]) -> float:
    """Wall seconds of one plain run of the point (read back when it was timed before)."""
    out = Path(args.out) / "timing" / gen.folder_name(name)
    record = out / "wall_seconds.txt"
    if not record.exists():
        if out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(gen.ROOT / "main.py"), "--data", args.data, "--out", str(out / "run"),
                        "--quiet", *flags], check=True, capture_output=True)
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{time.perf_counter() - start:.1f}\n")
        print(f"timed {name}: {record.read_text().strip()} s", flush=True)
    return float(record.read_text())


def pareto(points: dict[str, dict]) -> set[str]:
    """Names no other point beats on both wall time (lower) and half-A AUC (higher)."""
    return {n for n, p in points.items()
            if not any(q["wall"] <= p["wall"] and q["ext auc"] >= p["ext auc"] and q is not p
                       and (q["wall"] < p["wall"] or q["ext auc"] > p["ext auc"]) for q in points.values())}


def table(points: dict[str, dict], front: set[str]) -> list[list]:
    header = ["point", "front", "meets", "wall s", "sweep walls", "half-A AUC", "half-A acc", "half-A sens",
              "half-A spec", "test AUC", "test acc", "test sens", "test spec"]
    rows = [header]
    for name, p in sorted(points.items(), key=lambda kv: kv[1]["wall"]):
        rows.append([name, "*" if name in front else "", "yes" if p["meets"] else "no", f"{p['wall']:.0f}",
                     "/".join(map(str, p["walls"])),
                     *[f"{p[f'{w} {k}']:.3f}±{p[f'{w} {k} sd']:.3f}" for w in ("ext", "test")
                       for k in ("auc", "accuracy", "sensitivity", "specificity")]])
    return rows


def plot(points: dict[str, dict], front: set[str], path: Path) -> None:
    """Half-A AUC (with the Pareto front) and half-A specificity, the metric that binds, against wall time."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, floor in ((axes[0], "ext auc", TARGETS[("ext", "auc")]), (axes[1], "ext specificity", TARGETS[("ext",
                                                                                                                "specificity")])):
        for name, p in points.items():
            ax.errorbar(p["wall"], p[key], yerr=p[f"{key} sd"], fmt="*" if p["meets"] else "o",
                        ms=10 if p["meets"] else 6,
                        color="crimson" if name in front else "grey")
            ax.annotate(name, (p["wall"], p[key]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.axhline(floor, color="green", ls=":", lw=1, label=f"target {floor}")
        ax.set_xlabel("wall time of `main.py --data ...` with the point's flags, s (2 CPU cores)")
        ax.set_ylabel(f"official test half A: {key.split()[1]} (mean ± sd, 3 seeds)")
    line = sorted((points[n]["wall"], points[n]["ext auc"]) for n in front)
    axes[0].plot(*zip(*line), "--", color="crimson", lw=1, label="Pareto front (AUC vs time)")
    for ax in axes:
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Time to accuracy (real runs; stars meet every target of the generalisation issue; generated plot)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    docs, timing = "--docs" in argv, "--time" in argv
    argv = [a for a in argv if a not in ("--docs", "--time")]
    if not any(a.startswith("--out") for a in argv):
        argv += ["--out", str(gen.ROOT / "benchmarks" / "results" / "time_to_accuracy")]
    args = gen.parse_args(argv)
    names = args.only or list(GRID)
    results = gen.sweep(args, {n: GRID[n] for n in names})
    points = {n: point([f for f in figs if f]) for n, figs in results.items() if any(figs)}
    if timing:
        for name, p in points.items():
            p["sweep wall"], p["wall"] = p["wall"], timed_wall(args, name, GRID[name])
    front = pareto(points)
    rows = table(points, front)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    out = Path(args.out)
    with open(out / "time_to_accuracy.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    plot(points, front, out / "front.png")
    if docs:
        plot(points, front, gen.ROOT / "docs" / "time_to_accuracy.png")
    print(f"wrote {out / 'time_to_accuracy.csv'} and {out / 'front.png'}"
          + (" and docs/time_to_accuracy.png" if docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
