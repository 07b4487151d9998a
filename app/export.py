"""ONNX export: a best.pt as one graph from uint8 images to probability, logit, heatmap, distance and image checks.

Usage: `python main.py export --checkpoint runs/X/best.pt [--out DIR]` writes DIR/model.onnx and DIR/model.json;
`examples/onnx_predict.py` scores with them without PyTorch. The graph takes what predict feeds the network before
its centre crop (N x 1 x S x S uint8, S = 1.1 x the model's side); the crop, the normalisation, the ensemble's mean
logit, the heatmap and the out-of-distribution distance run inside it. The heatmap is the class activation map at
the Grad-CAM layer: behind global average pooling and one linear layer, Grad-CAM's weights are the linear weights
(times the softmax slope for a three-class model), so the map needs no autograd and survives export.
"""
import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lib import infer
from lib import ood
from lib import runs
from lib.errors import UserError
from lib.images import MAX_ASPECT, cache_size
from lib.labels import CAUSES, CLASSES, DEMO_CHECKPOINT
from lib.transforms import Preprocess

OPSET = 18
PACKAGES = ("onnx", "onnxscript")  # torch.onnx's exporter needs both; the runtime needs onnxruntime only
INSTALL = "pip install -r requirements-export.txt"


class ExportError(UserError):
    """What cannot be exported, in one sentence."""


class Graph(nn.Module):
    """The exported computation: every member of an ensemble, its detector's distance and the image checks."""

    def __init__(self, members: list[nn.Module], prep: Preprocess, detector: dict | None):
        super().__init__()
        self.members, self.prep = nn.ModuleList(members), prep
        self.three_classes = members[0].outputs == 3
        fits = detector["members"] if detector else []
        self.with_distance = bool(fits)
        for k, fit in enumerate(fits):  # float64, as ood.mahalanobis computes it
            self.register_buffer(f"means{k}", torch.as_tensor(fit["means"], dtype=torch.float64))
            self.register_buffer(f"precision{k}", torch.as_tensor(fit["precision"], dtype=torch.float64))
        orientation = detector["orientation"] if detector else None
        self.with_orientation = orientation is not None
        if orientation is not None:
            self.register_buffer("turn_coef", torch.as_tensor(orientation["coef"], dtype=torch.float64))
            self.register_buffer("turn_intercept", torch.as_tensor(orientation["intercept"], dtype=torch.float64))

    def outputs(self) -> list[str]:
        """The graph's output names, in order."""
        names = ["probability", "logit", "heatmap", "grey_level", "statistics"]
        names += ["class_probabilities"] if self.three_classes else []
        names += ["distance"] if self.with_distance else []
        return names + (["turn_probabilities"] if self.with_orientation else [])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.prep.eval(images)
        logits, maps, distances = [], [], []
        for k, member in enumerate(self.members):
            layer = member.trunk(x)  # N x D x h x w at the Grad-CAM layer
            pooled = layer.mean((2, 3))
            linear = member.head[-1]
            logit = linear(pooled)
            maps.append(F.relu(torch.einsum("nd,ndhw->nhw", cam_weights(logit, linear.weight), layer)) /
                        (layer.shape[2] * layer.shape[3]))
            logits.append(logit.squeeze(1) if not self.three_classes else logit)
            if self.with_distance:
                distances.append(mahalanobis(pooled.double(), getattr(self, f"means{k}"),
                                             getattr(self, f"precision{k}")))
        logit = torch.stack(logits).mean(0)
        if self.three_classes:
            classes = torch.softmax(logit, 1)
            out = [classes[:, 1:].sum(1), logit, torch.stack(maps).mean(0), *self.checks(images), classes]
        else:
            out = [torch.sigmoid(logit), logit, torch.stack(maps).mean(0), *self.checks(images)]
        if self.with_distance:
            out.append(torch.stack(distances).mean(0).float())
        if self.with_orientation:
            out.append(turn_probabilities(images[:, 0], self.turn_coef, self.turn_intercept))
        return tuple(out)

    def checks(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The model-free checks: the mean grey level the model sees, and contrast, entropy and edge density."""
        grey = self.prep.crop(images).mean((1, 2, 3))
        return [grey, image_statistics(images[:, 0])]


def cam_weights(logit: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's channel weights (N x D) for the pneumonia score behind a linear head, times the map's area.

    One logit: the score is the logit, whose gradient at each pooled channel is the linear weight. Three: the
    score is log((P(b) + P(v)) / P(n)) (gradcam.target_score), whose gradient at the logits is (-1, P(b), P(v))
    with P(b) + P(v) renormalised to 1, carried through the weights.
    """
    if weight.shape[0] == 1:
        return weight[0].expand(logit.shape[0], -1)
    cause = torch.softmax(logit[:, 1:], 1)
    slope = torch.cat([-torch.ones_like(logit[:, :1]), cause], 1)
    return slope @ weight


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Each row's distance to the nearest class mean (ood.mahalanobis)."""
    diffs = features[:, None, :] - means[None]
    squared = ((diffs @ precision) * diffs).sum(-1)
    return torch.sqrt(torch.clamp(squared.min(1).values, min=0.0))


def image_statistics(images: torch.Tensor) -> torch.Tensor:
    """ood.image_statistics in tensor operations: contrast, 32-bin entropy and edge density (N x 3)."""
    grey = images[:, ::2, ::2]
    x = grey.float() / 255.0
    flat = x.flatten(1)
    bins = torch.div(grey.flatten(1).long(), 8, rounding_mode="floor")
    counts = F.one_hot(bins, 32).float().mean(1)
    entropy = -(counts * torch.log2(counts.clamp_min(1e-30))).sum(1)
    edges = ((x[:, 1:] - x[:, :-1]).abs().mean((1, 2)) + (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))) / 2
    return torch.stack([flat.std(1, unbiased=False), entropy, edges], 1)


def turn_probabilities(images: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """The orientation check's class probabilities (upright, 90, 180, 270 degrees) from 16 x 16 thumbnails."""
    x = images[:, ::2, ::2].float()
    n, s = x.shape[0], x.shape[-1] // 16 * 16
    thumbs = x[:, :s, :s].reshape(n, 16, s // 16, 16, s // 16).mean((2, 4)).reshape(n, -1) / 255.0
    return torch.softmax(thumbs.double() @ coef.T + intercept, 1).float()


def check_packages() -> None:
    """Refuse in one sentence, naming the install command, when the export packages are missing."""
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"export needs the package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}, "
                          f"which {'are' if len(missing) > 1 else 'is'} not installed: {INSTALL}")


def graph_of(ckpt: dict, path: str) -> Graph:
    """The Graph a best.pt describes, or ExportError for what cannot be exported."""
    if ckpt.get("tta"):
        raise ExportError(f"'{path}' averages test-time views (--tta), which the exported graph does not; "
                          f"export a model trained without --tta")
    models, prep = infer.load_models(ckpt, torch.device("cpu"))
    models = [m.to(memory_format=torch.contiguous_format).float().eval() for m in models]
    if not all(hasattr(m, "trunk") and isinstance(m.head[-1], nn.Linear) for m in models):
        raise ExportError(f"'{path}' holds a network without a pooled linear head; only such a network's heatmap "
                          f"can be written into the graph")
    return Graph(models, prep, ckpt.get("ood")).eval()


def prepare(checkpoint: str) -> tuple[dict, Graph]:
    """The checkpoint and its graph, or one sentence for why it cannot be exported (before any folder is made)."""
    check_packages()
    ckpt = runs.read_checkpoint(checkpoint)
    return ckpt, graph_of(ckpt, checkpoint)


def write(checkpoint: str, out: Path, prepared: tuple[dict, Graph] | None = None) -> dict:
    """model.onnx and model.json for `checkpoint` in `out` (from `prepared`, its `prepare`, when given); returns
    model.json's content."""
    ckpt, graph = prepared or prepare(checkpoint)
    side = cache_size(graph.prep.image_size)
    example = torch.zeros(2, 1, side, side, dtype=torch.uint8)
    started = time.perf_counter()
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(graph, (example,), str(out / "model.onnx"), input_names=["images"],
                      output_names=graph.outputs(), opset_version=OPSET, dynamo=True, external_data=False,
                      dynamic_shapes={"images": {0: batch}}, verbose=False)
    seconds = time.perf_counter() - started
    meta = describe(ckpt, graph, checkpoint, side)
    meta["export"] = {"seconds": round(seconds, 1), "bytes": (out / "model.onnx").stat().st_size, "opset": OPSET}
    runs.write_json(out / "model.json", meta)
    return meta


def describe(ckpt: dict, graph: Graph, checkpoint: str, side: int) -> dict:
    """What a runtime needs beside the graph: the threshold, the classes, the input and the checks' limits."""
    detector = ckpt.get("ood") or {}
    return {
        "format": 1,
        "threshold": float(ckpt["threshold"]), "threshold_policy": ckpt.get("threshold_policy"),
        # a --demo checkpoint: the runtime writes this beside every call, as predict does
        "note": f"model {DEMO_CHECKPOINT}" if ckpt.get("config", {}).get("demo") else None,
        "classes": list(CAUSES if graph.three_classes else CLASSES),
        "positive_class": "PNEUMONIA",
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 1, side, side], "side": side,
                  "model_side": graph.prep.image_size,
                  "decode": "grayscale (Pillow's convert('L'); 16-bit stretched over its own range; a colour JPEG's "
                            "Y channel), EXIF orientation applied, then the whole image resized to side x side with "
                            "Pillow's bilinear filter, aspect ratio not kept; JPEGs decoded with draft((2 side, "
                            "2 side)) first; DICOM: modality LUT, VOI LUT or window, MONOCHROME1 inverted"},
        "outputs": graph.outputs(),
        "heatmap": {"layer": graph.members[0].cam_layer_name, "target": "pneumonia",
                    "meaning": "Grad-CAM's map at the layer's resolution before upsampling and normalising (each "
                               "member's class activation map, mean over members)"},
        "checks": {"grey_range": list(graph.prep.grey_range) if graph.prep.grey_range else None,
                   "statistics": list(ood.STAT_NAMES), "statistics_low": detector.get("stat_low"),
                   "statistics_high": detector.get("stat_high"), "near_constant": ood.NEAR_CONSTANT,
                   "distance_threshold": detector.get("threshold") if graph.with_distance else None,
                   "turned_above": (detector.get("orientation") or {}).get("flag_above"),
                   "turned": {str(k): v for k, v in ood.TURNED.items()},
                   "colour_limit": ood.COLOUR_LIMIT, "max_aspect": MAX_ASPECT},
        "source": {"checkpoint": str(checkpoint), "sha256": runs.file_sha256(checkpoint),
                   "members": len(graph.members)},
        "versions": runs.versions(),
    }
