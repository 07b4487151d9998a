"""Mixed precision, chosen by measurement: fp32, or bf16 autocast where this machine runs it faster.

Usage: `choice = precision.resolve("auto", device, make_model, image_size, batch_size)`; pass `choice.dtype`
to training and inference (None: fp32). Some CPUs run bf16 convolutions much faster than fp32 (AMX, Zen 4),
some a little slower (AVX512-BF16 alone on some Xeons), and those without bf16 instructions emulate it about
10x slower: `auto` takes fp32 untimed where the x86 flags name no bf16 instructions, and elsewhere times a few
steps of the actual model both ways at start-up and keeps bf16 only when it is more than 10% faster, after a
small batch has screened out emulation cheaply (where the flags cannot be read). On CUDA, `auto` is bf16
where the GPU supports it, else fp16 with loss scaling. Weights, optimizer state and the loss stay fp32
whatever is chosen, so a checkpoint trained in one precision scores in the other. A scoring command's
`auto` takes the precision the checkpoint's threshold was chosen at (`scored_at`), where the device runs
it natively: bf16 moves a probability by up to about 0.01, enough to move calls at the threshold, so
re-scoring a run's own test split in another precision would not give back its recorded figures.
"""
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from model import memory_format, place

SPEEDUP = 1.10  # bf16 must beat fp32 by more than this factor to be chosen
PROBE_STEPS = 4  # timed steps per precision, after one warm-up each
# A CPU without bf16 instructions emulates it, about 10x slower (an AMD EPYC Zen 3: 2.5 s against 0.22 s a step);
# where its flags cannot be read, a small batch shows that in a tenth of the full probe's time
SCREEN_BATCH, SCREEN_STEPS = 4, 2
EMULATED = 3.0  # bf16 this many times slower than fp32 on the small batch: emulated
# x86 flags of bf16 instructions (AMD Zen 4 on; Intel Cooper Lake, Sapphire Rapids on)
NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}
WITHOUT = "whose flags name no bf16 instructions (it would emulate bf16, about 10x slower than fp32)"


@dataclass
class Choice:
    """The precision a command runs at, and why."""

    name: str  # fp32, bf16 or fp16
    reason: str
    # per step, when probed: {"fp32": ..., "bf16": ...}, at the batch the reason names (the screen's 4 where it
    # found bf16 emulated, else the run's batch)
    timings_ms: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: no autocast, fp32)."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def record(self) -> dict:
        """For config.json, the provenance block and the model card."""
        return {"chosen": self.name, "reason": self.reason, "timings_ms": self.timings_ms}

    @classmethod
    def recorded(cls, record: dict) -> "Choice":
        """The choice a run recorded in its config.json, taken again when it resumes (never re-timed mid-run)."""
        return cls(record["chosen"], record["reason"], record.get("timings_ms", {}))


def cuda_has_bf16() -> bool:
    """Whether the current GPU computes bf16 in hardware (compute capability 8.0 on, or ROCm). torch's own check
    counts emulation by default: a T4 (sm_75) then says yes and runs bf16 slowly, where fp16 is native."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def runs_on(device: torch.device) -> set[str]:
    """The precisions `device` computes in natively."""
    if device.type == "cuda":
        return {"fp32", "fp16"} | ({"bf16"} if cuda_has_bf16() else set())
    return {"fp32", "bf16"} if device.type == "cpu" else {"fp32"}


def resolve(requested: str, device: torch.device, make_model, image_size: int, batch_size: int, *,
            train: bool = True, deterministic: bool = False, scored_at: str | None = None) -> Choice:
    """The precision for `--precision requested` on `device`; `auto` on the CPU probes a model `make_model()` builds
    (a fresh one, so the caller's model and random state are untouched), unless `deterministic`: a timing can
    differ between two runs of one command, and so would their results. For scoring a checkpoint, `scored_at` is
    the precision its threshold was chosen at: `auto` keeps it where `device` runs it, unless the CPU emulates bf16."""
    if requested == "fp32":
        return Choice("fp32", "asked for (--precision fp32)")
    if requested == "fp16":
        if device.type != "cuda":
            raise ValueError(f"--precision fp16 runs on a CUDA GPU only (autocast with loss scaling); on "
                             f"{device.type} use auto, fp32 or bf16")
        return Choice("fp16", "asked for (--precision fp16): fp16 autocast with loss scaling")
    what = "training step" if train else "forward pass"
    if requested == "auto" and scored_at in runs_on(device):
        cpu_bf16 = scored_at == "bf16" and device.type == "cpu"
        if cpu_bf16 and lacks_bf16():
            return Choice("fp32", f"auto for a checkpoint whose threshold was chosen in bf16, on a CPU {WITHOUT}: "
                                  f"fp32; its probabilities may differ from the recorded ones by about 0.01")
        slow = emulated(make_model, image_size, batch_size, train) if cpu_bf16 else None
        if slow is None:
            return Choice(scored_at, f"auto for a checkpoint whose threshold was chosen in {scored_at}: the same, "
                                     f"so that its recorded figures reproduce")
        return Choice("fp32", f"auto for a checkpoint whose threshold was chosen in bf16, on a CPU that emulates "
                              f"bf16 ({_timed(slow, what, SCREEN_BATCH)}): fp32, {slow['bf16'] / slow['fp32']:.0f}x "
                              f"faster here; its probabilities may differ from the recorded ones by about 0.01", slow)
    if requested == "auto" and deterministic and device.type == "cpu":
        return Choice("fp32", "auto with --deterministic: fp32, not timed, so that every rerun computes alike")
    if device.type == "cuda":
        supported = cuda_has_bf16()
        if requested == "bf16" and not supported:
            raise ValueError("--precision bf16 was asked for, but this GPU has no bf16 units (it would emulate "
                             "them); use auto (fp16 with loss scaling here) or fp32")
        if requested == "bf16":
            return Choice("bf16", "asked for (--precision bf16)")
        return Choice("bf16", "auto on a CUDA GPU with bf16") if supported else \
            Choice("fp16", "auto on a CUDA GPU without bf16: fp16 autocast with loss scaling")
    if requested == "bf16":
        return Choice("bf16", "asked for (--precision bf16)")
    if device.type != "cpu":
        return Choice("fp32", f"auto on {device.type}: fp32")
    if lacks_bf16():
        return Choice("fp32", f"auto on this CPU, {WITHOUT}: fp32, not timed")
    slow = emulated(make_model, image_size, batch_size, train)
    if slow is not None:
        return Choice("fp32", f"auto on this CPU: {_timed(slow, what, SCREEN_BATCH)}, so it emulates bf16; the full "
                              f"probe was skipped", slow)
    timings = probe(make_model, image_size, batch_size, train)
    faster = timings["bf16"] * SPEEDUP < timings["fp32"]
    return Choice("bf16" if faster else "fp32",
                  f"auto on this CPU: {_timed(timings, what, batch_size)}; bf16 is kept only when more than "
                  f"{SPEEDUP - 1:.0%} faster", {k: round(v, 1) for k, v in timings.items()})


def _timed(timings: dict[str, float], what: str, batch_size: int) -> str:
    """The two timings, in words, for a choice's reason."""
    return (f"a {what} of batch {batch_size} took {timings['bf16']:.0f} ms in bf16 against {timings['fp32']:.0f} ms "
            f"in fp32")


def cpu_flags() -> set[str]:
    """The x86 CPU's feature flags from /proc/cpuinfo (an empty set elsewhere, or where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def lacks_bf16() -> bool:
    """Whether this CPU's flags can be read and name no bf16 instructions: then it emulates bf16, and timing it
    only costs the screen's seconds (about 10 s in a fresh process on an AMD EPYC Zen 3, warm-up included)."""
    flags = cpu_flags()
    return bool(flags) and not flags & NATIVE_BF16


def emulated(make_model, image_size: int, batch_size: int, train: bool = True) -> dict[str, float] | None:
    """The timings of a small batch when they show this CPU emulating bf16 (more than EMULATED times slower than
    fp32), else None: then only a full probe can tell whether bf16 is faster. A CPU whose flags name bf16
    instructions is not timed: on a loaded machine one slow sample once made a native CPU look emulated."""
    if batch_size <= SCREEN_BATCH or cpu_flags() & NATIVE_BF16:
        return None
    timings = probe(make_model, image_size, SCREEN_BATCH, train, SCREEN_STEPS)
    return {k: round(v, 1) for k, v in timings.items()} if timings["bf16"] > EMULATED * timings["fp32"] else None


def probe(make_model, image_size: int, batch_size: int, train: bool = True,
          steps: int = PROBE_STEPS) -> dict[str, float]:
    """Median milliseconds of a training step (or a forward pass) of a fresh model, fp32 against bf16 autocast,
    alternating so that both see the same machine load. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cpu = torch.device("cpu")
        model = place(make_model(), cpu).train(train)
        x = torch.randn(batch_size, 1, image_size, image_size).contiguous(memory_format=memory_format(cpu))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for k in range(steps + 1):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                start = time.perf_counter()
                _step(model, optimizer, x, dtype, train)
                if k:  # the first of each is a warm-up (kernel selection, allocation)
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, dtype, train: bool) -> None:
    """One training step (or, for inference, one forward pass) at autocast `dtype` (None: fp32)."""
    with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(x).float()
    if train:
        optimizer.zero_grad(set_to_none=True)
        out.square().mean().backward()
        optimizer.step()
