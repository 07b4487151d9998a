"""Settings: every flag parsed and checked, and the training settings as one object.

Usage: `command, parsed = parse_command(argv)`: "train" with a Settings (`settings.config()` is config.json), or a
sub-command's name with its argparse namespace.
A value out of range is refused when it is parsed, in one sentence naming the flag, exit status 2. Nothing here
imports torch, so `--help` and every refusal answer at once.
"""
import argparse
import dataclasses
import math
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from lib.augment import INTENSITY, PADDING, Augment
from lib.errors import UserError
from lib.labels import CAM_TARGETS, SERIES_PATTERN


DESCRIPTION = "Pneumonia detector for pediatric chest X-rays: train, evaluate and explain a custom CNN."
# model.ARCHITECTURES' names, written here so that parsing loads no torch (tests/test_model_train.py checks they agree)
ARCHITECTURES = ("cnn", "resnet18")
SUB_COMMANDS = ("evaluate", "predict", "calibrate", "export")


class UsageError(UserError):
    """A problem the user can fix; printed as one sentence, exit status 2."""


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, unless there is none to show (None: the flag is required or optional)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-sentence errors: the flag, what it accepts, and where to read more; exit status 2.

    Abbreviated flags are off, so the flags a user typed can be told from the defaults (`given`).
    """

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def given(self, argv: list[str]) -> set[str]:
        """The destinations of the flags that appear in `argv`."""
        return {a.dest for a in self._actions for opt in a.option_strings for tok in argv
                if tok == opt or tok.startswith(opt + "=")}

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float | None = None, high: float | None = None, open_low: bool = False,
           open_high: bool = False):
    """An argparse type for an int or float within a range; refuses anything else with what it accepts."""
    what = "a whole number" if kind is int else "a number"
    if low is not None and high is not None:
        what += f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        what += f" {'>' if open_low else '>='} {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def threshold_policy(text: str) -> str:
    """--threshold: 'youden', 'sens=X' with X in (0, 1], or a probability in [0, 1]."""
    try:
        if text == "youden":
            return text
        value = float(text[5:]) if text.startswith("sens=") else float(text)
        if (0 < value <= 1) if text.startswith("sens=") else (0 <= value <= 1):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("expected youden, sens=X with X in (0, 1], or a probability in [0, 1], got "
                                     f"{text!r}")


def group_pattern(text: str) -> str:
    """--groups: a regular expression with at least one group, matched at the start of each file name."""
    try:
        compiled = re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"not a regular expression ({err}): {text!r}") from None
    if compiled.groups < 1:
        raise argparse.ArgumentTypeError(f"needs a (group) whose match names the film's group: {text!r}")
    return text


POSITIVE_INT, COUNT = number(int, 1), number(int, 0)
# numpy seeds run to 2**32 - 1, and ensemble member k adds 1000 k to the run's seed (train.member_seed)
SEED = number(int, 0, 2**31 - 1)
MAX_LR = 10.0  # 200x the default peak: above it a rate is a typo (1e308 overflowed a float in the first step)
MAX_IMAGE_SIZE = 1024  # the Kaggle originals are 0.5-2.8k px wide; the decode cache of a larger side fills memory


def build_parser() -> argparse.ArgumentParser:
    """The training command (the default): every flag with its default."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = Parser(prog="main.py", description=DESCRIPTION, formatter_class=fmt,
               epilog="Sub-commands: `main.py evaluate --help`, `main.py predict --help`, `main.py calibrate --help`, "
                      "`main.py export --help`. Data-parallel training on "
                      "N GPUs or CPU processes: `torchrun --standalone --nproc_per_node=N main.py [flags]`.")
    p.add_argument("--data", default="archive",
                   help="folder holding the unzipped Kaggle archive (any NORMAL/ and PNEUMONIA/ folders below it)")
    p.add_argument("--out", default=None, help="run folder (default runs/<YYYYmmdd-HHMMSS>); must not exist yet")
    p.add_argument("--split", choices=["patient", "random", "official"], default="patient",
                   help="patient: 70/15/15 grouped by child; random: image-level (leaky, for comparison); official: "
                        "the archive's test/ folder")
    p.add_argument("--threshold", type=threshold_policy, default="sens=0.95",
                   help="decision threshold policy, applied to validation: sens=X (the strictest threshold reaching "
                        "sensitivity X), youden, or a number")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed for the split, initialisation, shuffling and augmentation")
    p.add_argument("--task", choices=["pneumonia", "cause"], default="pneumonia",
                   help="pneumonia: normal vs pneumonia (one logit); cause: normal, bacterial or viral (three classes, "
                        "the cause read from Kaggle file names), whose P(bacterial)+P(viral) also gives the pneumonia "
                        "metrics")
    p.add_argument("--external", metavar="DIR", action="append", default=[],
                   help="labelled folder (DIR/**/{NORMAL,PNEUMONIA}/*) scored after the test split at the validation "
                        "threshold; repeatable")
    add_optimiser_flags(p)
    add_model_flags(p)
    add_runtime_flags(p)
    add_groups_flag(p)
    add_augment_flags(p)
    add_shared_flags(p, cache=True)
    return p


def add_optimiser_flags(p: argparse.ArgumentParser) -> None:
    """How long and how the network is fitted: SGD with OneCycle, the loss, early stopping, the weights kept."""
    p.add_argument("--epochs", type=POSITIVE_INT, default=25, help="maximum training epochs")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32,
                   help="training batch size; under torchrun the global batch, split evenly over the processes")
    p.add_argument("--lr", type=number(float, 0, MAX_LR, open_low=True), default=0.05,
                   help="peak learning rate of the OneCycle SGD schedule")
    p.add_argument("--momentum", type=number(float, 0, 1, open_low=True, open_high=True), nargs=2, default=[0.85, 0.95],
                   metavar=("AT_PEAK", "AT_ENDS"),
                   help="SGD's Nesterov momentum, cycled by OneCycle against the learning "
                        "rate: its value at the peak rate and at both ends")
    p.add_argument("--weight-decay", type=number(float, 0), default=5e-4, help="SGD weight decay (L2 penalty)")
    p.add_argument("--warmup", type=number(float, 0, 1, open_low=True, open_high=True), default=0.2,
                   help="share of the training steps over which OneCycle's learning rate rises to its peak (pct_start)")
    p.add_argument("--pos-weight", type=number(float, 0, open_low=True), default=0.6,
                   help="BCEWithLogitsLoss pos_weight for the PNEUMONIA class")
    p.add_argument("--label-smoothing", type=number(float, 0, 1, open_high=True), default=0.0,
                   help="training targets moved this far towards 0.5 (0 = off)")
    p.add_argument("--patience", type=COUNT, default=0,
                   help="stop after this many epochs of the low-learning-rate tail (below 10%% of the peak) in which "
                        "neither validation AUC nor loss improved; 0: train every epoch")
    p.add_argument("--keep", choices=["last", "best", "swa"], default="last",  # train.keep_weights
                   help="which weights a run keeps: last (the final epoch's, where OneCycle has annealed), best (the "
                        "epoch with the best validation AUC) or swa (the mean of the last --swa-epochs epochs' "
                        "weights, BatchNorm statistics recomputed)")
    p.add_argument("--swa-epochs", type=POSITIVE_INT, default=5,
                   help="with --keep swa: how many final epochs are averaged")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The network, its input size, and ensembles and test-time views of it."""
    p.add_argument("--ensemble", type=POSITIVE_INT, default=1,
                   help="train this many models one after the other on the same split, each from its own seed, and "
                        "score the mean of their logits")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: score the mean logit over fixed zoom and aspect views (threshold, "
                        "test, external sets, evaluate and predict alike); off by default: no gain over 5 seeds "
                        "(docs/generalisation.md)")
    p.add_argument("--image-size", type=number(int, 16, MAX_IMAGE_SIZE), default=128,
                   help="model input side in pixels (images are stored 10%% larger and edge-cropped)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="cnn",
                   help="network: cnn, the custom CNN (160 k parameters, 78 M multiply-adds at 128 px); resnet18, "
                        "torchvision's ResNet-18 from scratch with a one-channel stem (11 M, 566 M), the baseline "
                        "papers report")
    p.add_argument("--widths", type=POSITIVE_INT, nargs=3, default=[24, 48, 96],
                   help="channels of the custom CNN's three blocks (--arch cnn only)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """How the run executes (not what it computes, --seed aside): compilation, determinism, decode workers, resuming,
    the demo."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training steps (about 30 s to compile; on a CPU it needs a C++ compiler; "
                        "docs/performance.md)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU algorithms (slower), and --precision auto without timing (fp32 on a CPU), "
                        "so that a rerun computes alike")
    p.add_argument("--workers", type=POSITIVE_INT, default=None,
                   help="processes for the one-time decode; None uses every core")
    p.add_argument("--resume", metavar="RUN", default=None, help="continue the interrupted run in folder RUN")
    p.add_argument("--demo", action="store_true",
                   help="generate synthetic phantoms into the run folder and use them as data")
    p.add_argument("--demo-patients", type=POSITIVE_INT, default=60,
                   help="phantom patients per class for --demo (3 images each)")


def optimiser_defaults() -> dict:
    """The parser's momentum, weight decay and warm-up, as train.make_optimizer takes them (for benchmarks and
    tests, which then use the product's values without writing them again)."""
    d = build_parser().parse_args([])
    return {"momentum": tuple(d.momentum), "weight_decay": d.weight_decay, "warmup": d.warmup}


def add_augment_flags(p: argparse.ArgumentParser) -> None:
    """Training augmentation against acquisition shift (Augment); the defaults are the measured best."""
    d = Augment()
    g = p.add_argument_group("augmentation",
                             "drawn per training image, uniformly in +-range; see docs/generalisation.md")
    g.add_argument("--augment", choices=["full", "none"], default="full",
                   help="full: the settings below; none: the original project's rotation and crop only (ignores the "
                        "settings below)")
    g.add_argument("--rotation", type=number(float, 0, 180), default=d.rotation, help="rotation range in degrees")
    g.add_argument("--zoom", type=number(float, 0), default=d.zoom,
                   help="per-axis scale jitter: each axis scaled by [1/(1+z), 1+z], so size and aspect ratio change")
    g.add_argument("--translate", type=number(float, 0, 0.5), default=d.translate,
                   help="extra shift as a fraction of the side, beyond the random crop position")
    demo_note = "; None: {} on real data, 0 with --demo (phantoms have no exposure shift)"
    g.add_argument("--gamma", type=number(float, 0), default=None,
                   help="log-gamma range: x ** exp(+-g), black and white stay fixed" + demo_note.format(d.gamma))
    g.add_argument("--contrast", type=number(float, 0, 1, open_high=True), default=None,
                   help="contrast range around each image's mean: x (1 +- c)" + demo_note.format(d.contrast))
    g.add_argument("--brightness", type=number(float, 0, 1), default=None,
                   help="brightness range in [0, 1] grey units" + demo_note.format(d.brightness))
    g.add_argument("--noise", type=number(float, 0), default=d.noise,
                   help="std of added Gaussian noise in [0, 1] grey units")
    g.add_argument("--sharpness", type=number(float, 0, 1), default=d.sharpness,
                   help="blur/sharpen range: x + u (3x3 box blur - x), u in +-s")
    g.add_argument("--padding", choices=PADDING, default=d.padding,
                   help="fill outside the stored image (zeros paints black frames)")
    g.add_argument("--intensity", choices=INTENSITY, default="dataset",
                   help="dataset: normalise by the training split's mean/std; image: standardise each image by its "
                        "own (train and scoring alike)")


def add_groups_flag(p: argparse.ArgumentParser) -> None:
    """The shortcut audit's grouping rule for file names (DICOM files are also grouped by their headers)."""
    p.add_argument("--groups", metavar="REGEX", type=group_pattern, default=SERIES_PATTERN,
                   help="the shortcut audit's rates per group: this regular expression's first group, matched at the "
                        "start of each file name, names a film's group (the default: the Kaggle series, which follow "
                        "acquisition periods); DICOM files are also grouped by manufacturer, station, view, sex and "
                        "age band (docs/generalisation.md)")


def build_evaluate_parser() -> argparse.ArgumentParser:
    """`main.py evaluate`: score a checkpoint on labelled data."""
    p = Parser(prog="main.py evaluate", formatter_class=Defaults,
               description="Score a trained model on a labelled folder (DIR/**/{NORMAL,PNEUMONIA}/*) "
                           "or on the test rows of a run's split.csv, at the checkpoint's threshold.")
    p.add_argument("--checkpoint", required=True, help="best.pt of a finished run")
    p.add_argument("--data", required=True, help="labelled folder, or a run's split.csv (its test rows are scored)")
    p.add_argument("--out", default=None,
                   help="output folder (default: <checkpoint folder>/evaluate-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the bootstrap and the randomisation test")
    add_groups_flag(p)
    add_shared_flags(p, cache=True)
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    """`main.py predict`: probabilities for unlabelled images."""
    p = Parser(prog="main.py predict", formatter_class=Defaults,
               description="Pneumonia probability and label for images or folders of images. Any number of files: "
                           "they are scored a chunk at a time and predictions.csv grows as chunks finish; "
                           "`torchrun --nproc_per_node=N main.py predict ...` shares the chunks between N processes "
                           "(docs/scale-out.md).")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (none with --resume)")
    p.add_argument("--resume", metavar="OUT", default=None,
                   help="continue the interrupted predict whose output folder is OUT, with the files and flags it "
                        "started with (--quiet and --workers may change): chunks already scored are kept, and "
                        "predictions.csv ends identical to an uninterrupted run's")
    p.add_argument("--checkpoint", default=None, help="best.pt of a finished run (required)")
    p.add_argument("--out", default=None, help="output folder (default runs/predict-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--cam", action="store_true",
                   help="also write a Grad-CAM overlay per image (always for a single image)")
    p.add_argument("--strict", action="store_true",
                   help="leave images flagged as unlike the training films unscored, with the reason in the error "
                        "column")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per forward pass")
    p.add_argument("--workers", type=POSITIVE_INT, default=None,
                   help="processes for decoding; None uses every core (one per 8 files at most)")
    add_shared_flags(p, cache=False)
    return p


def build_calibrate_parser() -> argparse.ArgumentParser:
    """`main.py calibrate`: a checkpoint fitted to a new site's labelled sample."""
    p = Parser(prog="main.py calibrate", formatter_class=Defaults,
               description="Fit a trained model to a new site: choose its threshold on the site's own labelled "
                           "sample (DIR/**/{NORMAL,PNEUMONIA}/*), optionally re-estimate its BatchNorm statistics on "
                           "the site's images first, and write a new checkpoint; the source is never changed. "
                           "See docs/calibration.md.")
    p.add_argument("--checkpoint", required=True, help="best.pt of a finished run (or of an earlier calibration)")
    site = p.add_mutually_exclusive_group(required=True)
    site.add_argument("--data", help="the site's labelled folder: NORMAL/ and PNEUMONIA/ at any depth")
    site.add_argument("--unlabelled", metavar="DIR", nargs="+",
                      help="the site's unlabelled films (files or folders, predict's rules; names and folders are "
                           "never read as labels): the threshold comes from the distribution of their scores and "
                           "keeps the checkpoint's sensitivity target; refused where the scores do not show two "
                           "classes")
    p.add_argument("--threshold", type=threshold_policy, default=None,
                   help="threshold policy applied to the site sample: sens=X, youden or a number; default: the "
                        "checkpoint's own policy")
    p.add_argument("--adapt-bn", metavar="DIR", nargs="*", default=None,
                   help="re-estimate the BatchNorm statistics on the site's images first (AdaBN): the labelled "
                        "folder's, labels unused, plus any unlabelled folders named here")
    p.add_argument("--out", default=None,
                   help="output folder for the calibrated best.pt (default: <checkpoint "
                        "folder>/calibrate-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the bootstrap behind the expected rates")
    add_shared_flags(p, cache=True, cam=False)
    return p


def build_export_parser() -> argparse.ArgumentParser:
    """`main.py export`: a checkpoint as an ONNX graph and its metadata, for runtimes without PyTorch."""
    p = Parser(prog="main.py export", formatter_class=Defaults,
               description="Write model.onnx (uint8 images in; probability, logit, heatmap, out-of-distribution "
                           "distance and image checks out) and model.json (threshold, classes, input size, the "
                           "checks' limits) for a finished run's best.pt; examples/onnx_predict.py scores with them "
                           "without PyTorch. Needs `pip install -r requirements-export.txt`. See docs/export.md.")
    p.add_argument("--checkpoint", required=True, help="best.pt of a finished run (or of a calibration)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/export-<YYYYmmdd-HHMMSS>)")
    return p


def add_shared_flags(p: argparse.ArgumentParser, cache: bool, cam: bool = True) -> None:
    """Flags the commands share: the device, the Grad-CAM target (where maps are drawn), the decode cache and
    progress bars."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where to run: auto picks cuda, then mps, then the cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="arithmetic of the forward and backward passes: auto times the model in fp32 and in bf16 "
                        "autocast at start-up on a CPU and keeps bf16 only when it is over 10%% faster (bf16 on a "
                        "CUDA GPU that has bf16 units, else fp16 with loss scaling; fp16 can be asked for on CUDA "
                        "only); scoring a checkpoint, auto keeps the precision its "
                        "threshold was chosen at, so that its figures reproduce; weights stay fp32 either way")
    if cam:
        p.add_argument("--cam-target", choices=CAM_TARGETS, default="pneumonia",
                       help="class whose evidence Grad-CAM shows; bacterial and viral (each against the other) need a "
                            "--task cause model")
    if cache:
        p.add_argument("--cache-dir", default=default_cache_dir(), help="where decoded images are kept between runs")
        p.add_argument("--no-cache", action="store_true", help="decode every image afresh and keep nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


SUB_PARSERS = {"evaluate": build_evaluate_parser, "predict": build_predict_parser,
               "calibrate": build_calibrate_parser, "export": build_export_parser}


def parse_command(argv: list[str]) -> tuple[str, "Settings | argparse.Namespace"]:
    """The command and its parsed flags: training (flags only) or a sub-command (its name first). --help exits
    here; a refused flag or a word that is no sub-command raises UsageError or exits 2, in one sentence."""
    if argv[:1] and argv[0] in SUB_PARSERS:
        if launched_by_torchrun() and argv[0] != "predict":
            raise UsageError(f"{argv[0]} runs in one process: use `python main.py {argv[0]} ...`, not torchrun")
        parser = SUB_PARSERS[argv[0]]()
        parsed = parser.parse_args(argv[1:])
        if argv[0] == "predict":
            check_predict_resume(parsed, parser.given(argv[1:]))
        return argv[0], parsed
    if argv and not argv[0].startswith("-"):  # training takes flags only: a word first is a mistyped sub-command
        raise UsageError(f"'{argv[0]}' is not a sub-command; use {', '.join(SUB_COMMANDS[:-1])} or "
                         f"{SUB_COMMANDS[-1]} (each with --help), or flags alone to train")
    return "train", Settings.parse(argv)


def check_predict_resume(parsed: argparse.Namespace, given: set[str]) -> None:
    """predict scores files, or continues with --resume the ones it started with, by the flags it started with: a
    flag typed beside --resume (`given`, as training's resume reads them), other than --quiet and --workers, is
    refused, never silently dropped."""
    if bool(parsed.paths) == bool(parsed.resume):
        raise UsageError("predict takes image files or folders, or --resume OUT (which continues with the files it "
                         "started with), not both" if parsed.paths else
                         "predict needs image files or folders to score (or --resume OUT)")
    changed = sorted(given - {"resume", "quiet", "workers"})
    if parsed.resume and changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UsageError(f"--resume continues '{parsed.resume}' with the flags it started with, so {flags} cannot "
                         f"be given now; drop {'them' if len(changed) > 1 else 'it'}")


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (distributed.Context.active, read without importing torch)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def default_cache_dir() -> str:
    """Where decoded images are kept: $XDG_CACHE_HOME/pneumonia-cnn, else ~/.cache/pneumonia-cnn."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pneumonia-cnn")


def launcher() -> list[str]:
    """How this process was started, for the model card: python, or torchrun with its process count."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if not launched_by_torchrun():
        return ["python"]
    return ["torchrun", f"--nproc_per_node={local}"] + ([f"--nnodes={world // local}"] if world != local else [])


# the experiments that were measured and not adopted, with the value that meant "off": a run started with one on
# cannot be resumed by this version, which no longer has it (docs/generalisation.md names the commit that does)
REMOVED = {"debias": "none", "framing": 0.0, "counter_framing": 0.0, "cut_bottom": 0.0, "aspect": 0.0,
           "erase_corners": 0.0, "layout_swap": 0.0}
REMOVED_CHOICES = {"intensity": "equalise"}  # a choice that left while its flag stayed
# flags that change how a run executes, not what it computes: a resumed run takes them from the command line
RUNTIME_FLAGS = ("quiet", "device", "workers", "cache_dir", "no_cache", "compile", "precision")


@dataclass(frozen=True)
class Settings:
    """The training command's settings, resolved: built from the flags, saved as config.json, restored on --resume.

    The parser is the one source of defaults and ranges; this object only carries the values.
    """

    data: str
    out: str | None
    epochs: int
    batch_size: int
    lr: float
    momentum: tuple[float, float]
    weight_decay: float
    warmup: float
    pos_weight: float
    label_smoothing: float
    patience: int
    keep: str
    swa_epochs: int
    ensemble: int
    tta: bool
    image_size: int
    arch: str
    widths: tuple[int, int, int]
    split: str
    threshold: str  # the policy (sens=X, youden or a probability); the threshold it gives is the Scorer's number
    seed: int
    compile: bool
    deterministic: bool
    workers: int | None
    resume: str | None
    demo: bool
    demo_patients: int
    task: str
    external: tuple[str, ...]
    augment: str
    rotation: float
    zoom: float
    translate: float
    gamma: float
    contrast: float
    brightness: float
    noise: float
    sharpness: float
    padding: str
    intensity: str
    device: str
    precision: str
    cam_target: str
    groups: str
    cache_dir: str
    no_cache: bool
    quiet: bool
    given: frozenset = frozenset()  # the flags typed on the command line (not saved)
    command: str = ""  # the command line that started the run, for the model card

    @classmethod
    def parse(cls, argv: list[str]) -> "Settings":
        """Parse and check the training flags; unset intensity jitter takes its default (0 with --demo)."""
        parser = build_parser()
        values = vars(parser.parse_args(argv))
        # The phantoms' only finding is a brightness change and their 'scanner' never changes; with
        # intensity jitter the phantom model learns to compare the lungs with the heart and spine, and
        # the Grad-CAM maximum moves off the drawn lesions (docs/generalisation.md).
        for name in ("gamma", "contrast", "brightness"):
            if values[name] is None:
                values[name] = 0.0 if values["demo"] else getattr(Augment(), name)
        values["command"] = shlex.join([*launcher(), "main.py", *argv])
        if values["cam_target"] in ("bacterial", "viral") and values["task"] != "cause":
            parser.error(f"argument --cam-target: {values['cam_target']} needs --task cause")
        return cls.from_dict(values, given=frozenset(parser.given(argv)))

    @classmethod
    def from_dict(cls, values: dict, given: frozenset = frozenset()) -> "Settings":
        """Settings from parsed or saved values (lists become tuples, unknown keys of older runs are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"given"}
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
        # a run from before --arch (--groups) trained the CNN (grouped by series)
        return cls(**{"arch": "cnn", "groups": SERIES_PATTERN, **saved}, given=given)

    def config(self) -> dict:
        """What config.json holds: every setting that defines the run."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if k not in ("resume", "quiet", "given")}

    def resumed(self, saved: dict) -> "Settings":
        """The saved settings of the run in --resume, with the runtime flags given now.

        Any other flag given is refused, never silently dropped.
        """
        refused = sorted(self.given - {"resume", *RUNTIME_FLAGS})
        if refused:
            flags = ", ".join("--" + f.replace("_", "-") for f in refused)
            raise UsageError(f"--resume continues '{self.resume}' with the settings in its config.json, so {flags} "
                             f"cannot change now; drop {'them' if len(refused) > 1 else 'it'}, or start a new run")
        removed = [f"--{k.replace('_', '-')} {saved[k]}" for k, off in REMOVED.items() if saved.get(k, off) != off] + \
            [f"--{k} {gone}" for k, gone in REMOVED_CHOICES.items() if saved.get(k) == gone]
        if removed:
            raise UsageError(f"'{self.resume}' was started with {', '.join(removed)}, an experiment that left the "
                             f"product (docs/generalisation.md); resume it with the commit the docs name, or start a "
                             f"new run")
        runtime = {k: getattr(self, k) for k in (*RUNTIME_FLAGS, "resume")}
        # a key missing from an older config.json keeps today's default from the command line
        return Settings.from_dict({**self.config(), **saved, **runtime}, self.given)

    def augmentation(self) -> Augment:
        """The Augment the flags describe."""
        if self.augment == "none":
            return Augment.plain(self.rotation)
        return Augment(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Augment)})

    def model_config(self) -> dict:
        """What model.build makes the network from: the architecture, its outputs for the task, the CNN's widths."""
        outputs = 3 if self.task == "cause" else 1
        if self.arch == "cnn":
            return {"arch": "cnn", "widths": list(self.widths), "outputs": outputs}
        return {"arch": self.arch, "outputs": outputs}
