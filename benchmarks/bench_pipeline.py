"""Measure the data pipeline side by side, on real X-rays from ../shared/data, and print ratios.

Usage: `python benchmarks/bench_pipeline.py [--replicate 16] [--shared ../shared/data]`.
Every figure in one table comes from this one run on this machine: compare ratios, not seconds.
"""
import argparse
import contextlib
import io
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from lib import cache  # noqa: E402
from lib import images  # noqa: E402
from lib import infer  # noqa: E402
from lib import runs  # noqa: E402
from lib import transforms  # noqa: E402
import train  # noqa: E402
from app.settings import optimiser_defaults  # noqa: E402
from model import PneumoniaCNN  # noqa: E402

IMAGE_SIZE = 128  # the default model input


def best_of(fn, repeats: int = 2) -> float:
    """Fastest wall time of `repeats` calls (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_decode(paths: list[str]) -> dict:
    """Ours against two naive decodes: full-size grayscale + resize, and ImageFolder's RGB loader + resize.

    Also times the cheapest decode libjpeg offers (1/8 scale, no resize): Huffman decoding, which
    DCT-domain scaling cannot skip, is most of a full decode, so this bounds what any draft-based
    decoder can gain over the naive one.
    """
    from PIL import Image
    from torchvision.datasets.folder import pil_loader
    size = images.cache_size(IMAGE_SIZE)

    def minimal(p):
        with Image.open(p) as img:
            img.draft("L", (size, size))
            img.load()

    times = {
        "naive_gray": best_of(lambda: [images.decode_naive(p, size) for p in paths]),
        "naive_rgb": best_of(lambda: [pil_loader(p).resize((size, size), Image.BILINEAR) for p in paths]),
        "minimal": best_of(lambda: [minimal(p) for p in paths]),
        "ours": best_of(lambda: [images.decode_image(p, size) for p in paths]),
    }
    return {k: 1000 * v / len(paths) for k, v in times.items()}


def replicated_archive(src: Path, copies: int, tmp: Path) -> Path:
    """An ImageFolder tree with each full-resolution file linked `copies` times (distinct names)."""
    root = tmp / "replicated"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for f in sorted((src / label).glob("*.jpeg")):
            for k in range(copies):
                os.symlink(f, root / label / f"{f.stem}_copy{k}.jpeg")
    return root


def baseline_epoch(root: Path) -> tuple[float, int]:
    """The original project's way: ImageFolder, RGB PIL transforms every epoch, 2 DataLoader workers."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.RandomRotation(15),
                             transforms.CenterCrop(IMAGE_SIZE), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.25] * 3)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=2)
    model = PneumoniaCNN(in_channels=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6))
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = loss_fn(model(x), y.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, len(ds)


def our_epoch(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """One epoch of our training step on cached uint8 tensors, with the time spent in the data side."""
    train.set_seed(0)
    model = PneumoniaCNN().to(memory_format=torch.channels_last)
    prep = transforms.Preprocess(IMAGE_SIZE, 0.5, 0.25)
    optimizer, scheduler = train.make_optimizer(model, 0.05, 1, math.ceil(len(images) / 32), **optimiser_defaults())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6))
    g = torch.Generator().manual_seed(0)
    data_time = 0.0
    start = time.perf_counter()
    for idx in train.batches(len(images), 32, g):
        t0 = time.perf_counter()
        x = prep.train(images[idx], g).contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        data_time += time.perf_counter() - t0
        _step(model, optimizer, loss_fn, x, y)
        scheduler.step()
    total = time.perf_counter() - start
    return {"seconds": total, "data_share": data_time / total}


def _step(model, optimizer, loss_fn, x, y) -> None:
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_memory_format(images: torch.Tensor, labels: torch.Tensor, steps: int = 15) -> dict:
    """Training-step time with channels_last against the default layout, same batches."""
    prep = transforms.Preprocess(IMAGE_SIZE, 0.5, 0.25)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6))
    result = {}
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        torch.manual_seed(0)
        model = PneumoniaCNN().to(memory_format=fmt)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        x_all = [prep.train(images[i * 32:(i + 1) * 32], g).contiguous(memory_format=fmt) for i in range(steps + 3)]

        for i in range(3):  # warm-up: first calls pick kernels
            _step(model, optimizer, loss_fn, x_all[i], labels[i * 32:(i + 1) * 32])
        start = time.perf_counter()
        for i in range(3, steps + 3):
            _step(model, optimizer, loss_fn, x_all[i], labels[i * 32:(i + 1) * 32])
        result[name] = (time.perf_counter() - start) / steps
    return result


def bench_startup(src: Path, tmp: Path) -> dict:
    """First run (decode into an empty cache) against the second run (cache hit), via load_dataset."""
    cache = tmp / "cache"
    load = lambda: data.load_dataset(str(src), IMAGE_SIZE, "random", 0, str(cache), progress=False)  # noqa: E731
    first = best_of(lambda: (shutil.rmtree(cache, ignore_errors=True), load()), repeats=1)
    second = best_of(load, repeats=3)
    return {"first": first, "second": second, "ratio": second / first}


def bench_predict(folders: list[Path], tmp: Path) -> dict:
    """Predict's decode-and-score work (images per second) on full-resolution files: the first build's
    worker rule (one decode worker per 32 files, at most one per core) against today's (every core,
    at least 8 files per worker), on the NORMAL folder (60 files) and on both (120). Plus the whole
    `main.py predict` command, checkpoint loading and CSV included, for scale."""
    import main
    model = PneumoniaCNN().eval()
    runs.save_checkpoint(tmp / "bench.pt", {"model": model.state_dict(), "model_config": model.config,
                                            "preprocess": transforms.Preprocess(IMAGE_SIZE).state(), "threshold": 0.5})
    prep, device = transforms.Preprocess(IMAGE_SIZE), torch.device("cpu")
    result = {}
    for label, chosen in (("60", folders[:1]), ("120", folders)):
        files = data.list_files([str(f) for f in chosen])[0]
        old_workers = min(os.cpu_count() or 1, max(1, len(files) // 32))
        predictor = infer.Predictor([model], prep, device, batch_size=64)
        before = best_of(lambda: predictor.predict(torch.from_numpy(predictor.decode(files, old_workers, show=False)[0])
                                                   .unsqueeze(1)), 3)
        after = best_of(lambda: predictor.predict(torch.from_numpy(predictor.decode(files,
                                                                                    show=False)[0]).unsqueeze(1)), 3)
        result[label] = (len(files) / before, len(files) / after)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        command = best_of(lambda: main.main(["predict", *map(str, folders), "--checkpoint", str(tmp / "bench.pt"),
                                             "--out", tempfile.mkdtemp(dir=tmp)]), repeats=3)
    result["command"] = len(data.list_files([str(f) for f in folders])[0]) / command
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="real data folder")
    parser.add_argument("--replicate", type=int, default=16,
                        help="copies of the 120 full-resolution files for the epoch test")
    args = parser.parse_args()
    fullres = Path(args.shared) / "chest_xray_fullres_train"
    if not fullres.is_dir():
        sys.exit(f"real data not found at {fullres}; pass --shared")
    paths = sorted(str(p) for p in fullres.rglob("*.jpeg"))
    print(f"data: {len(paths)} full-resolution Kaggle train JPEGs in {fullres} "
          f"(replicated x{args.replicate} for epochs)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        decode = bench_decode(paths)
        root = replicated_archive(fullres, args.replicate, tmp)
        base_s, n = baseline_epoch(root)
        files = sorted(str(p) for p in root.rglob("*.jpeg"))
        t0 = time.perf_counter()
        decoded, _ = cache.load_images(files, images.cache_size(IMAGE_SIZE), cache.ImageCache(None, 0), show=False)
        cold_decode = time.perf_counter() - t0
        labels = torch.tensor([float("PNEUMONIA" in f) for f in files])
        ours = our_epoch(torch.from_numpy(decoded).unsqueeze(1), labels)
        layout = bench_memory_format(torch.from_numpy(decoded).unsqueeze(1), labels)
        startup = bench_startup(fullres, tmp)
        pred = bench_predict([fullres / "NORMAL", fullres / "PNEUMONIA"], tmp)
    rows = [
        ("1a. decode per image vs gray (ms)", f"naive L {decode['naive_gray']:.1f}", f"ours {decode['ours']:.1f}",
         f"{decode['naive_gray'] / decode['ours']:.2f}x faster"),
        ("1b. decode per image vs RGB (ms)", f"ImageFolder RGB {decode['naive_rgb']:.1f}", f"ours {decode['ours']:.1f}",
         f"{decode['naive_rgb'] / decode['ours']:.2f}x faster"),
        ("    1/8-scale decode alone (ms)", f"{decode['minimal']:.1f}", "",
         f"ceiling vs L: {decode['naive_gray'] / decode['minimal']:.2f}x"),
        (f"2. epoch of {n} full-res images (s)", f"ImageFolder+RGB {base_s:.1f}", f"ours cached {ours['seconds']:.1f}",
         f"{base_s / ours['seconds']:.1f}x faster"),
        ("   ours incl. one-time decode (s)", "", f"{cold_decode + ours['seconds']:.1f}",
         f"{base_s / (cold_decode + ours['seconds']):.1f}x faster"),
        ("3. data-pipeline share of step time", "", f"{100 * ours['data_share']:.1f}%", "target <= 10%"),
        ("4. start-up, 2nd run vs 1st (s)", f"1st {startup['first']:.2f}", f"2nd {startup['second']:.3f}",
         f"{100 * startup['ratio']:.1f}% of 1st"),
        *[(f"5. predict, {n} files (img/s)", f"1 worker/32 files {pred[n][0]:.1f}", f"every core {pred[n][1]:.1f}",
           f"{pred[n][1] / pred[n][0]:.2f}x") for n in ("60", "120")],
        ("   whole `main.py predict`, 120 (img/s)", "", f"{pred['command']:.1f}", "checkpoint, CSV included"),
        ("6. training step, memory layout (ms)", f"contiguous {1000 * layout['contiguous']:.0f}",
         f"channels_last {1000 * layout['channels_last']:.0f}",
         f"{layout['contiguous'] / layout['channels_last']:.2f}x"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows))


if __name__ == "__main__":
    main()
