"""Model shapes, one training epoch, checkpoints, safety and device choice."""
import pickle

import numpy as np
import pytest
import torch

import infer
import runs
import transforms
import train
from model import PneumoniaCNN, count_flops


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
    optimizer, scheduler = train.make_optimizer(model, 0.05, 3, 8)
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
    optimizer, scheduler = train.make_optimizer(model, 0.05, 1, 2)
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
    import precision
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    make = lambda: PneumoniaCNN((4, 4, 4), stem=4)  # noqa: E731
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


def test_a_cpu_that_emulates_bf16_is_told_by_a_small_batch_and_scores_a_bf16_checkpoint_in_fp32(monkeypatch):
    import precision
    cpu, make = torch.device("cpu"), lambda: PneumoniaCNN((4, 4, 4), stem=4)  # noqa: E731
    timed = []
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})  # an AMD EPYC Zen 3: no bf16 instructions

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
    import precision
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


def test_per_image_loss_weights_are_a_weighted_mean_and_ones_change_nothing():
    logits, y, w = torch.tensor([2.0, -1.0, 0.5, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([3.0, 1, 1, 1])
    bce = train.smoothed_bce(0.6, 0.0, torch.device("cpu"))
    each = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(0.6), reduction="none")(logits, y)
    assert bce(logits, y, w).item() == pytest.approx((each * w).mean().item())
    assert bce(logits, y, torch.ones(4)).item() == pytest.approx(bce(logits, y).item())
    three, causes = torch.tensor([[2.0, 0.1, -1], [0, 1, 0], [0.3, 0.2, 0.9], [1, 1, 1]]), torch.tensor([0, 1, 2, 1])
    cw = torch.tensor([0.5, 1.0, 2.0])
    ce = train.weighted_cross_entropy(cw, 0.0)
    assert ce(three, causes, torch.ones(4)).item() == pytest.approx(ce(three, causes).item())
    per = torch.nn.functional.cross_entropy(three, causes, reduction="none")
    assert ce(three, causes, w).item() == pytest.approx(((per * cw[causes] * w).sum() / (cw[causes] * w).sum()).item())


def test_product_of_experts_offsets_reach_the_training_loss_only():
    images, labels = _toy_set(32)
    loss_fn = train.smoothed_bce(0.6, 0.0, torch.device("cpu"))

    def first_epoch_loss(debias):
        train.set_seed(0)
        model = PneumoniaCNN((8, 8, 8), stem=4)
        optimizer, scheduler = train.make_optimizer(model, 0.05, 1, 4)
        parts = train.Parts(model, optimizer, scheduler, loss_fn, loss_fn, transforms.Preprocess(36),
                            torch.device("cpu"), torch.Generator().manual_seed(0), debias=debias)
        return train.train_one_epoch(parts, images, labels, 8, train.TrainState())

    plain = first_epoch_loss(train.Debias())
    # a bias expert that already knows every label: the product's loss is near zero, the network has nothing to learn
    knowing = first_epoch_loss(train.Debias(offsets=(labels * 2 - 1) * 30))
    assert plain > 0.1 and knowing < 1e-6
    weighted = first_epoch_loss(train.Debias(weights=torch.where(labels == 1, 2.0, 0.0)))  # the normals weigh 0
    assert weighted != pytest.approx(plain)


def _epochs(monkeypatch, cfg, losses, aucs, lr_at_end):
    """end_epoch over made-up validation figures, with the learning rate each epoch ends at; returns the state."""
    model = PneumoniaCNN((4, 4, 4), stem=4)
    val = (torch.zeros(4, 1, 20, 20, dtype=torch.uint8), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    scores, rates = iter(zip(losses, aucs)), iter(lr_at_end)

    class Schedule:
        def get_last_lr(self):
            return [self.lr]

    sched = Schedule()
    monkeypatch.setattr(train, "validate", lambda *a: next(scores))
    state = train.TrainState()
    parts = train.Parts(model, None, sched, None, None, transforms.Preprocess(16), torch.device("cpu"),
                        torch.Generator())
    for _ in losses:
        sched.lr = next(rates)
        train.end_epoch(model, val, parts, state, 0.5, 0.0, cfg)
        if state.stopped_early:
            break
    return state


def test_early_stopping_counts_only_the_low_rate_tail_and_waits_for_auc_and_loss(monkeypatch):
    worse = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # the loss only rises and the AUC never beats epoch 1
    aucs = [0.9, 0.8, 0.8, 0.8, 0.8, 0.8]
    high, low = [0.05] * 6, [0.05, 0.004, 0.003, 0.002, 0.001, 0.0]  # lr at each epoch's end; the peak is 0.05
    cfg = train.TrainConfig(epochs=6, batch_size=8, lr=0.05, pos_weight=0.6, patience=2)
    assert not _epochs(monkeypatch, cfg, worse, aucs, high).stopped_early  # never in the tail: never stops
    state = _epochs(monkeypatch, cfg, worse, aucs, low)
    assert state.stopped_early and state.epoch == 3  # tail epochs 2 and 3 without improvement
    assert not _epochs(monkeypatch, cfg, [0.5, 0.4, 0.3, 0.2, 0.1, 0.05], aucs, low).stopped_early  # the loss improves
    assert not _epochs(monkeypatch, train.TrainConfig(epochs=6, batch_size=8, lr=0.05, pos_weight=0.6, patience=0),
                       worse, aucs, low).stopped_early
    assert state.best_epoch == 1


# each module may import only modules of a lower rank: data flows one way, from main down to model
RANKS = {"errors": 0, "augment": 0, "labels": 0, "names": 0, "progress": 0, "distributed": 0, "model": 0,
         "transforms": 1, "precision": 1, "runs": 2, "images": 3, "settings": 3, "cache": 4, "demo": 4, "data": 5,
         "infer": 5, "train": 6, "gradcam": 6, "ood": 6, "shortcut": 5, "evaluate": 7, "report": 8, "calibrate": 8,
         "export": 8, "streaming": 8, "commands": 9, "main": 10}
# and, whatever the ranks allow: scoring and explaining never load fitting; parsing flags loads neither
NEVER_LOADS = {"infer": {"train"}, "gradcam": {"train"}, "evaluate": {"train"}, "report": {"train"},
               "calibrate": {"train"}, "streaming": {"train"},
               "ood": {"train"}, "shortcut": {"train", "model"}, "export": {"train", "gradcam"},
               "runs": {"model"}, "settings": {"train", "gradcam", "model", "transforms", "precision", "runs"}}


def our_imports(name: str) -> set[str]:
    """The project modules `name`.py imports directly."""
    import ast
    from conftest import ROOT
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return imported & set(RANKS)


def loads(name: str) -> set[str]:
    """Every project module that importing `name` loads, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for other in our_imports(todo.pop()) - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_imports_run_one_way():
    from conftest import ROOT
    assert {p.stem for p in ROOT.glob("*.py")} == set(RANKS)  # a new module must be given its place
    for name, rank in RANKS.items():
        for other in our_imports(name):
            assert RANKS[other] < rank, f"{name}.py imports {other}.py, which sits above or beside it"
    for name, forbidden in NEVER_LOADS.items():
        assert not loads(name) & forbidden, f"importing {name}.py loads {sorted(loads(name) & forbidden)}"
    assert loads("model") == set()  # the network imports nothing of ours


def test_no_conditional_expression_nests_another():
    """House style: a nested `a if x else b if y else c` becomes an if statement (ruff has no rule for it)."""
    import ast
    from conftest import ROOT
    nested = []
    for path in (p for folder in ("", "benchmarks/", "examples/", "tests/") for p in ROOT.glob(f"{folder}*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.IfExp) and any(isinstance(n, ast.IfExp) for n in ast.walk(node) if n is not node):
                nested.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not nested, nested
