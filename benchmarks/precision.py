"""fp32 against bf16 autocast (and torch.compile) on this CPU, side by side in one run.

Usage: `python benchmarks/precision.py [--steps 40]`. Prints the CPU model and its bf16 flags, then:
1. training steps of the default model (batch 32, 128 px, augmentation included) in fp32 and bf16,
   in alternating blocks so that both see the same machine load, as a ratio; then whole epochs
   through `train.train_one_epoch` (3,636 images, the default run's training split), alternating;
2. what `--precision auto` chose here and what its probe cost;
3. torch.compile: its compile time, and its step time against eager, so whether it repays itself
   within a default run (25 epochs of 114 steps);
4. predict on ../shared/data/chest_xray_fullres_train: decoding against scoring, fp32 against bf16.
Timings vary with the machine and its load: read the ratios.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from lib import infer  # noqa: E402
from lib import precision  # noqa: E402
import train  # noqa: E402
from app.settings import optimiser_defaults  # noqa: E402
from model import PneumoniaCNN  # noqa: E402
from lib.transforms import Preprocess  # noqa: E402

SHARED = Path(os.environ.get("PNEUMONIA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of the flags that matter for bf16 it has."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return name, [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16") if f in flags]


def default_parts(dtype, steps_per_epoch: int, compiled: bool = False) -> train.Parts:
    """The default model with its training recipe (SGD with OneCycle, pos_weight 0.6, 128 px preprocessing), stepping
    at autocast `dtype`: one setup for the step and the epoch timings."""
    torch.manual_seed(0)
    model = PneumoniaCNN().to(memory_format=torch.channels_last)
    optimizer, scheduler = train.make_optimizer(model, 0.05, 25, steps_per_epoch, **optimiser_defaults())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6))
    return train.Parts(torch.compile(model) if compiled else model, optimizer, scheduler, loss_fn, loss_fn,
                       Preprocess(128, 0.5, 0.25), torch.device("cpu"), torch.Generator().manual_seed(0),
                       autocast=dtype)


def stepper(dtype, compiled: bool = False):
    """One training step of the default model on a fixed augmented batch, at autocast `dtype`."""
    p = default_parts(dtype, 114, compiled)
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 1, 141, 141), np.uint8))
    y = (torch.arange(32) % 2).float()

    def step():
        x = p.prep.train(batch, p.generator).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = p.loss_fn(p.model(x).float(), y)
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        p.optimizer.step()
    return step


def epoch(dtype, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds for one whole training epoch of the default model through train.train_one_epoch at autocast `dtype`."""
    parts = default_parts(dtype, (len(images) + 31) // 32)
    start = time.perf_counter()
    train.train_one_epoch(parts, images, labels, 32, train.TrainState())
    return time.perf_counter() - start


def timed(step, n: int) -> float:
    """Seconds per step over n steps."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed training steps per precision and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--epoch-rounds", type=int, default=2, help="alternating rounds of whole epochs (0: skip)")
    args = p.parse_args(argv)
    name, flags = cpu()
    print(f"CPU: {name}; bf16-related flags: {', '.join(flags) or 'none'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    steps = {"fp32": stepper(None), "bf16": stepper(torch.bfloat16)}
    for s in steps.values():
        timed(s, 3)  # warm-up: kernel selection
    results = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, s in steps.items():
            results[k].append(timed(s, args.steps))
    fp32, bf16 = (statistics.median(results[k]) * 1000 for k in ("fp32", "bf16"))
    print(f"1. training step, batch 32 at 128 px: fp32 {fp32:.1f} ms, bf16 {bf16:.1f} ms: bf16/fp32 = "
          f"{bf16 / fp32:.2f}x (an epoch of 114 steps: {fp32 * 114 / 1000:.1f} s against {bf16 * 114 / 1000:.1f} s)")
    if args.epoch_rounds:
        # random pixels stand in for films: the arithmetic of an epoch does not depend on what the pixels show
        images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3636, 1, 141, 141), np.uint8))
        labels = (torch.arange(3636) % 4 != 0).float()  # about the training split's 3:1 pneumonia:normal
        whole = {"fp32": [], "bf16": []}
        for _ in range(args.epoch_rounds):
            for k, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                whole[k].append(epoch(dtype, images, labels))
        fp32_e, bf16_e = (statistics.median(whole[k]) for k in ("fp32", "bf16"))
        print(f"1b. whole training epochs (3,636 images, {args.epoch_rounds} alternating rounds): fp32 "
              f"{'/'.join(f'{t:.1f}' for t in whole['fp32'])} s, bf16 {'/'.join(f'{t:.1f}' for t in whole['bf16'])} s: "
              f"bf16/fp32 = {bf16_e / fp32_e:.2f}x")
    start = time.perf_counter()
    choice = precision.resolve("auto", torch.device("cpu"), PneumoniaCNN, 128, 32)
    print(f"2. --precision auto chose {choice.name} after a probe of {time.perf_counter() - start:.1f} s: "
          f"{choice.reason}")
    compiled = stepper(None, compiled=True)
    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    eager, fast = timed(steps["fp32"], args.steps), timed(compiled, args.steps)
    saved = (eager - fast) * 25 * 114
    print(f"3. torch.compile: {compile_s:.1f} s to compile, then {fast * 1000:.1f} ms a step against "
          f"{eager * 1000:.1f} ms "
          f"eager: over a default run's 2,850 steps it {'saves' if saved > compile_s else 'costs'} "
          f"{abs(saved - compile_s):.0f} s")
    folder = SHARED / "chest_xray_fullres_train"
    if folder.is_dir():
        files = data.find_labelled(str(folder)).paths
        torch.manual_seed(0)
        for name_, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            predictor = infer.Predictor([PneumoniaCNN().eval()], Preprocess(128, 0.5, 0.25), torch.device("cpu"),
                                        batch_size=64, autocast=dtype)
            start = time.perf_counter()
            images, _, _ = predictor.decode(files, show=False)
            decode = time.perf_counter() - start
            predictor.predict(torch.from_numpy(images[:8]).unsqueeze(1))  # warm-up
            start = time.perf_counter()
            predictor.predict(torch.from_numpy(images).unsqueeze(1))
            score = time.perf_counter() - start
            print(f"4. predict, {len(files)} full-resolution files, {name_}: decoding {decode:.2f} s, scoring "
                  f"{score:.2f} s "
                  f"({len(files) / (decode + score):.0f} images/s; scoring is {score / (decode + score):.0%} of it)")
    else:
        print(f"4. skipped: {folder} not present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
