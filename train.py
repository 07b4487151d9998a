"""Fit the CNN: SGD + OneCycle, the kept weights chosen by a fixed rule, exact resume. Usage: `state = fit(...)`.

Under OneCycle the learning rate anneals to nearly zero, so the default keeps the last epoch's weights
(`keep="last"`) and early stopping, when asked for, only counts epochs of the low-rate tail: a run is
never stopped, and never kept, at an epoch that a high learning rate made lucky or unlucky.
"""
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from lib import distributed
from lib import progress
from lib import runs
from lib.cache import TensorRows
from lib.errors import Interrupted  # a stop signal, raised once last.pt is saved; its message names the signal
from lib.infer import Predictor, reestimate_batchnorm
from model import memory_format
from lib.transforms import Preprocess


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; the message names the epoch and step."""


def member_seed(seed: int, member: int) -> int:
    """The seed of ensemble member `member` of a run seeded `seed`: member 0 is the single model of that seed,
    and the first K members of a larger ensemble are the members of `--ensemble K`."""
    return seed + 1000 * member


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return the generator that drives shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Turn --device auto|cpu|cuda|mps into a torch.device, refusing one that is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(name, False):
        raise ValueError(f"--device {name} was asked for but is not available here; use --device auto")
    return torch.device(name)


def setup_device(name: str, deterministic: bool = False) -> torch.device:
    """resolve_device, plus the determinism / autotuning switches for it."""
    device = resolve_device(name)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    return device


def to_device(images: TensorRows, device: torch.device) -> TensorRows | torch.Tensor:
    """Where the training steps read a split from: the whole uint8 set on a GPU when it fits in a quarter of
    its free memory; else batch by batch from the decode cache's mapped array, which needs no copy."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return images.to(device) if math.prod(images.shape) < free // 4 else images
    return images.to(device) if device.type == "mps" else images


TAIL_LR = 0.1  # the low-rate tail: epochs that end with the learning rate below this share of its peak


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    member: int = 0  # which ensemble member is training
    epoch: int = 0
    step: int = 0  # batches done in the current epoch
    loss_sum: float = 0.0
    seen: int = 0
    epoch_start_rng: torch.Tensor | None = None
    history: list = field(default_factory=list)
    best_auc: float = -math.inf
    best_val_loss: float = math.inf
    min_val_loss: float = math.inf  # lowest validation loss of any epoch, for early stopping
    best_epoch: int = -1
    best_model: dict | None = None
    stale: int = 0  # tail epochs in a row without improvement
    stopped_early: bool = False
    failure: str | None = None
    tail: list = field(default_factory=list)  # keep="swa": the last epochs' weights, to be averaged
    kept_model: dict | None = None  # set when training ends: the weights kept by the rule
    kept_auc: float = math.nan  # their validation AUC
    summary: dict = field(default_factory=dict)  # epochs run, why training stopped, which weights were kept


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked after each step, restoring the old handlers on exit."""

    def __enter__(self):
        self.raised = None
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        return False


def make_optimizer(model: nn.Module, lr: float, epochs: int, steps_per_epoch: int, *,
                   momentum: tuple[float, float], weight_decay: float, warmup: float):
    """SGD with Nesterov momentum and a OneCycle schedule: a warm-up over `warmup` of the steps, then a cosine anneal.

    OneCycle also cycles the momentum against the learning rate: momentum[1] at both ends, momentum[0] at the peak.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum[1], nesterov=True,
                                weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch,
                                                    pct_start=warmup, base_momentum=momentum[0],
                                                    max_momentum=momentum[1])
    return optimizer, scheduler


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Index batches over n items: shuffled when a generator is given, in order otherwise."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@dataclass
class Parts:
    """What a training step touches: the network, its optimiser, schedule, loss, and the batch pipeline."""

    model: nn.Module  # the module stepped: `torch.compile`d when asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable
    val_loss_fn: Callable  # the same loss without smoothing, on the CPU
    prep: Preprocess
    device: torch.device
    generator: torch.Generator  # drives shuffling and augmentation: equal on every rank
    scaler: torch.amp.GradScaler | None = None  # loss scaling for fp16 autocast
    autocast: torch.dtype | None = None  # bf16 or fp16 autocast for the steps; None: fp32
    ranks: distributed.Context = field(default_factory=distributed.Context)


def train_one_epoch(parts: Parts, images, labels, batch_size: int, state: TrainState, *, stop: StopFlag | None = None,
                    progress=None) -> float:
    """One pass over the training images from `state.step` on; returns the mean loss.

    The permutation is drawn from the generator state saved at the epoch's start, so a run resumed
    mid-epoch sees the same batches, and the same augmentation, as one that never stopped. Under
    torchrun every rank draws the same permutation and steps on its share of each global batch;
    one all-reduce per step gives every rank the batch's loss and whether any rank was signalled.
    """
    p, generator, device = parts, parts.generator, parts.device
    if state.step == 0:
        state.epoch_start_rng, state.loss_sum, state.seen = generator.get_state(), 0.0, 0
    resume_rng = generator.get_state()
    generator.set_state(state.epoch_start_rng)
    order = list(batches(len(images), batch_size, generator))
    if state.step > 0:
        generator.set_state(resume_rng)
    p.model.train()
    dtype = p.autocast
    scaler = p.scaler or torch.amp.GradScaler(device.type, enabled=False)
    for k in range(state.step, len(order)):
        idx, keep = p.ranks.share(order[k])
        y = labels[idx].to(device, non_blocking=True)
        x = p.prep.train(images[idx].to(device, non_blocking=True), generator, len(order[k]), keep)
        x = x.contiguous(memory_format=memory_format(device))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = p.loss_fn(p.model(x).float(), y)
        # before the backward pass, so that every rank sees a non-finite loss on any rank and none steps on it
        loss_sum, seen, signalled = distributed.all_sum(
            [loss.item() * len(idx), len(idx), float(stop is not None and bool(stop.raised))], p.ranks, device)
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(f"the training loss became {loss_sum / seen} at epoch {state.epoch + 1}, step {k + 1}; "
                                f"try a lower --lr")
        p.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a pass-through unless fp16 autocast needs loss scaling
        scaler.step(p.optimizer)
        scaler.update()
        p.scheduler.step()
        state.loss_sum += loss_sum
        state.seen += int(seen)
        state.step = k + 1
        if progress is not None:
            progress.update()
            shown = {"loss": f"{state.loss_sum / state.seen:.4f}"}
            if state.history:
                shown["val_auc"] = f"{state.history[-1]['val_auc']:.4f}"
            progress.set_postfix(shown, refresh=False)
        if stop is not None and (signalled if p.ranks.active else stop.raised):  # all ranks stop at the same step
            raise Interrupted(stop.raised or "a stop signal on another rank")
    return state.loss_sum / max(state.seen, 1)


def validate(model, images, labels, prep, loss_fn: Callable, *, device,
             ranks: distributed.Context = distributed.Context(), autocast: torch.dtype | None = None
             ) -> tuple[float, float]:
    """Validation loss and AUC (macro one-vs-rest for three classes), on the CPU whatever device the model is on.

    Under torchrun each rank scores every world-th image and the logits are gathered: every rank then
    computes the loss and AUC of the whole set, the figures one process would get.
    """
    predictor = Predictor([model], prep, device, autocast=autocast)
    if ranks.active:
        rows = distributed.shard_rows(len(images), ranks)
        mine = images.take(rows) if isinstance(images, TensorRows) else images[rows.to(images.device)]
        logits = distributed.gather_rows(predictor.logits(mine), len(images), ranks, device)
    else:
        logits = predictor.logits(images)
    y = labels.cpu()
    if logits.ndim == 1:
        return loss_fn(logits, y.float()).item(), float(roc_auc_score(y.numpy(), logits.numpy()))
    auc = roc_auc_score(y.numpy(), torch.softmax(logits, 1).numpy(), multi_class="ovr", average="macro")
    return loss_fn(logits, y).item(), float(auc)


def smoothed_bce(pos_weight: float, smoothing: float, device):
    """BCEWithLogitsLoss(pos_weight), with targets moved `smoothing` towards 0.5 when it is above 0."""
    pos = torch.tensor(pos_weight, device=device)

    def loss(logits, y):
        target = y * (1 - smoothing) + 0.5 * smoothing if smoothing else y
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos)
    return loss


def weighted_cross_entropy(class_weight: torch.Tensor, smoothing: float) -> nn.Module:
    """CrossEntropyLoss(weight=class_weight, label_smoothing)."""
    return nn.CrossEntropyLoss(weight=class_weight, label_smoothing=smoothing)


def class_weights(labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """n / (classes x count) per class: each class weighs the same in the cross-entropy, whatever its size."""
    counts = torch.bincount(labels.cpu().long(), minlength=classes).float()
    return len(labels) / (classes * counts.clamp_min(1))


def make_loss(cfg: "TrainConfig", train_labels: torch.Tensor, device, smoothing: float) -> Callable:
    """The task's loss: BCE with pos_weight for 'pneumonia', class-weighted cross-entropy for 'cause'."""
    if cfg.task == "cause":
        return weighted_cross_entropy(class_weights(train_labels).to(device), smoothing)
    return smoothed_bce(cfg.pos_weight, smoothing, device)


HISTORY_FIELDS = ("member", "epoch", "loss", "val_loss", "val_auc", "lr", "seconds", "kept", "stopped")


def epoch_line(h: dict, epochs: int) -> str:
    """One finished epoch as a log line."""
    return (f"epoch {h['epoch']}/{epochs}: loss {h['loss']:.4f}, val loss {h['val_loss']:.4f}, "
            f"val AUC {h['val_auc']:.4f}, lr {h['lr']:.2g}, {h['seconds']:.1f} s")


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv: one row per finished epoch (of every ensemble member); `kept` marks the epochs whose weights
    were kept, `stopped` says on a member's last row why its training ended."""
    runs.write_csv(path, HISTORY_FIELDS, [[h.get(k, "") for k in HISTORY_FIELDS] for h in history])


@dataclass(kw_only=True)  # by name only: a field inserted later cannot shift the others
class TrainConfig:
    """The settings fit() needs. The recipe's values have no defaults here: the parser (app/settings.py) is their one
    source, and `of` copies them field by field, so a renamed flag fails loudly instead of falling back."""
    epochs: int
    batch_size: int
    lr: float
    pos_weight: float
    patience: int
    label_smoothing: float
    momentum: tuple[float, float]  # SGD's Nesterov momentum at OneCycle's peak lr, and at its ends
    weight_decay: float
    warmup: float  # OneCycle's pct_start
    keep: str  # which weights are kept: last, best or swa (keep_weights)
    swa_epochs: int  # keep="swa": how many final epochs are averaged
    task: str  # 'pneumonia', or 'cause': normal / bacterial / viral
    seed: int  # of the generator that drives shuffling and augmentation (the member's own)
    progress: bool = True  # progress bar
    compile_model: bool = False  # torch.compile the training steps
    member: int = 0  # the ensemble member being trained (its seed is `seed`)
    device: torch.device = torch.device("cpu")
    autocast: torch.dtype | None = None  # bf16 or fp16 autocast (lib/precision.py); None: fp32
    ranks: distributed.Context = field(default_factory=distributed.Context)  # this process's place under torchrun

    @classmethod
    def of(cls, s, member: int, device: torch.device, ranks: distributed.Context,
           autocast: torch.dtype | None) -> "TrainConfig":
        """One member's config from the run's settings (app.settings.Settings), and this process's place."""
        return cls(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, pos_weight=s.pos_weight, patience=s.patience,
                   label_smoothing=s.label_smoothing, momentum=s.momentum, weight_decay=s.weight_decay,
                   warmup=s.warmup, keep=s.keep, swa_epochs=s.swa_epochs, task=s.task,
                   seed=member_seed(s.seed, member), progress=not s.quiet, compile_model=s.compile, member=member,
                   device=device, autocast=autocast, ranks=ranks)


def _parts(model, train_set, prep, cfg: TrainConfig, generator: torch.Generator) -> Parts:
    """The optimiser, schedule, losses and (under torchrun) DistributedDataParallel wrapper for one fit."""
    device, ranks = cfg.device, cfg.ranks
    steps = math.ceil(len(train_set[0]) / cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.epochs, steps, momentum=cfg.momentum,
                                          weight_decay=cfg.weight_decay, warmup=cfg.warmup)
    stepped = model
    if ranks.active and cfg.batch_size < 16 * ranks.world:
        warnings.warn(f"--batch-size {cfg.batch_size} over {ranks.world} processes leaves under 16 images per process "
                      f"for BatchNorm's statistics; a larger global batch keeps them steady", stacklevel=3)
    if ranks.active:  # per-rank BatchNorm statistics; see docs/scale-out.md for why not SyncBatchNorm
        stepped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    stepped = torch.compile(stepped) if cfg.compile_model else stepped  # compiled for the steps only
    return Parts(stepped, optimizer, scheduler,
                 make_loss(cfg, train_set[1], device, cfg.label_smoothing),
                 make_loss(cfg, train_set[1], torch.device("cpu"), 0.0), prep, device, generator,
                 torch.amp.GradScaler(device.type, enabled=cfg.autocast == torch.float16), ranks=ranks,
                 autocast=cfg.autocast)


def fit(model, train_set, val_set, prep, cfg: TrainConfig, *, run_dir: Path, resume: dict | None = None,
        earlier: tuple = ()) -> TrainState:
    """Train one model (one ensemble member), then keep its weights by `cfg.keep`; resumable from `resume` (a last.pt).

    `train_set` and `val_set` are (uint8 images, float labels) on `cfg.device`. Writes history.csv (the rows
    `earlier` of finished members first) and last.pt after every epoch, and last.pt again when interrupted.
    A non-finite loss ends training with `state.failure` set; the best weights so far are kept. Under torchrun
    (`cfg.ranks`) the steps run through DistributedDataParallel, every rank keeps the same TrainState, and
    only rank 0 writes.
    """
    generator, ranks = torch.Generator().manual_seed(cfg.seed), cfg.ranks  # as set_seed(seed)
    parts = _parts(model, train_set, prep, cfg, generator)
    saved = {"model": model, "optimizer": parts.optimizer, "scheduler": parts.scheduler, "scaler": parts.scaler}
    state = TrainState(**runs.restore_last(resume, saved, generator, ranks.rank, cfg.device)) if resume is not None \
        else TrainState(cfg.member)
    steps = math.ceil(len(train_set[0]) / cfg.batch_size)
    bar = progress.track(cfg.epochs * steps, "training" + (f" member {cfg.member + 1}" if cfg.member else ""), "steps",
                         cfg.progress and ranks.main, initial=state.epoch * steps + state.step)
    try:
        with StopFlag() as stop:
            while state.epoch < cfg.epochs and not state.stopped_early:
                start = time.perf_counter()
                try:
                    loss = train_one_epoch(parts, *train_set, cfg.batch_size, state, stop=stop, progress=bar)
                except Interrupted:
                    cuda_states = distributed.gather_objects(runs.cuda_rng(cfg.device), ranks)
                    if ranks.main:
                        runs.save_last(run_dir / "last.pt", saved, generator, vars(state), cuda_states)
                    distributed.barrier(ranks)  # no rank exits before last.pt is whole
                    raise
                except NonFiniteLoss as err:
                    state.failure = str(err)
                    break
                end_epoch(model, val_set, parts, state, loss, start=start, cfg=cfg)
                bar.set_postfix(loss=f"{loss:.4f}", val_auc=f"{state.history[-1]['val_auc']:.4f}")
                if cfg.progress and ranks.main and not progress.on_terminal():  # a log gets one line per epoch
                    print(epoch_line(state.history[-1], cfg.epochs), flush=True)
                cuda_states = distributed.gather_objects(runs.cuda_rng(cfg.device), ranks)  # each rank's own GPU
                if ranks.main:
                    write_history(run_dir / "history.csv", [*earlier, *state.history])
                    runs.save_last(run_dir / "last.pt", saved, generator, vars(state), cuda_states)
                # the signal came during validation: the epoch is saved, stop here (every rank, or none)
                if distributed.all_sum([float(bool(stop.raised))], ranks, device=cfg.device)[0]:
                    distributed.barrier(ranks)
                    raise Interrupted(stop.raised or "a stop signal on another rank")
    finally:
        bar.close()
    keep_weights(model, train_set, val_set, parts, state, cfg=cfg)
    if ranks.main:
        write_history(run_dir / "history.csv", [*earlier, *state.history])
    return state


def keep_weights(model, train_set, val_set, parts: Parts, state: TrainState, *, cfg: TrainConfig) -> None:
    """Set the kept weights by `cfg.keep`, mark them in the history, and summarise how training ended.

    last: the final epoch's, where OneCycle has annealed; best: the epoch with the best validation AUC
    (ties: lower loss), the old rule; swa: the mean of the last `swa_epochs` epochs' weights, with the
    BatchNorm statistics recomputed for them. After a failure, the best weights so far.
    """
    rule = "best" if state.failure else cfg.keep
    if state.epoch == 0 or (rule == "best" and state.best_model is None):
        stopped = f"failed: {state.failure}" if state.failure else "no epoch finished"  # as below: says it failed
        state.summary = {"member": cfg.member, "seed": cfg.seed, "epochs_run": 0, "stopped": stopped, "kept": None}
        return
    if rule == "best":
        state.kept_model, state.kept_auc, kept = state.best_model, state.best_auc, [state.best_epoch]
    elif rule == "last" or len(state.tail) < 2:
        state.kept_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.kept_auc, kept = state.history[-1]["val_auc"], [state.epoch]
    else:
        model.load_state_dict(average_weights(state.tail))
        recompute_batchnorm(model, train_set[0], parts.prep, torch.Generator().manual_seed(cfg.seed + 1),
                            cfg.batch_size, device=cfg.device)
        distributed.sync_buffers(model, parts.ranks)
        state.kept_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.kept_auc = validate(model, *val_set, parts.prep, parts.val_loss_fn, device=parts.device,
                                  ranks=parts.ranks, autocast=parts.autocast)[1]
        kept = list(range(state.epoch - len(state.tail) + 1, state.epoch + 1))
    for h in state.history:
        h["kept"] = "yes" if h["epoch"] in kept else ""
    if state.failure:
        stopped = f"failed: {state.failure}"
    elif state.stopped_early:
        stopped = f"stopped early: no improvement in {cfg.patience} epochs of the low-learning-rate tail"
    else:
        stopped = f"completed all {cfg.epochs} epochs"
    state.history[-1]["stopped"] = stopped
    what = {"last": f"the last epoch's weights (epoch {kept[-1]})",
            "best": f"the weights of the epoch with the best validation AUC (epoch {kept[-1]})",
            "swa": f"the mean of epochs {kept[0]}-{kept[-1]}'s weights, BatchNorm statistics recomputed"}
    state.summary = {"member": cfg.member, "seed": cfg.seed, "epochs_run": state.epoch, "stopped": stopped,
                     "kept": what["swa" if len(kept) > 1 else rule], "kept_epochs": kept,
                     "val_auc": round(float(state.kept_auc), 6)}


def average_weights(states: list[dict]) -> dict:
    """The element-wise mean of several state dicts of one network; integer buffers (BatchNorm's batch count) from
    the last."""
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in states[-1].items()}


def recompute_batchnorm(model: nn.Module, images, prep: Preprocess, generator: torch.Generator,
                        batch_size: int, *, device: torch.device) -> None:
    """Re-estimate every BatchNorm layer's running statistics for the model's current weights, over one pass of
    the training images augmented as in training: what the statistics of a normally trained model describe."""
    with torch.no_grad():
        reestimate_batchnorm(model, (prep.train(images[idx].to(device), generator).contiguous(
            memory_format=memory_format(device)) for idx in batches(len(images), batch_size, generator)))


def end_epoch(model, val_set, parts: Parts, state: TrainState, loss: float, *, start: float,
              cfg: TrainConfig) -> None:
    """Validate `model` (the uncompiled one), record the epoch, track the best and the tail's weights, decide on
    early stopping."""
    distributed.sync_buffers(model, parts.ranks)
    val_loss, val_auc = validate(model, *val_set, parts.prep, parts.val_loss_fn, device=parts.device, ranks=parts.ranks,
                                 autocast=parts.autocast)
    state.epoch += 1
    state.step = 0
    state.history.append({"member": cfg.member, "epoch": state.epoch, "loss": round(loss, 6),
                          "val_loss": round(val_loss, 6), "val_auc": round(val_auc, 6),
                          "lr": round(parts.scheduler.get_last_lr()[0], 8),
                          "seconds": round(time.perf_counter() - start, 2)})
    # AUC first; on a tie (it saturates at 1.0 on easy data) the lower validation loss wins
    if (val_auc, -val_loss) > (state.best_auc, -state.best_val_loss):
        state.best_auc, state.best_val_loss, state.best_epoch = val_auc, val_loss, state.epoch
        state.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if cfg.keep == "swa":
        state.tail = [*state.tail, {k: v.detach().cpu().clone() for k,
                                    v in model.state_dict().items()}][-cfg.swa_epochs:]
    # learning is done when neither the AUC nor the loss has improved for `patience` epochs of the low-rate
    # tail; before it, the rate is still high and an epoch's figures say more about the rate than the model
    improved = state.best_epoch == state.epoch or val_loss < state.min_val_loss
    state.min_val_loss = min(state.min_val_loss, val_loss)
    in_tail = parts.scheduler.get_last_lr()[0] < TAIL_LR * cfg.lr
    state.stale = state.stale + 1 if in_tail and not improved else 0
    state.stopped_early = 0 < cfg.patience <= state.stale
