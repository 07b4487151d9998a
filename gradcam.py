"""Grad-CAM for the CNN (one model or an ensemble), with sanity checks and overlays.

Usage: `with GradCAM(model, model.cam_layer) as cam: maps = cam(x)`, or `compute_maps(members, x)`.
"""
import copy
import textwrap
import warnings
from contextlib import ExitStack
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # titles and legends carry file names: "$" is text, not TeX
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from lib import progress
from lib.labels import CLASSES
from lib.names import printable
from lib.transforms import centre_crop

LAYOUT = ("left", "right", "bottom", "top", "wspace", "hspace")  # a figure's subplot parameters


class GradCAM:
    """Owns one forward hook on `target_layer`; maps are N x H x W in [0, 1] for the chosen class.

    Gradients are taken with `torch.autograd.grad` on the hooked activation, so no tensor or backward
    hook is needed and the model's parameter `.grad` fields are left untouched. The model's train/eval
    mode is the caller's choice and is never changed here.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module):
        self.model, self.layer, self.handle, self.activation = model, target_layer, None, None

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.handle = self.activation = None
        return False  # never swallow an exception

    def _keep(self, module, inputs, output):
        self.activation = output

    def layer_maps(self, x: torch.Tensor, target: str = "pneumonia") -> torch.Tensor:
        """Un-normalised ReLU(sum_k w_k A_k) at the layer's resolution (N x h x w), for `target_score`."""
        if self.handle is None:
            raise RuntimeError("use GradCAM inside a `with` block")
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a graph exists even for a frozen model
            logits = self.model(x)
            grads = torch.autograd.grad(target_score(logits.float(), target).sum(), self.activation)[0]
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        return F.relu((weights * self.activation.detach().float()).sum(1))

    def __call__(self, x: torch.Tensor, target: str = "pneumonia") -> torch.Tensor:
        """Maps at the input's resolution, each scaled to [0, 1]; an all-zero map stays zero."""
        return upsample(self.layer_maps(x, target), x.shape[-2:])


def upsample(layer_maps: torch.Tensor, size) -> torch.Tensor:
    """Layer-resolution maps (N x h x w) brought to the input's `size`, each scaled to [0, 1]."""
    return normalise(F.interpolate(layer_maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0])


def target_score(logits: torch.Tensor, target: str) -> torch.Tensor:
    """The per-image score whose gradient Grad-CAM follows: a log-odds, so each target has an opposite.

    One logit: pneumonia is the logit, normal its negation. Three (normal, bacterial, viral): pneumonia
    is log((P(b) + P(v)) / P(n)), the same log-odds a one-logit model has; bacterial is the
    bacterial-vs-viral log-odds and viral its negation, so the two maps show where the evidence for
    one cause over the other lies, not the pneumonia both share.
    """
    if logits.ndim == 1:
        if target not in ("pneumonia", "normal"):
            raise ValueError(f"Grad-CAM target '{target}' needs a three-class (--task cause) model")
        return logits if target == "pneumonia" else -logits
    pneumonia = torch.logsumexp(logits[:, 1:], 1) - logits[:, 0]
    cause = logits[:, 1] - logits[:, 2]
    return {"pneumonia": pneumonia, "normal": -pneumonia, "bacterial": cause, "viral": -cause}[target]


def normalise(cam: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] by its own min and max; a flat map becomes zeros, never NaN."""
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    span = hi - lo
    return torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))


def members_of(models) -> list[nn.Module]:
    """A model or a list of them (an ensemble's members) as a list."""
    return list(models) if isinstance(models, (list, tuple)) else [models]


def ensemble_layer_maps(models, x: torch.Tensor, target: str = "pneumonia") -> torch.Tensor:
    """Un-normalised maps at the layer's resolution of one model, or of an ensemble: the members' mean.

    An ensemble decides on its members' mean logit, whose gradient at a member's layer is that member's
    own divided by K; summed over the members' layers, its Grad-CAM is the mean of their maps.
    """
    with ExitStack() as stack:
        cams = [stack.enter_context(GradCAM(m, m.cam_layer)) for m in members_of(models)]
        return torch.stack([cam.layer_maps(x, target) for cam in cams]).mean(0)


def compute_maps(models, x: torch.Tensor, target: str = "pneumonia", batch_size: int = 64) -> np.ndarray:
    """Grad-CAM maps of a whole set in batches (one model or an ensemble), as a float32 array N x H x W."""
    out = [upsample(ensemble_layer_maps(models, x[start:start + batch_size], target), x.shape[-2:]).cpu()
           for start in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)


# ---------------------------------------------------------------- sanity checks
def _reset(module: nn.Module, seed: int) -> None:
    """Re-initialise every layer in `module` (weights, and batch-norm running statistics).

    The seed is applied inside `fork_rng`, so the caller's random-number state is left as it was.
    """
    device = next(module.parameters(), torch.empty(0)).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps; a flat map shares no structure, so it scores 0."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel())[0])


def randomisation_test(models, x: torch.Tensor, seed: int = 0,
                       warn_above: float = 0.5) -> tuple[dict, list[np.ndarray]]:
    """Adebayo et al.'s cascading model-parameter randomisation test for Grad-CAM (one model or an ensemble).

    Layers are re-initialised from the output back to the input (in every member of an ensemble);
    after each step the maps of the same images are compared, at the layer's resolution, with the
    trained model's by Spearman rank correlation. Maps that survive full randomisation do not depend
    on what the model learned. Returns the result and the maps after each stage (the trained model's first).
    """
    def maps(ms):
        return ensemble_layer_maps(ms, x).cpu().numpy()

    models = members_of(models)
    trained = maps(models)
    randomised = [copy.deepcopy(m) for m in models]
    stages = [name for name, _ in models[0].named_children()][::-1]
    medians, examples = [], [trained]
    for i, name in enumerate(stages):
        for k, member in enumerate(randomised):
            _reset(getattr(member, name), seed + i + 100 * k)
        current = maps(randomised)
        examples.append(current)
        medians.append(float(np.median([_rank_corr(a, b) for a, b in zip(trained, current)])))
    result = {"stages": stages, "median_spearman": medians, "fully_randomised_median_spearman": medians[-1],
              "images": int(len(x)), "passed": medians[-1] <= warn_above}
    if not result["passed"]:
        warnings.warn(f"Grad-CAM maps of a fully randomised model still correlate with the trained model's "
                      f"(median Spearman {medians[-1]:.2f} > {warn_above}): the heatmaps may not reflect what the "
                      f"model learned")
    return result, examples


def _frame(shape: tuple[int, int], frame: float) -> np.ndarray:
    """True on the outer `frame` of an image of that shape."""
    h, w = shape
    dh, dw = int(round(h * frame)), int(round(w * frame))
    inner = np.zeros((h, w), bool)
    inner[dh:h - dh, dw:w - dw] = True
    return ~inner


def border_shares(maps: np.ndarray, frame: float = 0.10) -> np.ndarray:
    """Per map, its share of CAM mass in the outer `frame`; NaN for an all-zero map."""
    total = maps.reshape(len(maps), -1).sum(1)
    share = maps[:, _frame(maps.shape[-2:], frame)].sum(1) / np.maximum(total, 1e-12)
    return np.where(total > 0, share, np.nan)


def border_mass(maps: np.ndarray, frame: float = 0.10, shares: np.ndarray | None = None) -> dict:
    """Share of CAM mass in the outer `frame` of the image (markers and text sit there) against its area.

    `shares` (from border_shares, gathered batch by batch) stands in for the maps of a large set.
    """
    shares = border_shares(maps, frame) if shares is None else shares
    valid = ~np.isnan(shares)
    return {"border_mass_share": float(shares[valid].mean()) if valid.any() else float("nan"),
            "border_area_share": float(_frame(maps.shape[-2:], frame).mean()), "frame": frame,
            "images": int(valid.sum())}


def _localise(cam: np.ndarray, mask: np.ndarray) -> tuple[bool, float, float] | None:
    """(maximum inside the lesion, CAM mass inside it, its area) of one map; None without a map or a lesion."""
    if cam.max() <= 0 or not mask.any():
        return None
    return bool(mask.flat[int(np.argmax(cam))]), float(cam[mask].sum() / cam.sum()), float(mask.mean())


def localisation(maps: np.ndarray, masks: np.ndarray, found: list | None = None) -> dict:
    """Pointing game (is the CAM maximum inside the lesion?) and the CAM mass inside lesions vs their area.

    `found` (_localise's results, gathered batch by batch) stands in for the maps and masks of a large set.
    """
    found = [r for r in (found if found is not None else map(_localise, maps, masks)) if r is not None]
    hits, mass, area = ([r[k] for r in found] for k in range(3))
    n = len(hits)
    return {"pointing_game": float(np.mean(hits)) if n else float("nan"), "images": n,
            "mass_in_lesions": float(np.mean(mass)) if n else float("nan"),
            "lesion_area": float(np.mean(area)) if n else float("nan"),
            "mass_ratio": float(np.mean(mass) / np.mean(area)) if n else float("nan")}


# ---------------------------------------------------------------- pictures
def _show(ax, image, cam=None, alpha=0.45):
    ax.imshow(image, cmap="gray")
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    ax.set_axis_off()


def _texts(fig) -> list[matplotlib.text.Text]:
    """Every text `fig` draws. Not fig.findobj: it makes the ticks of every hidden axis too, a fifth of a grid's
    drawing time, and a hidden axis draws none of them."""
    texts = list(fig.texts) + [t for legend in fig.legends for t in legend.get_texts()]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                texts += [axis.label, axis.get_offset_text(), *axis.get_ticklabels(which="both")]
    return texts


def printable_text(fig) -> None:
    """Every title, label and legend entry of `fig` with its names printable: a byte that is not UTF-8 has no glyph
    and stops FreeType, a control character draws as a box (names.printable)."""
    for text in _texts(fig):
        text.set_text(printable(text.get_text()))


def _rooms(fig) -> list[tuple[matplotlib.text.Text, float]]:
    """Each title, caption and legend entry of `fig` with the width in pixels it may take: an axes' own width for
    its title, x label and legend (a neighbour's title sits beside it), nearly the figure's for the figure's title."""
    rooms = [(text, 0.96 * fig.bbox.width) for text in fig.texts]
    for ax in fig.axes:
        width = ax.bbox.width
        rooms += [(t, width) for t in (ax.title, ax._left_title, ax._right_title, ax.xaxis.label)]
        if ax.get_legend():
            rooms += [(t, 0.8 * width) for t in ax.get_legend().get_texts()]
    return [(t, room) for t, room in rooms if t.get_visible() and t.get_text().strip()]


def fit_words(fig) -> None:
    """Wrap every title, caption and legend entry that would run past its room at word boundaries, then lay the
    figure out again with room for the taller text: no word is clipped at the canvas edge."""
    for ax in fig.axes:
        if not ax.axison:  # else matplotlib lays out each hidden axis's ticks to place every title, twice a picture
            ax.xaxis.set_visible(False)
            ax.yaxis.set_visible(False)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    wrapped = False
    for text, room in _rooms(fig):
        for _ in range(3):  # the estimate of characters per line is refined with the wrapped text's own width
            box = text.get_window_extent(renderer)
            lines = text.get_text().split("\n")
            if box.width <= room:
                break
            chars = max(8, int(max(map(len, lines)) * room / box.width) - 1)
            text.set_text("\n".join(textwrap.fill(line, chars) for line in lines))
            wrapped = True
    if wrapped:  # the layout above already fits text that was not changed
        fig.tight_layout()


def write_figure(fig, path, dpi: int) -> None:
    """Every figure's last step (evaluate's too): its names made printable, its words fitted, saved as a PNG at zlib
    level 3. Re-encoding a real run's 18 figures took 0.42-0.48 s at 3 against 1.06 s at PIL's default 6, for 12%
    more bytes (level 1: 0.33-0.42 s, 21% more); report.html carries every one."""
    printable_text(fig)
    fit_words(fig)
    fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 3})


def _draw(fig, path, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    write_figure(fig, path, dpi=100)


def _save(fig, path, title: str) -> None:
    _draw(fig, path, title)
    plt.close(fig)


def save_overlay(image: np.ndarray, cam: np.ndarray, title: str, path) -> None:
    """Image, heatmap and both blended, side by side, with a title line."""
    save_overlay_files([(image, cam, title, path)])


def save_overlay_files(films) -> None:
    """save_overlay of each (image, heatmap, title, path) of `films`, into one figure drawn again for each: making
    its three axes is a third of an overlay's time. The layout starts from matplotlib's defaults every time, as a
    new figure's does, so each PNG is the one a figure of its own gives (tight_layout run from another film's
    layout would move every axis by a pixel)."""
    fig = axes = None
    try:
        for image, cam, title, path in films:
            if fig is not None and axes[0].images[0].get_array().shape != np.shape(image):
                plt.close(fig)  # a film of another size: a figure of its own, whose axes fit it
                fig = None
            if fig is None:
                fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
                _show(axes[0], image)
                axes[1].imshow(cam, cmap="jet", vmin=0, vmax=1)
                axes[1].set_axis_off()
                _show(axes[2], image, cam)
            else:
                grey, heat, (under, over) = axes[0].images[0], axes[1].images[0], axes[2].images
                for shown, data in ((grey, image), (heat, cam), (under, image), (over, cam)):
                    shown.set_data(data)
                grey.autoscale()  # the grey scale spans each film's own range; the heatmap's is fixed at 0-1
                under.autoscale()
                fig.subplots_adjust(**{k: plt.rcParams[f"figure.subplot.{k}"] for k in LAYOUT})
            for ax, name in zip(axes, ("image", "Grad-CAM", "overlay")):
                ax.set_title(name, fontsize=8)
            _draw(fig, path, title)
    finally:
        if fig is not None:
            plt.close(fig)


def save_grid(images, cams, titles, path, columns: int = 4, *, suptitle: str = "") -> None:
    """One picture of many overlays."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, cam, title in zip(axes.flat, images, cams, titles):
        _show(ax, image, cam)
        ax.set_title(title, fontsize=7)
    _save(fig, path, suptitle)


def save_picked(scorer, images: torch.Tensor, titles: list[str], path: Path, suptitle: str = "") -> None:
    """The Grad-CAM overlays of a few chosen uint8 films (N x 1 x S x S), one grid."""
    _, maps, shown = _maps(scorer, images)
    save_grid(shown, maps, titles, path, suptitle=suptitle)


def save_randomisation_figure(images, examples, stages, medians, path) -> None:
    """Rows of images, columns from the trained maps to the fully randomised ones."""
    n = min(4, len(images))
    cols = ["trained"] + [f"-{s}\nrho {m:.2f}" for s, m in zip(stages, medians)]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.7 * len(cols), 1.8 * n), squeeze=False)
    for r in range(n):
        for c, maps in enumerate(examples):
            axes[r, c].imshow(maps[r], cmap="jet")
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=7)
    _save(fig, path, "Cascading randomisation: maps should degrade as layers are re-initialised")


def _maps(scorer, images: torch.Tensor, target: str | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Model input, Grad-CAM maps (for `target`, else the scorer's) and the [0, 1] crop the model saw, of a uint8 batch.

    The maps explain the plain centre view, also when test-time augmentation scores more views.
    """
    x = scorer.predictor.model_input(images)
    maps = compute_maps(scorer.predictor.members, x, target or scorer.cam_target)
    return x, maps, scorer.predictor.prep.crop(images).numpy()[:, 0]


def explain(scorer, images: torch.Tensor, y_true: np.ndarray, y_prob: np.ndarray, out: Path, *, note: str = "",
            masks: np.ndarray | None = None, show: bool = False) -> dict:
    """Grad-CAM overlays per outcome, the grid, border mass, randomisation test and (phantoms) localisation.

    `scorer` (an evaluate.Scorer) gives the predictor, threshold, target and seed. Every image's map
    is computed once, a batch at a time; only the drawn images' maps are kept.
    """
    s, prep = scorer, scorer.predictor.prep
    y_pred = (y_prob >= s.threshold).astype(int)
    outcome = np.where(y_true == 1, np.where(y_pred == 1, "TP", "FN"), np.where(y_pred == 1, "FP", "TN"))
    picks = [i for kind in ("TP", "TN", "FP", "FN") for i in np.flatnonzero(outcome == kind)[:4]]
    drawn, shares, located = {}, [], []
    bar = progress.track(len(images), "Grad-CAM maps", "images", show)
    for start in range(0, len(images), 512):  # a batch at a time: a large test set never sits in memory
        batch = slice(start, start + 512)
        _, maps, _ = _maps(s, images[batch])
        shares.append(border_shares(maps))
        drawn.update({i: maps[i - start] for i in picks if start <= i < start + 512})
        if masks is not None:
            hit = outcome[batch] == "TP"
            located += map(_localise, maps[hit], centre_crop(masks[batch], prep.image_size)[hit])
        bar.update(len(maps))
    bar.close()
    _draw_outcomes(scorer, images, picks, drawn, outcome, y_true=y_true, y_prob=y_prob, out=out, note=note)
    members = s.predictor.members
    result = {"target": s.cam_target, "layer": members[0].cam_layer_name, "members": len(members),
              "border": border_mass(maps, shares=np.concatenate(shares))}
    first = images[:min(32, len(images))]
    result["randomisation"], stages = randomisation_test(members, s.predictor.model_input(first), s.seed)
    save_randomisation_figure(prep.crop(first).numpy()[:, 0], stages, result["randomisation"]["stages"],
                              result["randomisation"]["median_spearman"], out / "gradcam_randomisation.png")
    if masks is not None:
        result["localisation"] = localisation(None, None, located)
    return result


def _draw_outcomes(scorer, images, picks: list[int], maps: dict, outcome: np.ndarray, *, y_true: np.ndarray,
                   y_prob: np.ndarray, out: Path, note: str) -> None:
    """Two full-size overlays per outcome (TP, TN, FP, FN) into out/gradcam/, and the grid of up to four each."""
    (out / "gradcam").mkdir(exist_ok=True)
    shown = scorer.predictor.prep.crop(images[picks]).numpy()[:, 0] if picks else []

    def describe(i):
        return f"{outcome[i]} p={y_prob[i]:.2f} true={CLASSES[y_true[i]]}"

    two_each = [k for kind in ("TP", "TN", "FP", "FN")
                for k in [k for k, i in enumerate(picks) if outcome[i] == kind][:2]]
    save_overlay_files((shown[k], maps[picks[k]], describe(picks[k]) + note,
                        out / "gradcam" / f"{outcome[picks[k]]}_{picks[k]:04d}.png") for k in two_each)
    save_grid(shown, [maps[i] for i in picks], [describe(i) for i in picks], out / "gradcam_grid.png",
              suptitle=f"Grad-CAM ({scorer.cam_target} evidence), up to 4 per outcome{note}")


def overlay_path(out: Path, row: int, file: str) -> Path:
    """Where predict writes the Grad-CAM overlay of its `row`-th file."""
    return out / f"{row:05d}_{Path(file).stem}_cam.png"


def save_overlays(scorer, batch: torch.Tensor, prob: np.ndarray, files: list[str], out: Path,
                  *, rows: list[int]) -> None:
    """One Grad-CAM overlay per predicted image (of predict's `rows`), named after its file (overlay_path)."""
    s = scorer
    _, maps, shown = _maps(s, batch)
    save_overlay_files((shown[i], maps[i], f"{Path(f).name}: p(pneumonia)={prob[i]:.3f} ({s.cam_target} evidence)",
                        overlay_path(out, row, f)) for i, (f, row) in enumerate(zip(files, rows)))


def explain_causes(scorer, images: torch.Tensor, causes: np.ndarray, classes: np.ndarray, out: Path,
                   *, note: str = "") -> dict:
    """Bacterial and viral evidence side by side on the same pneumonia images (correctly classified ones
    first), and the border mass of each kind of map over every pneumonia image of the set."""
    s = scorer
    pneumonia = np.flatnonzero(causes > 0)
    x, bacterial, shown = _maps(s, images[pneumonia], "bacterial")
    maps = {"bacterial": bacterial, "viral": compute_maps(s.predictor.members, x, "viral")}
    right = causes[pneumonia] == classes[pneumonia].argmax(1)  # the most probable of the three classes
    # four images of each cause, correctly classified ones first
    picks = [i for c in (1, 2) for i in sorted(np.flatnonzero(causes[pneumonia] == c), key=lambda i: not right[i])[:4]]
    if picks:
        fig, axes = plt.subplots(len(picks), 3, figsize=(6.6, 2.3 * len(picks)), squeeze=False)
        for row, i in enumerate(picks):
            p = classes[pneumonia[i]]
            title = f"true {('bacterial', 'viral')[causes[pneumonia[i]] - 1]}: P(b)={p[1]:.2f} P(v)={p[2]:.2f}"
            for col, (cam, label) in enumerate([(None, title), (maps["bacterial"][i], "bacterial evidence"),
                                                (maps["viral"][i], "viral evidence")]):
                _show(axes[row, col], shown[i], cam)
                axes[row, col].set_title(label, fontsize=7)
        _save(fig, out / "gradcam_cause_pairs.png", f"Grad-CAM: bacterial vs viral evidence{note}")
    return {t: border_mass(m) for t, m in maps.items()}
