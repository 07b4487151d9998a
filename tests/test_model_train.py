"""Model shapes, one training epoch, checkpoints, safety and device choice."""
import pickle

import numpy as np
import pytest
import torch

from lib import infer
from lib import runs
from lib import transforms
import train
from model import PneumoniaCNN, count_flops
from conftest import optimiser_defaults, train_config


def test_model_shapes_and_cam_layer():
    model = PneumoniaCNN()
    assert model(torch.zeros(3, 1, 160, 160)).shape == (3,)
    assert model(torch.zeros(2, 1, 96, 96)).shape == (2,)
    seen = {}
    handle = model.cam_layer.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model(torch.zeros(1, 1, 160, 160))
    handle.remove()
    assert seen["shape"] == (1, 96, 20, 20)  # last conv block, 1/8 of the input
    assert isinstance(model.cam_layer[-2], torch.nn.BatchNorm2d)
    assert count_flops(model, 160) == pytest.approx(122.6e6, rel=0.01)


def _toy_set(n=64, side=40, seed=0):
    """Bright-centre images are class 1: learnable in one epoch."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, side, side, generator=g) * 120).to(torch.uint8)
    labels = (torch.arange(n) % 2).float()
    images[labels == 1, :, 12:28, 12:28] += 120
    return images, labels


def test_one_epoch_lowers_the_loss():
    train.set_seed(0)
    images, labels = _toy_set()
    model = PneumoniaCNN((8, 16, 16), stem=8).to(memory_format=torch.channels_last)
    prep = transforms.Preprocess(36, 0.3, 0.2)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6))
    before = loss_fn(model.eval()(prep.eval(images)), labels).item()
    optimizer, scheduler = train.make_optimizer(model, 0.05, 3, 8, **optimiser_defaults())
    state = train.TrainState()
    parts = train.Parts(model, optimizer, scheduler, loss_fn, loss_fn, prep, torch.device("cpu"),
                        torch.Generator().manual_seed(0))
    for _ in range(3):
        train.train_one_epoch(parts, images, labels, 8, state)
        state.step = 0
    after = loss_fn(model.eval()(prep.eval(images)), labels).item()
    assert after < before * 0.8, (before, after)


def test_non_finite_loss_names_epoch_and_step():
    images, labels = _toy_set(16)
    model = PneumoniaCNN((8, 8, 8), stem=4)
    optimizer, scheduler = train.make_optimizer(model, 0.05, 1, 2, **optimiser_defaults())
    loss_fn = lambda logits, y: logits.sum() * float("nan")  # noqa: E731
    with pytest.raises(train.NonFiniteLoss, match=r"epoch 1, step 1"):
        parts = train.Parts(model, optimizer, scheduler, loss_fn, loss_fn, transforms.Preprocess(36),
                            torch.device("cpu"),
                            torch.Generator())
        train.train_one_epoch(parts, images, labels, 8, train.TrainState())


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        runs.load_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_checkpoint_roundtrip_and_version_warning(tmp_path):
    runs.save_checkpoint(tmp_path / "c.pt", {"model": PneumoniaCNN().state_dict(), "threshold": 0.3})
    ckpt = runs.load_checkpoint(tmp_path / "c.pt")
    assert ckpt["threshold"] == 0.3 and ckpt["versions"]["torch"] == torch.__version__
    ckpt["versions"]["project"] = "0.0.1"
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="project 0.0.1"):
        runs.load_checkpoint(tmp_path / "old.pt")
    torch.save({"format": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format"):
        runs.load_checkpoint(tmp_path / "future.pt")


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert train.resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="--device cuda"):
        train.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.resolve_device("auto").type == "cuda"


def test_precision_auto_keeps_bf16_only_when_it_measures_faster(monkeypatch):
    from lib import precision
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    make = lambda: PneumoniaCNN((4, 4, 4), stem=4)  # noqa: E731
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})  # a CPU with bf16: timed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.resolve("auto", cuda, make, 32, 4).dtype is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert precision.resolve("auto", cuda, make, 32, 4).dtype is torch.float16
    with pytest.raises(ValueError, match="has no bf16 units"):
        precision.resolve("bf16", cuda, make, 32, 4)
    assert precision.resolve("fp32", cpu, make, 32, 4).dtype is None
    assert precision.resolve("bf16", cpu, make, 32, 4).dtype is torch.bfloat16
    for fp32, bf16, chosen in ((100.0, 80.0, "bf16"), (100.0, 95.0, "fp32"), (100.0, 130.0, "fp32")):
        monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32": fp32, "bf16": bf16})
        choice = precision.resolve("auto", cpu, make, 32, 4)
        assert choice.name == chosen and choice.record()["timings_ms"] == {"fp32": fp32, "bf16": bf16}
    # --deterministic: no timing (two runs could time differently), fp32 on the CPU
    monkeypatch.setattr(precision, "probe", lambda *a, **k: pytest.fail("probed under --deterministic"))
    assert precision.resolve("auto", cpu, make, 32, 4, deterministic=True).name == "fp32"
    # scoring a checkpoint: auto keeps the precision its threshold was chosen at, where the device computes in it
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32": 100.0, "bf16": 130.0})  # bf16 native, slower
    for scored_at in ("fp32", "bf16"):
        assert precision.resolve("auto", cpu, make, 32, 16, train=False, scored_at=scored_at).name == scored_at
    assert precision.resolve("fp32", cpu, make, 32, 4, train=False, scored_at="bf16").name == "fp32"  # asked for
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32": 100.0, "bf16": 50.0})
    assert precision.resolve("auto", cpu, make, 32, 4, train=False, scored_at="fp16").name == "bf16"  # not on a CPU
    assert precision.resolve("auto", cuda, make, 32, 4, train=False, scored_at="bf16").name == "fp16"  # no GPU bf16


def test_a_cpu_without_bf16_is_told_by_its_flags_or_a_small_batch_and_scores_a_bf16_checkpoint_in_fp32(monkeypatch):
    from lib import precision
    cpu, make = torch.device("cpu"), lambda: PneumoniaCNN((4, 4, 4), stem=4)  # noqa: E731
    timed = []
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})  # an AMD EPYC Zen 3: no bf16 instructions
    monkeypatch.setattr(precision, "probe", lambda *a, **k: pytest.fail("timed a CPU whose flags name no bf16"))
    for choice in (precision.resolve("auto", cpu, make, 128, 32),
                   precision.resolve("auto", cpu, make, 128, 64, train=False, scored_at="bf16")):
        assert choice.name == "fp32" and "flags name no bf16 instructions" in choice.reason
        assert choice.record()["timings_ms"] == {}
    assert precision.resolve("auto", cpu, make, 128, 64, train=False, scored_at="fp32").name == "fp32"
    # where the flags cannot be read (not x86, no /proc): a small batch screens for emulation
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())

    def probe(make_model, image_size, batch_size, train=True, steps=precision.PROBE_STEPS):
        timed.append(batch_size)  # emulated bf16: 10x slower at every batch size (as on an AMD EPYC Zen 3)
        return {"fp32": 10.0 * batch_size, "bf16": 100.0 * batch_size}

    monkeypatch.setattr(precision, "probe", probe)
    choice = precision.resolve("auto", cpu, make, 128, 32)
    assert choice.name == "fp32" and "emulates bf16" in choice.reason and timed == [precision.SCREEN_BATCH]
    assert choice.record()["timings_ms"] == {"fp32": 40.0, "bf16": 400.0}  # the small batch's, as the reason says
    timed.clear()
    scoring = precision.resolve("auto", cpu, make, 128, 64, train=False, scored_at="bf16")
    assert scoring.name == "fp32" and "emulates bf16" in scoring.reason and timed == [precision.SCREEN_BATCH]
    assert precision.resolve("bf16", cpu, make, 128, 32).name == "bf16"  # asked for: no screen overrules it
    # a CPU whose bf16 is native, if slower at a small batch: the screen passes it to the full probe, at the batch
    monkeypatch.setattr(precision, "probe", lambda m, size, batch, *a, **k: timed.append(batch) or
                        {"fp32": 100.0, "bf16": 150.0 if batch == precision.SCREEN_BATCH else 80.0})
    timed.clear()
    assert precision.resolve("auto", cpu, make, 128, 32).name == "bf16" and timed == [precision.SCREEN_BATCH, 32]
    # a CPU whose flags name bf16 instructions skips the screen: a slow sample on a loaded machine cannot make it
    # look emulated (it once turned a bf16 checkpoint's scoring to fp32 mid-suite)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(precision, "probe", lambda m, size, batch, *a, **k: timed.append(batch) or
                        {"fp32": 10.0, "bf16": 100.0})
    timed.clear()
    scoring = precision.resolve("auto", cpu, make, 128, 64, train=False, scored_at="bf16")
    assert scoring.name == "bf16" and timed == []
    assert precision.resolve("auto", cpu, make, 128, 32).name == "fp32" and timed == [32]  # the full probe decides


def test_the_precision_probe_times_both_and_leaves_the_random_state_alone():
    from lib import precision
    before = torch.get_rng_state()
    timings = precision.probe(lambda: PneumoniaCNN((4, 4, 4), stem=4), 32, 4, steps=2)
    assert set(timings) == {"fp32", "bf16"} and all(t > 0 for t in timings.values())
    assert torch.equal(torch.get_rng_state(), before)


def test_predict_restores_mode_and_is_batch_size_independent():
    images, _ = _toy_set(20)
    model = PneumoniaCNN((8, 8, 8), stem=4).train()
    prep = transforms.Preprocess(36)
    a, _ = infer.Predictor([model], prep, torch.device("cpu"), batch_size=7).predict(images)
    b, _ = infer.Predictor([model], prep, torch.device("cpu"), batch_size=20).predict(images)
    assert model.training and np.allclose(a, b, atol=1e-6) and ((a > 0) & (a < 1)).all()


def test_label_smoothing_moves_targets_towards_one_half():
    logits, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    plain = train.smoothed_bce(0.6, 0.0, torch.device("cpu"))
    module = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6))
    assert torch.equal(plain(logits, y), module(logits, y))
    smooth = train.smoothed_bce(0.6, 0.1, torch.device("cpu"))
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6))(logits, torch.tensor([0.95, 0.05, 0.95]))
    assert smooth(logits, y).item() == pytest.approx(expected.item())
    assert smooth(logits, y).item() != pytest.approx(plain(logits, y).item())


def _epochs(monkeypatch, cfg, losses, aucs, lr_at_end):
    """end_epoch over made-up validation figures, with the learning rate each epoch ends at; returns the state."""
    model = PneumoniaCNN((4, 4, 4), stem=4)
    val = (torch.zeros(4, 1, 20, 20, dtype=torch.uint8), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    scores, rates = iter(zip(losses, aucs)), iter(lr_at_end)

    class Schedule:
        def get_last_lr(self):
            return [self.lr]

    sched = Schedule()
    monkeypatch.setattr(train, "validate", lambda *a, **kw: next(scores))
    state = train.TrainState()
    parts = train.Parts(model, None, sched, None, None, transforms.Preprocess(16), torch.device("cpu"),
                        torch.Generator())
    for _ in losses:
        sched.lr = next(rates)
        train.end_epoch(model, val, parts, state, 0.5, start=0.0, cfg=cfg)
        if state.stopped_early:
            break
    return state


def test_early_stopping_counts_only_the_low_rate_tail_and_waits_for_auc_and_loss(monkeypatch):
    worse = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # the loss only rises and the AUC never beats epoch 1
    aucs = [0.9, 0.8, 0.8, 0.8, 0.8, 0.8]
    high, low = [0.05] * 6, [0.05, 0.004, 0.003, 0.002, 0.001, 0.0]  # lr at each epoch's end; the peak is 0.05
    cfg = train_config(epochs=6, batch_size=8, lr=0.05, pos_weight=0.6, patience=2)
    assert not _epochs(monkeypatch, cfg, worse, aucs, high).stopped_early  # never in the tail: never stops
    state = _epochs(monkeypatch, cfg, worse, aucs, low)
    assert state.stopped_early and state.epoch == 3  # tail epochs 2 and 3 without improvement
    assert not _epochs(monkeypatch, cfg, [0.5, 0.4, 0.3, 0.2, 0.1, 0.05], aucs, low).stopped_early  # the loss improves
    assert not _epochs(monkeypatch, train_config(epochs=6, batch_size=8, lr=0.05, pos_weight=0.6, patience=0),
                       worse, aucs, low).stopped_early
    assert state.best_epoch == 1


# The folders are the layers: the six files the project is built around on top, what they are built from in lib/,
# the command-line application in app/. Data flows one way, from main down to model:
# main -> app/ -> the pipeline files -> lib/ -> model.
PIPELINE = {"model": 0, "data": 1, "train": 2, "gradcam": 2, "evaluate": 3}  # and among them, one way too
FOLDER = {"main": "", **{name: "" for name in PIPELINE}}
MAY_IMPORT = {"lib": {"lib"}, "": {"lib", ""}, "app": {"lib", "", "app"}, "main": {"lib", "app"}}
BENEATH_ALL = "model"  # the network, which imports nothing of ours: lib/ builds it for inference and precision
# and whatever the folders allow: scoring and explaining never load fitting; parsing flags loads neither
NEVER_LOADS = {"infer": {"train"}, "gradcam": {"train"}, "evaluate": {"train"}, "report": {"train"},
               "calibrate": {"train"}, "streaming": {"train"},
               "ood": {"train"}, "shortcut": {"train", "model"}, "export": {"train", "gradcam"},
               "runs": {"model"}, "settings": {"train", "gradcam", "model", "transforms", "precision", "runs"}}


def modules() -> dict[str, str]:
    """Every project module by name, with its folder ("" for the top level)."""
    from conftest import ROOT
    found = {p.stem: "" for p in ROOT.glob("*.py")}
    for folder in ("lib", "app"):
        found.update({p.stem: folder for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"})
    return found


def our_imports(name: str) -> set[str]:
    """The project modules `name` imports directly (`import data`, `from lib import cache`, `from lib.cache import
    ImageCache` alike)."""
    import ast
    from conftest import ROOT
    where = modules()
    tree = ast.parse((ROOT / where[name] / f"{name}.py").read_text())
    imported = {a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            imported.add(n.module.split(".")[-1])
            if n.module in ("lib", "app"):
                imported |= {a.name for a in n.names}
    return imported & set(where) - {name}


def loads(name: str) -> set[str]:
    """Every project module that importing `name` loads, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for other in our_imports(todo.pop()) - seen:
            seen.add(other)
            todo.append(other)
    return seen


def layer(name: str, where: dict[str, str]) -> str:
    return "main" if name == "main" else where[name]


def test_imports_run_one_way_between_the_folders():
    where = modules()
    assert {n for n, f in where.items() if f == ""} == set(FOLDER)  # the top level holds the pipeline and main only
    for name in where:
        for other in our_imports(name):
            assert layer(other, where) in MAY_IMPORT[layer(name, where)] or other == BENEATH_ALL, \
                f"{where[name] or '.'}/{name}.py imports {where[other] or '.'}/{other}.py, a folder above it"
            if name in PIPELINE and other in PIPELINE:
                assert PIPELINE[other] < PIPELINE[name], f"{name}.py imports {other}.py, which sits above or beside it"
        assert name not in loads(name), f"{name} imports itself through others (a cycle)"
    for name, forbidden in NEVER_LOADS.items():
        assert not loads(name) & forbidden, f"importing {name}.py loads {sorted(loads(name) & forbidden)}"
    assert loads("model") == set()  # the network imports nothing of ours


def test_no_conditional_expression_nests_another():
    """House style: a nested `a if x else b if y else c` becomes an if statement (ruff has no rule for it)."""
    import ast
    from conftest import ROOT
    nested = []
    for path in (p for folder in ("", "lib/", "app/", "benchmarks/", "examples/", "tests/")
                 for p in ROOT.glob(f"{folder}*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.IfExp) and any(isinstance(n, ast.IfExp) for n in ast.walk(node) if n is not node):
                nested.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not nested, nested


def test_no_function_takes_more_than_seven_positional_parameters():
    """House style: past 7 the arguments are given by name (a keyword-only tail) or travel in a settings object."""
    import ast
    from conftest import ROOT
    long = []
    for path in (p for folder in ("", "lib/", "app/") for p in ROOT.glob(f"{folder}*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 7:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
