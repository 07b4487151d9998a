"""How fast the command line answers: `--help` of every command and a refused flag, wall time and peak memory.

Usage: `python benchmarks/cli_startup.py [--against COMMIT] [--repeats 5]`.
Runs this checkout's main.py and, with --against, the main.py of another commit (a git worktree under
benchmarks/results/), alternating the two so both see the same machine load; prints the median wall time and
peak resident memory of each case and their ratio.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"--help": ["--help"], "evaluate --help": ["evaluate", "--help"], "predict --help": ["predict", "--help"],
         "refused flag (--seed -5)": ["--seed", "-5"], "unknown sub-command": ["prdict", "x.png"]}


def measure(tree: Path, argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MB of `python main.py ARGV` run in `tree`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "main.py", *argv], cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux reports kilobytes


def worktree(commit: str) -> Path:
    """A checkout of `commit` to run the old main.py from."""
    tree = ROOT / "benchmarks" / "results" / f"cli-{commit}"
    if not (tree / "main.py").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
    return tree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default=None, help="a commit whose main.py is timed beside this checkout's")
    p.add_argument("--repeats", type=int, default=5, help="runs per case and checkout (the median is shown)")
    args = p.parse_args(argv)
    trees = {"this checkout": ROOT, **({args.against: worktree(args.against)} if args.against else {})}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{os.cpu_count()} cores of {cpu}; median of {args.repeats} runs each, the checkouts alternating")
    for case, words in CASES.items():
        runs = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                runs[name].append(measure(tree, words))
        cells = {name: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r))
                 for name, r in runs.items()}
        text = "; ".join(f"{name}: {w:.2f} s, {m:.0f} MB" for name, (w, m) in cells.items())
        if args.against:
            (new_w, new_m), (old_w, old_m) = cells["this checkout"], cells[args.against]
            text += f"; {old_w / new_w:.1f}x faster, {old_m / new_m:.1f}x less memory"
        print(f"{case:<26} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
