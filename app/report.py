"""What a person reads: report.html, MODEL_CARD.md and the terminal summary, all from metrics.json figures.

Usage: `write_report(run_dir, title, config, metrics)`, `write_model_card(...)`, `terminal_summary(...)`.
Every table goes through one builder (`Table`), rendered as text, HTML or Markdown. The page embeds its
images as data URIs: no network, no JavaScript. Kept apart from evaluate.py, which computes and draws.
"""
import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluate import BOOTSTRAP_RESAMPLES, FIGURES, METRICS, Figure, call_of, flag_summary, spread
from lib.labels import CAUSES, CLASSES
from model import ARCHITECTURES
from lib.names import code, printable
from lib.runs import write_text

STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1180px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:24px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:30px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td.l,th.l{text-align:left}.warn{background:#fff3cd;padding:8px 12px;
border-left:4px solid #e0a800}.ok{color:#17692f}.bad{color:#b00020;font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{max-width:560px;width:100%;border:1px solid #eee}
img.wide{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;padding:8px;width:272px;box-sizing:border-box}
.card .pics{display:flex;flex-wrap:wrap;gap:4px}.card img{width:128px;height:128px}
.card img.cam{width:100%;height:auto}
.card p{margin:4px 0;overflow-wrap:anywhere}.card .name{font-family:monospace;font-size:13px}.card .why{font-size:13px}
table{max-width:100%;overflow-x:auto;display:block}img{max-width:100%;height:auto}
h1,h2,p,li,summary{overflow-wrap:anywhere}"""


def write_page(out_dir: Path, title: str, body: list[str]) -> Path:
    """report.html from its sections: one self-contained page, no network, no JavaScript."""
    body = [*body, "<p><em>A research tool, not a medical device: not clinically validated.</em></p>"]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    path = out_dir / "report.html"
    write_text(path, page)
    return path


def _img(path: Path, wide: bool = False) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="{"wide" if wide else ""}" alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------- tables: one builder, three renderings
@dataclass
class Table:
    """Rows of text cells under a header, rendered as plain text, HTML or Markdown: the first column and the last
    `prose` columns (words, not figures) left-aligned, the figures between them right-aligned."""

    header: list[str]
    rows: list[list[str]]
    prose: int = 0

    def _left(self, i: int) -> bool:
        return i == 0 or i >= len(self.header) - self.prose

    def text(self) -> str:
        widths = [max(len(r[i]) for r in [self.header, *self.rows]) for i in range(len(self.header))]
        return "\n".join("  ".join(c.ljust(w) if self._left(i) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                         for r in [self.header, *self.rows])

    def html(self) -> str:
        def cells(row, tag):
            return "".join(f"<{tag}{' class=l' if self._left(i) else ''}>{html.escape(c)}</{tag}>"
                           for i, c in enumerate(row))
        rows = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in self.rows)
        return f"<table><tr>{cells(self.header, 'th')}</tr>{rows}</table>"

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |",
                 "|" + "".join("---|" if self._left(i) else "---:|" for i in range(len(self.header)))]
        # a name in a cell may hold a pipe, which would split the cell
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows])


def interval(ci, digits: int = 3) -> str:
    """A 95% interval as 'lo - hi'."""
    return f"{ci[0]:.{digits}f} - {ci[1]:.{digits}f}"


def figure_value(m: dict, f: Figure) -> str:
    """A figure of one set's rates as written in every table; a dash where the set lacks it (an older run)."""
    value = m.get(f.key)
    return "-" if value is None else f"{value:.{f.digits}f}"


def figure_interval(m: dict, f: Figure) -> str:
    """The figure's 95% interval, or '' where it has none (or the set, from an older run, does not hold it)."""
    ci = m.get("ci95", {}).get(f.key)
    return "" if ci is None else interval(ci, f.digits)


def metric_table(m: dict) -> Table:
    """One scored set: each of FIGURES, its value and its 95% interval."""
    return Table(["metric", "value", "95% CI"], [[f.label, figure_value(m, f), figure_interval(m, f)] for f in FIGURES])


def sets_table(sets: dict[str, dict]) -> Table:
    """Several scored sets side by side (test split and external folders): each of FIGURES with its interval."""
    def cell(m: dict, f: Figure) -> str:
        ci = figure_interval(m, f)
        return figure_value(m, f) + (f" ({ci})" if ci else "")
    rows = [[f.label, *(cell(m, f) for m in sets.values())] for f in FIGURES]
    rows.append(["images / patients", *(f"{m['images']} / {m['patients']}" for m in sets.values())])
    return Table(["metric (95% CI)", *sets], rows)


def counts_line(m: dict) -> str:
    """The threshold and the confusion counts the rates come from."""
    return (f"Threshold {m['threshold']:.4f}: TP {m['tp']}, TN {m['tn']}, FP {m['fp']}, FN {m['fn']} "
            f"on {m['images']} images of {m['patients']} patients.")


def metric_section(m: dict) -> str:
    """One set's figures for the page, with the counts the rates come from."""
    resamples = m.get("bootstrap_resamples", BOOTSTRAP_RESAMPLES)
    return (f"<p>95% intervals: patient bootstrap, {resamples:,} resamples.</p>" + metric_table(m).html()
            + f"<p>{counts_line(m)}</p>")


def training_table(training: dict) -> Table:
    """Per member: its seed, the epochs it ran, why its training stopped and which weights it kept."""
    return Table(["member", "seed", "epochs run", "why training stopped", "weights kept", "validation AUC"],
                 [[str(m["member"] + 1), str(m["seed"]), str(m["epochs_run"]), m["stopped"] or "", m["kept"] or "none",
                   f"{m['val_auc']:.3f}" if "val_auc" in m else ""] for m in training["members"]])


def training_text(training: dict, validation: dict) -> str:
    """How the scored model is made of its members, in one sentence."""
    n = len(training["members"])
    how = f"an ensemble of {n} models, scored by the mean of their logits" if n > 1 else "one model"
    views = ", each averaged over test-time zoom and aspect views" if training["tta"] else ""
    stopping = (f"after {training['patience']} epochs of the low-learning-rate tail without improvement."
                if training["patience"] else "off (every epoch is trained).")
    return (f"The scored model is {how}{views}; its validation AUC is {validation['auc']:.3f}. Weights kept by the "
            f"rule `--keep {training['keep']}`; early stopping {stopping}")


def split_table(audit: dict) -> Table:
    """Images, patients, classes and prevalence per split."""
    return Table(["split", "images", "patients", "NORMAL", "PNEUMONIA", "pneumonia share"],
                 [[s, str(a["images"]), str(a["patients"]), str(a["normal"]), str(a["pneumonia"]),
                   f"{a['pneumonia'] / max(a['images'], 1):.1%}"] for s, a in audit["splits"].items()])


def audit_table(audit: dict) -> str:
    """Images and patients per split and label, and the leak checks."""

    def check(key):
        value = audit[key]
        return f'<span class="{"ok" if value == 0 else "bad"}">{value}</span>'

    skipped = ", ".join(f"{k}: {v}" for k, v in audit["skipped_by_reason"].items()) or "none"
    return (split_table(audit).html() +
            f"<p>Patients in more than one split: {check('patients_in_several_splits')}. "
            f"Byte-identical images across splits: {check('duplicates_across_splits')}. "
            f"Pixel-identical images across splits: {check('identical_pixels_across_splits')}. "
            f"Duplicates merged: {audit['duplicates_merged']}. Files skipped: {audit['skipped']} "
            f"({html.escape(skipped)}); "
            f"see skipped.csv. Ignored folders: {html.escape(', '.join(audit['ignored_folders']) or 'none')}.</p>")


def gradcam_section(g: dict) -> str:
    """The saliency sanity checks, in words and numbers."""
    parts = []
    rnd = g.get("randomisation")
    if rnd:
        cls = "ok" if rnd["passed"] else "bad"
        parts.append('<p>Randomisation test (Adebayo et al. 2018): median Spearman correlation between trained and '
                     f'fully randomised maps <span class="{cls}">{rnd["fully_randomised_median_spearman"]:.3f}</span> '
                     f'over {rnd["images"]} test images (low is good: the maps depend on the learned weights).</p>')
        if not rnd["passed"]:
            parts.append('<p class="warn">The maps barely change when the weights are randomised: '
                         'do not trust them.</p>')
    border = g.get("border")
    if border:
        parts.append(f"<p>CAM mass in the outer {border.get('frame', 0.1):.0%} frame (where markers and text sit): "
                     f"{border['border_mass_share']:.3f} of the total, against {border['border_area_share']:.2f} of "
                     f"the area.</p>")
    loc = g.get("localisation")
    if loc:
        parts.append(f"<p>Phantom lesions: pointing game {loc['pointing_game']:.3f} on {loc['images']} "
                     f"correctly classified pneumonia phantoms; CAM mass inside lesions {loc['mass_in_lesions']:.3f} "
                     f"against their area {loc['lesion_area']:.3f} (ratio {loc['mass_ratio']:.1f}x).</p>")
    return "".join(parts)


def cause_table(sets: dict[str, dict]) -> Table:
    """Per set: one-vs-rest and macro AUC, and bacterial vs viral among the pneumonias, each with its interval."""
    def cell(value, ci):
        return f"{value:.3f} ({interval(ci)})"
    rows = [("macro AUC", lambda c: cell(c["macro_auc"]["auc"], c["macro_auc"]["ci95"]))]
    rows += [(f"{k} vs rest AUC", lambda c, k=k: cell(c["one_vs_rest_auc"][k]["auc"], c["one_vs_rest_auc"][k]["ci95"]))
             for k in (c.lower() for c in CAUSES)]
    rows += [(f"bacterial vs viral {k}", lambda c, k=k: cell(c["bacterial_vs_viral"][k],
                                                             c["bacterial_vs_viral"]["ci95"][k]))
             for k in ("auc", "accuracy", "sensitivity", "specificity")]
    return Table(["metric (95% CI)", *sets], [[name, *(fn(c) for c in sets.values())] for name, fn in rows])


def primary(metrics: dict) -> tuple[str, dict]:
    """The first scored set (the test split of a run, or the folder `evaluate` scored) and its block."""
    return next(iter(metrics["sets"].items()))


def with_part(metrics: dict, part: str) -> dict[str, dict]:
    """Every scored set's `part` ("rates", "gradcam", "ood", "cause", ...), for the sets that have one."""
    return {name: block[part] for name, block in metrics["sets"].items() if part in block}


def externals(metrics: dict) -> dict[str, dict]:
    """The external sets' blocks (--external), by name."""
    return {name: block for name, block in metrics["sets"].items() if block["kind"] == "external"}


def cause_section(metrics: dict, out_dir: Path) -> str:
    """--task cause: the three-class figures, the plots, and bacterial vs viral Grad-CAM side by side."""
    sets, borders = with_part(metrics, "cause"), with_part(metrics, "cause_gradcam")
    first = next(iter(borders.values()))
    bvv = next(iter(sets.values()))["bacterial_vs_viral"]
    mass = "; ".join(f"{n}: bacterial maps {g['bacterial']['border_mass_share']:.3f}, viral maps "
                     f"{g['viral']['border_mass_share']:.3f}" for n, g in borders.items())
    return ("<h2>Bacterial or viral (--task cause)</h2>"
            f"<p>Bacterial vs viral among the pneumonia cases scores P(bacterial) / (P(bacterial) + P(viral)); the "
            f"threshold {bvv['threshold']:.4f} is Youden's on validation. Sensitivity is for bacterial, specificity "
            f"for viral.</p>" + cause_table(sets).html() +
            '<div class="figs">' + "".join(_img(out_dir / n) for n in
                                           ("confusion_cause.png", "roc_cause.png",
                                            "roc_bacterial_viral.png")) + "</div>"
            f"<p>Share of Grad-CAM mass in the outer frame, against {first['bacterial']['border_area_share']:.2f} "
            f"of the area: {html.escape(mass)}. The bacterial map shows where the evidence for bacterial over viral "
            f"lies, the viral map the reverse.</p>" + _img(out_dir / "gradcam_cause_pairs.png", wide=True))


def rate_text(w: dict, none: str = "-") -> str:
    """A Wilson rate of shortcut.wilson as 'rate [lo, hi] (k/n)'; `none` where there was nothing to count."""
    if w["rate"] is None:
        return none
    return f"{w['rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] ({w['k']}/{w['n']})"


def value_text(x: float | None, none: str = "-") -> str:
    return none if x is None else f"{x:.3f}"


def aspect_text(block: dict | None) -> str:
    """What the films' aspect ratios say about one set, in a sentence or two ('' for a set audited before them)."""
    if block is None:
        return ""
    if block["same_for_all"]:
        return ("Every film here has the same aspect ratio (a re-encode squashed them to a square, for example), so "
                "these files cannot show whether it differs by class.")
    return (f"The films' aspect ratio (width / height, from their headers) alone scores this set with AUC "
            f"{value_text(block['auc'])}: median {value_text(block['median_normal'])} among the normals and "
            f"{value_text(block['median_pneumonia'])} among the pneumonias. Every film is resized to a square, so a "
            f"difference here becomes one in the chest's proportions.")


def aspect_line(block: dict | None) -> str:
    """The aspect ratios' figure for the one-line summary ('' for a set audited before them)."""
    if block is None:
        return ""
    return ("; aspect ratio the same for every film" if block["same_for_all"]
            else f"; aspect ratio alone AUC {value_text(block['auc'])}")


def shortcut_text(block: dict) -> str:
    """The layout probe's and the aspect ratios' figures for one set, in a few sentences (or why there are none)."""
    aspect = aspect_text(block.get("aspect"))
    if not block["probe"]:
        return " ".join(filter(None, ["This checkpoint has no layout probe (it was made before the shortcut audit): "
                                      "only the rates per group are given.", aspect]))
    unknown = "no figure (too few films of the class, or one score for all)"
    auc, normals, pneumonias = (value_text(block[k], unknown) for k in ("probe_auc", "spearman_negatives",
                                                                        "spearman_positives"))
    flagged = rate_text(block["specificity_probe_positive"], "no figure, since the probe calls none of them pneumonia")
    rest = rate_text(block["specificity_probe_negative"], "no figure, since the probe calls all of them pneumonia")
    return (f"A probe that sees only a 12x12 thumbnail of each film (its framing, collimation and markers, not the "
            f"lungs' texture), fitted on the training split, scores this set with AUC {auc}. The model's and the "
            f"probe's scores agree with Spearman {normals} among the normals and {pneumonias} among the pneumonias. "
            f"The model's specificity among the normals the probe calls pneumonia: {flagged}; among the rest: {rest}."
            + (f" {aspect}" if aspect else ""))


def groups_table(block: dict, name=printable) -> Table:
    """The model's specificity and sensitivity per group, under every grouping of the set. A group is named by a
    file name or a DICOM header, so it is data: `name` shows it (a code span in Markdown)."""
    return Table(["grouping", "group", "specificity [95% CI] (of normals)", "sensitivity [95% CI] (of pneumonias)"],
                 [[grouping, name(group), rate_text(r["specificity"]), rate_text(r["sensitivity"])]
                  for grouping, groups in block["groups"].items() for group, r in groups.items()])


def shortcut_section(metrics: dict, out_dir: Path) -> str:
    """The shortcut audit of every scored set: the probe's figures, the rates per group, the panel of the false
    positives the probe also calls pneumonia."""
    parts = ["<h2>Shortcut audit: does the model follow the film's layout?</h2>"]
    for name, block in metrics["sets"].items():
        audit = block.get("shortcut")
        if audit:
            parts.append(f"<h3>{html.escape(name)}</h3><p>{html.escape(shortcut_text(audit))}</p>"
                         + groups_table(audit).html() + _img(out_dir / block["folder"] / "gradcam_shortcut.png",
                                                            wide=True))
    return "".join(parts)


def write_report(out_dir: Path, title: str, config: dict, metrics: dict, banner: str = "") -> Path:
    """Assemble report.html from metrics.json-style figures and the PNGs in `out_dir`."""
    name, first = primary(metrics)
    body = [f"<h1>{html.escape(title)}</h1>"]
    if banner:
        body.append(f'<p class="warn">{html.escape(banner)}</p>')
    heading = "Test metrics" if first["kind"] == "test" else f"Metrics on {name}"
    body.append(f"<h2>{html.escape(heading)}</h2>" + metric_section(first["rates"]))
    body.append('<div class="figs">' + "".join(_img(out_dir / n) for n in
                ("roc.png", "confusion_matrix.png", "pr.png", "calibration.png")) + "</div>")
    if externals(metrics):
        body.append("<h2>Test split and external sets</h2>" + sets_table(with_part(metrics, "rates")).html()
                    + "<p>Every set is scored at the one threshold chosen on validation; nothing is tuned on an "
                      "external set.</p>")
        body.append(_img(out_dir / "roc_all.png"))
        for ext, block in externals(metrics).items():
            body.append(f"<h3>External: {html.escape(ext)}</h3>" + gradcam_section(block["gradcam"]))
            body.append(_img(out_dir / block["folder"] / "gradcam_grid.png", wide=True))
    if with_part(metrics, "cause"):
        body.append(cause_section(metrics, out_dir))
    if "training" in metrics:
        how = html.escape(training_text(metrics["training"], metrics["validation"]))
        body.append(f"<h2>Training</h2><p>{how}</p>" + training_table(metrics["training"]).html()
                    + _img(out_dir / "training_curves.png", wide=True))
    if "ood" in first:
        body.append("<h2>Inputs unlike the training films</h2>"
                    + "".join(("" if n == name else f"<h3>External: {html.escape(n)}</h3>")
                              + flagged_section(block["ood"], out_dir / block["folder"] / "ood_flagged.png")
                              for n, block in metrics["sets"].items() if "ood" in block))
    if with_part(metrics, "shortcut"):
        body.append(shortcut_section(metrics, out_dir))
    if "data" in metrics:
        body.append("<h2>Data audit</h2>" + audit_table(metrics["data"]))
    body.append("<h2>Grad-CAM</h2>" + gradcam_section(first["gradcam"]))
    body.append(_img(out_dir / "gradcam_grid.png", wide=True) + _img(out_dir / "gradcam_randomisation.png", wide=True))
    if (out_dir / "MODEL_CARD.md").exists():
        body.append('<p>What this model is for, and where it fails: <a href="MODEL_CARD.md">MODEL_CARD.md</a>.</p>')
    body.append("<h2>Configuration</h2><details><summary>Every setting of this run (config.json)</summary><pre>"
                + html.escape(json.dumps(config, indent=2)) + "</pre></details>")
    return write_page(out_dir, title, body)


# ---------------------------------------------------------------- inputs unlike the training films
def flagged_section(summary: dict, image: Path | None = None) -> str:
    """How many inputs the checks flagged and why, the first of them with their reasons, and their thumbnails."""
    if not summary["flagged"]:
        return f"<p>None of the {summary['images']} images was flagged as unlike the training films.</p>"
    kinds = ", ".join(f"{k}: {n}" for k, n in summary["by_reason"].items())
    table = Table(["file", "why it is flagged"], [[Path(p).name, why] for p, why in summary["examples"]])
    return (f"<p>{summary['flagged']} of {summary['images']} images flagged as unlike the training films "
            f"({html.escape(kinds)}). They are still scored; read their probabilities with care.</p>"
            + (_img(image, wide=True) if image is not None else "") + table.html())


def ood_sentence(metrics: dict) -> str:
    """The detector and its false-alarm rate, for the model card."""
    d = metrics.get("ood_detector")
    if not d:
        return "No out-of-distribution detector was fitted for this model."
    flagged = with_part(metrics, "ood")
    counts = "; ".join(f"{'the ' if name == 'test split' else ''}{name}: {f['flagged']} of {f['images']}"
                       for name, f in flagged.items())
    return (f"Inputs unlike the training films are flagged, not refused: the Mahalanobis distance of the penultimate "
            f"features to the training films (threshold {d['threshold']:.1f}, which flags "
            f"{d['validation_false_alarms']:.1%} of the validation films), a quarter-turn check on the same features, "
            f"and checks on colour, blank images, contrast, entropy and edge density. Flagged here: {counts}.")


# ---------------------------------------------------------------- predict's answer
LISTED = 20  # files predict lists one by one on the terminal; beyond this it summarises
CARDS = 48  # films predict's page shows as cards; beyond this, a bounded gallery
EACH = 8  # films per kind in a bounded gallery (nearest the threshold, most confident each way, flagged)


def answer_row(p, i: int, threshold: float) -> list[str]:
    """One file's answer: its name, P(pneumonia), call and what to know about it: why it was not scored, else its
    flags and warnings."""
    said = p.errors[i] or "; ".join(p.flags[i] + p.notes[i])
    return [printable(Path(p.paths[i]).name), "" if p.prob[i] != p.prob[i] else f"{p.prob[i]:.3f}",
            call_of(p.prob[i], threshold), said]


def answer_table(p, picks, threshold: float) -> Table:
    return Table(["file", "P(pneumonia)", "call", "flags, warnings or why not scored"],
                 [answer_row(p, i, threshold) for i in picks], prose=1)


def gallery(p, threshold: float, most: int = EACH) -> dict[str, list[int]]:
    """The films worth a look among many, each list at most `most` long: nearest the threshold, the most confident
    pneumonias and normals, and flagged ones spread over the list."""
    scored = np.flatnonzero(p.prob == p.prob)
    by_prob = scored[np.argsort(-p.prob[scored], kind="stable")]
    near = scored[np.argsort(np.abs(np.log(p.prob[scored] + 1e-12) - np.log(threshold)), kind="stable")]
    return {"nearest the threshold": list(near[:most]),
            "most confident pneumonia": [i for i in by_prob[:most] if p.prob[i] >= threshold],
            "most confident normal": [i for i in by_prob[::-1][:most] if p.prob[i] < threshold],
            "flagged": list(spread(np.flatnonzero(p.flagged()), most))}


def answer_counts(p, threshold: float) -> str:
    """How many files got each call, how many were not scored, and the flags by kind."""
    calls = [call_of(v, threshold) for v in p.prob]
    counts = ", ".join(f"{calls.count(c)} {c}" for c in CLASSES)
    missing = calls.count("")
    kinds = flag_summary(p)["by_reason"]
    flags = f"{int(p.flagged().sum())} flagged" + (f" ({', '.join(f'{k}: {n}' for k, n in kinds.items())})"
                                                   if kinds else "")
    return (f"{len(p.paths)} files: {counts}" + (f", {missing} not scored" if missing else "")
            + f"; {flags}; threshold {threshold:.4f}")


def predict_answer(p, threshold: float, csv_path: Path, banner: str = "") -> str:
    """predict's terminal answer: every file's probability and call for a few files; for many, the counts and the
    files nearest the threshold and most confident, then where the whole list is."""
    lines = [banner] if banner else []
    lines.append(answer_counts(p, threshold))
    if len(p.paths) <= LISTED:
        lines.append(answer_table(p, range(len(p.paths)), threshold).text())
    else:
        for kind, picks in gallery(p, threshold, most=5).items():
            if picks and kind != "flagged":
                lines += [f"{kind}:", answer_table(p, picks, threshold).text()]
    lines.append(f"every file's probability and call: {csv_path}")
    return "\n".join(lines)


def png_uri(image: np.ndarray) -> str:
    """A uint8 grey image as an inline PNG data URI."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def film_card(p, i: int, threshold: float, thumbnail: str, overlay: Path | None) -> str:
    """One film on predict's page: its picture (and Grad-CAM overlay), probability against the threshold, call
    and flags in words."""
    name, prob, call, said = answer_row(p, i, threshold)
    pictures = f'<img alt="{html.escape(name)}" src="{thumbnail}">' + \
        (f'<img class="cam" alt="Grad-CAM of {html.escape(name)}" src="data:image/png;base64,'
         f'{base64.b64encode(overlay.read_bytes()).decode()}">' if overlay is not None and overlay.exists() else "")
    colour = "bad" if call == CLASSES[1] else "ok"
    verdict = f'<b class="{colour}">{call}</b>: P(pneumonia) {prob} (threshold {threshold:.3f})' if prob else \
        "not scored"
    return (f'<div class="card"><div class="pics">{pictures}</div><p class="name">{html.escape(name)}</p>'
            f"<p>{verdict}</p>" + (f'<p class="why">{html.escape(said)}</p>' if said else "") + "</div>")


def page_sections(p, threshold: float) -> dict[str, list[int]]:
    """The rows predict's page shows, by heading: up to CARDS files every one, most probable first, under no
    heading; beyond, the gallery's kinds that hold any."""
    if len(p.paths) <= CARDS:
        return {"": sorted(range(len(p.paths)), key=lambda i: -p.prob[i] if p.prob[i] == p.prob[i] else 2.0)}
    return {kind: picks for kind, picks in gallery(p, threshold).items() if picks}


def write_predict_report(out_dir: Path, title: str, p, threshold: float, sections: dict[str, list[int]],
                         *, pictures: dict[int, tuple[str, Path | None]], banner: str = "") -> Path:
    """predict's report.html: the counts, then a card per film of each of `sections` (page_sections); for a gallery,
    how many were left out; every row is in predictions.csv. `pictures`: per row shown, its thumbnail's data URI
    and its Grad-CAM overlay file (None without one)."""
    def cards(picks) -> str:
        return '<div class="cards">' + "".join(film_card(p, i, threshold, *pictures.get(i, ("", None)))
                                               for i in picks) + "</div>"

    body = [f"<h1>{html.escape(title)}</h1>"]
    if banner:
        body.append(f'<p class="warn">{html.escape(banner)}</p>')
    body.append(f"<p>{html.escape(answer_counts(p, threshold))}. Every file's row is in predictions.csv.</p>")
    shown = set().union(*sections.values())
    if len(shown) < len(p.paths):
        body.append(f"<p>{len(p.paths)} files are too many to show each: below, {EACH} of each kind worth a look; "
                    f"the other {len(p.paths) - len(shown)} are in predictions.csv only.</p>")
    body += [(f"<h2>{html.escape(kind[0].upper() + kind[1:])}</h2>" if kind else "") + cards(picks)
             for kind, picks in sections.items()]
    return write_page(out_dir, title, body)


# ---------------------------------------------------------------- site calibration
def calibration_table(m: dict) -> Table:
    """Before and after calibration side by side on the site sample, and what the site should expect."""
    before, after, expected = m["before"], m["after"], m["expected"]
    rows = [["threshold", f"{before['threshold']:.4f}", f"{after['threshold']:.4f}",
             f"{expected['threshold']:.4f} ({interval(expected['ci95']['threshold'])})"]]
    for k in METRICS:
        rows.append([k, f"{before[k]:.3f} ({interval(before['ci95'][k])})",
                     f"{after[k]:.3f} ({interval(after['ci95'][k])})",
                     f"{expected[k]:.3f} ({interval(expected['ci95'][k])})" if k in expected else ""])
    adapted = " and BatchNorm" if m["calibration"]["adapt_bn"] else ""
    return Table(["metric (95% CI)", "before: the model as trained", f"after: site threshold{adapted}, on this sample",
                  "expected on the site's new films"], rows)


def calibration_text(m: dict) -> list[str]:
    """How the calibration was made and how to read its figures, as paragraphs."""
    c, e = m["calibration"], m["expected"]
    site = c["site"]
    adapt = (f"BatchNorm statistics were first re-estimated on {c['adapt_bn_images']} of the site's images "
             f"(labels unused; the out-of-distribution distance, fitted to the training statistics, is off in the "
             f"calibrated checkpoint, while the image checks stay), then " if c["adapt_bn"] else "")
    return [f"Source checkpoint {code(c['source']['path'])} (sha256 {c['source']['sha256'][:16]}...), left unchanged. "
            f"Site sample {code(site['folder'])}: {site['images']} images of {site['patients']} patients, "
            f"{site['normal']} NORMAL and {site['pneumonia']} PNEUMONIA. {adapt.capitalize() if adapt else ''}"
            f"the threshold was chosen on the site sample by the policy `{c['policy']}`.",
            f"The 'after' column is measured on the same images the threshold was chosen on, so it flatters. The "
            f"'expected' column is the honest promise: over {e['resamples']} bootstrap resamples of the site's "
            f"patients the threshold was chosen on the resample and scored on the patients it left out, so its "
            f"intervals carry the threshold's own uncertainty."]


UNLABELLED_CAVEAT = ("the expected rates are the score model's own, checked by no label; on the Kaggle test folder "
                     "its sensitivity came out higher and its specificity lower than it expected "
                     "(docs/calibration.md): score a labelled sample of the site with `evaluate` before relying on "
                     "them")


def unlabelled_table(m: dict) -> Table:
    """An unlabelled calibration: the threshold before and after, and what the score distribution lets the site
    expect, with 95% intervals."""
    c, e = m["calibration"], m["expected"]
    called = c["called_pneumonia"]
    rows = [["threshold", f"{c['threshold_before']:.4f}", f"{e['threshold']:.4f}"],
            ["films called pneumonia", f"{called['before']:.3f}", f"{called['after']:.3f}"]]
    rows += [[f"expected {k} (95% CI)", "", f"{e[k]:.3f} ({interval(e['ci95'][k])})"]
             for k in ("prevalence", "sensitivity", "specificity")]
    if c.get("cause_threshold_kept") is not None:
        kept = f"{c['cause_threshold_kept']:.4f}"
        rows.append(["bacterial-vs-viral threshold", kept, f"{kept} (kept: it needs labels)"])
    return Table(["site's films, no labels", "before: the model as trained", "after: the site's threshold"], rows)


def unlabelled_text(m: dict) -> list[str]:
    """How an unlabelled calibration was made, what it used and left out, and what it is for, as paragraphs."""
    c, e = m["calibration"], m["expected"]
    left = ", ".join(f"{n} {why}" for why, n in c["site"]["left_out"].items() if n) or "none"
    adapt = (f" BatchNorm statistics were first re-estimated on {c['adapt_bn_images']} films (AdaBN)." if c["adapt_bn"]
             else "")
    return [f"Calibrated WITHOUT LABELS to the site of {', '.join(code(f) for f in c['site']['folders'])}, and meant "
            f"for that site only. Source checkpoint {code(c['source']['path'])} (sha256 {c['source']['sha256'][:16]}"
            f"...), left unchanged. {c['site']['films']} films found, {c['site']['used']} used; left out: {left}."
            f"{adapt}",
            f"The threshold comes from the distribution of the model's scores on those films ({e['model']}: the "
            f"validation split's scores of each class, moved by one affine map the site's scores choose, mixed at "
            f"the site's prevalence) and keeps the policy `{c['policy']}`. The expected figures are the model's own "
            f"estimates, with 95% intervals over {e['resamples']} bootstrap resamples of the films. Note: "
            f"{UNLABELLED_CAVEAT}.",
            *([f"The bacterial-vs-viral threshold is the source's ({c['cause_threshold_kept']:.4f}), kept unchanged: "
               f"choosing it for the site needs films whose cause is known (calibrate with --data)."]
              if c.get("cause_threshold_kept") is not None else [])]


def calibration_parts(m: dict):
    """The paragraphs and the table of a calibration: with labels (before, after, expected) or without."""
    if m["calibration"].get("kind") == "unlabelled":
        return unlabelled_text, unlabelled_table
    return calibration_text, calibration_table


def write_calibration_report(out_dir: Path, title: str, m: dict) -> Path:
    """report.html of a calibration: provenance, the before/after table and the expected rates."""
    text, table = calibration_parts(m)
    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Site calibration</h2>",
            *(f"<p>{html.escape(t)}</p>" for t in text(m)), table(m).html()]
    for key in ("warning", "shortfall"):
        if m["calibration"].get(key):
            body.append(f'<p class="warn">{html.escape(m["calibration"][key])}</p>')
    return write_page(out_dir, title, body)


def write_calibrated_card(out_dir: Path, source_card: Path, m: dict) -> Path:
    """MODEL_CARD.md of a calibrated checkpoint: the source's card, then a "Site calibration" section."""
    card = source_card.read_text() if source_card.exists() else "# Model card\n\nThe source run's card was not found.\n"
    if card.startswith("---\n"):  # the source's front matter gives its metrics at its threshold, not this one's
        card = card.split("---\n", 2)[2].lstrip()
    text, table = calibration_parts(m)
    lines = ["", "## Site calibration", *text(m), "", table(m).markdown()]
    for key, label in (("warning", "Warning"), ("shortfall", "Note")):
        if m["calibration"].get(key):
            lines += ["", f"**{label}:** {html.escape(printable(m['calibration'][key]))}"]
    lines += ["", "This section supersedes the threshold above for this checkpoint: it scores at "
                  f"{(m['after'] if 'after' in m else m['expected'])['threshold']:.4f}."]
    path = out_dir / "MODEL_CARD.md"
    write_text(path, card.rstrip() + "\n" + "\n".join(lines) + "\n")
    return path


def data_summary(audit: dict) -> str:
    """One line: images and patients per split, duplicates, and skipped files counted by reason."""
    sizes = ", ".join(f"{s} {a['images']} ({a['patients']} patients)" for s, a in audit["splits"].items())
    reasons = "; ".join(f"{n} {why}" for why, n in audit["skipped_by_reason"].items())
    return (f"data: {audit['images']} images: {sizes}; {audit['duplicates_merged']} duplicates merged; "
            f"{audit['skipped']} files skipped" + (f" ({reasons}; see skipped.csv)" if reasons else ""))


def terminal_summary(metrics: dict, out: Path, banner: str = "") -> str:
    """The metric table and the Grad-CAM checks, as printed at the end of a run."""
    lines = [banner] if banner else []
    name, first = primary(metrics)
    lines += [f"{name[0].upper() + name[1:]} (threshold chosen on validation; 95% patient-bootstrap CI)",
              metric_table(first["rates"]).text(), counts_line(first["rates"])]
    if externals(metrics):
        lines += ["Side by side, each at the threshold chosen on validation",
                  sets_table(with_part(metrics, "rates")).text()]
    for set_name, cause in with_part(metrics, "cause").items():
        c = cause["bacterial_vs_viral"]
        lines.append(f"Bacterial vs viral ({set_name}{' pneumonias' if set_name == name else ''}): AUC {c['auc']:.3f} "
                     f"[{c['ci95']['auc'][0]:.3f}, {c['ci95']['auc'][1]:.3f}], accuracy {c['accuracy']:.3f}, "
                     f"sensitivity {c['sensitivity']:.3f}, specificity {c['specificity']:.3f}; macro one-vs-rest AUC "
                     f"{cause['macro_auc']['auc']:.3f}")
    g = first["gradcam"]
    for set_name, f in with_part(metrics, "ood").items():
        if f:
            reasons = f" ({', '.join(f'{k}: {n}' for k, n in f['by_reason'].items())})" if f["flagged"] else ""
            lines.append(f"Input checks ({set_name}): {f['flagged']} of {f['images']} images flagged as unlike the "
                         f"training films{reasons}")
    for set_name, audit in with_part(metrics, "shortcut").items():
        if audit["probe"]:
            flagged, rest = (rate_text(audit[k]) for k in ("specificity_probe_positive", "specificity_probe_negative"))
            lines.append(f"Shortcut audit ({set_name}): layout probe AUC {value_text(audit['probe_auc'])}; "
                         f"Spearman with the model among normals {value_text(audit['spearman_negatives'])}; "
                         f"specificity among normals the probe calls pneumonia {flagged}, among the rest {rest}"
                         f"{aspect_line(audit.get('aspect'))}")
        else:
            lines.append(f"Shortcut audit ({set_name}): this checkpoint has no layout probe; rates per group only"
                         f"{aspect_line(audit.get('aspect'))}")
    lines.append("Grad-CAM: randomised-model median Spearman "
                 f"{g['randomisation']['fully_randomised_median_spearman']:.3f}, "
                 f"border mass {g['border']['border_mass_share']:.3f} (area {g['border']['border_area_share']:.2f})"
                 + (f", pointing game {g['localisation']['pointing_game']:.3f}" if "localisation" in g else ""))
    lines.append(f"wrote {out}/report.html and everything beside it")
    return "\n".join(lines)


# ---------------------------------------------------------------- model card
SPLITS_EXPLAINED = {
    "patient": "70/15/15 by child (every image of one child in one split), stratified by label",
    "random": "70/15/15 by image, ignoring which child an image belongs to (leaky; kept only for comparison)",
    "official": "the archive's own test/ folder as test; the rest 85/15 by child into train and validation",
}


def _md_metrics(m: dict) -> list[str]:
    """A markdown table of the set's figures with their intervals, and the counts the rates come from."""
    rows = [metric_table(m).markdown()]
    rows += ["", f"{m['images']} images of {m['patients']} patients; TP {m['tp']}, TN {m['tn']}, FP {m['fp']}, "
                 f"FN {m['fn']}. The Brier score and the calibration error say how far the probabilities stand from "
                 f"the observed frequencies (0 is perfect): read the probability as a score to rank and threshold, "
                 f"not as a patient's risk."]
    return rows


def _md_data(audit: dict) -> list[str]:
    """Images, patients and prevalence per split, and what was merged or left out."""
    rows = [split_table(audit).markdown(), "",
            f"Copies merged: {audit['duplicates_merged']} (duplicates.csv). Files left out: {audit['skipped']} "
            f"(skipped.csv). Children in more than one split: {audit['patients_in_several_splits']}."]
    return rows


def _md_gradcam(g: dict) -> list[str]:
    """The Grad-CAM sanity checks in one paragraph."""
    rnd, border = g["randomisation"], g["border"]
    verdict = "passed: the maps depend on the learned weights" if rnd["passed"] else "FAILED: do not trust the maps"
    text = (f"Grad-CAM on layer `{g['layer']}` for the {g['target']} class. Randomisation test (Adebayo et al. 2018): "
            f"median Spearman correlation between trained and randomised-weight maps "
            f"{rnd['fully_randomised_median_spearman']:.3f} over {rnd['images']} images ({verdict}). "
            f"Share of map mass in the outer {border['frame']:.0%} frame, where markers and text sit: "
            f"{border['border_mass_share']:.3f}, against {border['border_area_share']:.3f} of the area.")
    if "localisation" in g:
        text += f" Phantom lesions: pointing game {g['localisation']['pointing_game']:.3f}."
    return [text, "The maps show where the evidence for a score lies; they are not lesion segmentations."]


PHANTOM_LIMITATIONS = [
    "**Phantoms, not patients.** `--demo` trains on shapes this project draws: an ellipse body, two lung fields, "
    "ribs, a spine and a heart shadow, with patchy blobs inside the lungs for 'pneumonia'. They show that the "
    "pipeline runs end to end; nothing measured on them says anything about real chest films.",
    "**Where it looks is known here.** Each phantom lesion's mask is drawn with it, so the pointing game checks the "
    "Grad-CAM maps against the truth; real films carry no such outlines.",
    "**Its calls on real films mean nothing.** `predict` and `evaluate` say so for this checkpoint.",
]


def _md_limitations(metrics: dict) -> list[str]:
    """Known limitations, with this run's own figures for the train-to-test shift (a demo run's: the phantoms')."""
    if metrics.get("synthetic"):
        return ["- " + item for item in PHANTOM_LIMITATIONS]
    items = [
        "**One centre, children only.** Trained on the Kaggle archive, every image is a pediatric (age 1-5) "
        "anterior-posterior film from Guangzhou Women and Children's Medical Center (Kermany et al. 2018). Adults, "
        "other hospitals, other scanners and other positioning have not been tested by this run.",
        "**Labels without lesion annotations.** Each image carries one folder label (NORMAL or PNEUMONIA), graded "
        "by two physicians; no lesion was outlined, so where the model looks cannot be checked against ground truth.",
        "**Not bacterial vs viral**, unless trained with `--task cause`; even then the cause comes from the file "
        "names, not from culture or PCR, and the Grad-CAM maps of the two causes are for reading, not for proof.",
        "**Prevalence.** PPV and NPV hold at the prevalence of the scored set; in a population with fewer "
        "pneumonias the PPV falls.",
    ]
    shift = "**Train-to-test shift.** The test split comes from the same folder as the training images."
    test = primary(metrics)[1]["rates"]
    for name, block in externals(metrics).items():
        m = block["rates"]
        shift += (f" On the external set {code(name)} the same threshold gives sensitivity {m['sensitivity']:.3f} and "
                  f"specificity {m['specificity']:.3f}, against {test['sensitivity']:.3f} and "
                  f"{test['specificity']:.3f} on the test split.")
    if not externals(metrics):
        shift += " This run was not scored on any other set (`--external`): expect lower specificity elsewhere."
    return ["- " + item for item in [shift, *items]]


DATASET_DOI = "10.17632/rscbjbr9sj.2"  # Kermany, Zhang, Goldbaum (2018), Mendeley Data v2, CC BY 4.0


def _yaml(value) -> str:
    """A YAML scalar: JSON's double-quoted strings and numbers are YAML too (names made printable first)."""
    return json.dumps(printable(value) if isinstance(value, str) else value)


def front_matter(config: dict, metrics: dict) -> list[str]:
    """The model card's YAML front matter in the Hugging Face model-card format: licence, data set, task, and the
    metrics of every scored set with the set they were measured on."""
    synthetic = bool(config.get("demo"))
    dataset = "synthetic-phantoms" if synthetic else "kermany-pediatric-chest-xray"
    # the Kaggle films are CC BY 4.0; phantoms this project generated carry no data licence of their own
    lines = ["---", *([] if synthetic else ["license: cc-by-4.0"]), "library_name: pytorch",
             "pipeline_tag: image-classification",
             "tags: [medical-imaging, chest-x-ray, pneumonia, pediatric, grad-cam, research-only"
             + (", synthetic-demo]" if synthetic else "]"),
             f"datasets: [{dataset}]"]
    if not synthetic:
        lines += [f"dataset_doi: {_yaml(DATASET_DOI)}",
                  "dataset_citation: " + _yaml("Kermany, Zhang, Goldbaum (2018), Labeled Optical Coherence "
                                               "Tomography (OCT) and Chest X-Ray Images for Classification, "
                                               "Mendeley Data v2")]
    lines += ["model-index:", "- name: pediatric-pneumonia-cnn", "  results:"]
    for name, m in with_part(metrics, "rates").items():
        lines += ["  - task: {type: image-classification, name: pneumonia vs normal}",
                  f"    dataset: {{name: {_yaml(name)}, type: {dataset}, split: "
                  f"{'test' if name == 'test split' else 'external'}}}", "    metrics:"]
        lines += [f"    - {{type: {f.hub}, name: {f.key}, value: {round(float(m[f.key]), 4)}}}"
                  for f in FIGURES if f.hub and m.get(f.key) is not None]
    return lines + ["---", ""]


def write_model_card(out_dir: Path, config: dict, metrics: dict, banner: str = "") -> Path:
    """MODEL_CARD.md (Mitchell et al. 2019; TRIPOD+AI items), every figure taken from `metrics` (metrics.json),
    behind YAML front matter that model hubs and registries read."""
    val, prov = metrics["validation"], metrics["provenance"]
    test = primary(metrics)[1]
    arch = config.get("arch", "cnn")  # a run from before --arch trained the custom CNN
    lines = [*front_matter(config, metrics), f"# Model card: pediatric pneumonia CNN, run {code(out_dir.name)}", ""]
    if banner:
        lines += [f"> **{banner}**", ""]
    lines += [
        "## Intended use",
        "A research and teaching tool: it scores frontal (PA/AP) pediatric chest radiographs for pneumonia against "
        "normal" + (" (and ranks bacterial against viral pneumonia)" if config.get("task") == "cause" else "") +
        ", and shows with Grad-CAM where the evidence lies. It is for studying methods, not for patients.",
        "", "## Not intended for",
        "- diagnosis, triage or any clinical decision; it is not a medical device and has not been "
        "clinically validated;",
        "- adults, lateral or other views, other body parts, CT or ultrasound (`predict` flags such inputs);",
        "- deciding on antibiotics: even a `--task cause` model only ranks bacterial against viral, with labels "
        "taken from file names;",
        "- telling pneumonia from other opacities it was never shown.",
        "", "## Training data",
        f"Source: {code(config['data'] if not config.get('demo') else 'generated phantoms (--demo)')}, "
        f"{metrics['data']['images']} images after merging copies.", "",
        *_md_data(metrics["data"]),
        "", "## Split method",
        f"`--split {metrics['split']}`: {SPLITS_EXPLAINED[metrics['split']]}. Seed {config['seed']}. The kept weights "
        f"follow a rule fixed before training, and the threshold was chosen on the validation split only; the test "
        f"split was scored once, at the end.",
        "", "## Training",
        f"Network: {ARCHITECTURES[arch].title} (`--arch {arch}`), trained from scratch on grayscale "
        f"{config['image_size']} px input.", "",
        training_text(metrics["training"], val), "", training_table(metrics["training"]).markdown(),
        "", "## Threshold",
        f"{test['rates']['threshold']:.4f} on the pneumonia probability, chosen on validation by the policy "
        f"`{val['threshold_policy']}`.",
        "", "## Performance on the test split",
        f"95% intervals from {test['rates'].get('bootstrap_resamples', BOOTSTRAP_RESAMPLES):,} patient-level "
        f"bootstrap resamples.", "",
        *_md_metrics(test["rates"]),
    ]
    for name, block in externals(metrics).items():
        lines += ["", f"## Performance on the external set {code(name)}", *_md_metrics(block["rates"])]
    for name, c in with_part(metrics, "cause").items():
        lines += ["", f"## Bacterial vs viral on {'the test split' if name == 'test split' else code(name)}",
                  "Among the pneumonia cases, P(bacterial) / (P(bacterial) + P(viral)) at the threshold chosen on "
                  "validation (Youden); sensitivity is for bacterial, specificity for viral.", "",
                  *_md_metrics(c["bacterial_vs_viral"])]
    chosen = prov.get("precision")
    precision = [f"Precision: {chosen['chosen']} ({chosen['reason']})."] if chosen else []
    cause_maps = test.get("cause_gradcam")
    cause_text = ([f"Bacterial-vs-viral maps (`--cam-target bacterial|viral`): share of mass in the same frame "
                   f"{cause_maps['bacterial']['border_mass_share']:.3f} (bacterial) and "
                   f"{cause_maps['viral']['border_mass_share']:.3f} (viral)."] if cause_maps else [])
    for name, block in metrics["sets"].items():
        if block.get("shortcut"):
            lines += ["", f"## Shortcut audit on {'the test split' if name == 'test split' else code(name)}",
                      shortcut_text(block["shortcut"]), "", groups_table(block["shortcut"], code).markdown()]
    lines += ["", "## Inputs unlike the training films", ood_sentence(metrics),
              "", "## Grad-CAM checks", *_md_gradcam(test["gradcam"]), *cause_text,
              "", "## Known limitations", *_md_limitations(metrics),
              "", "## How this model was made",
              f"Command: {code(prov['command'])}", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()) + f"; device {prov['device']}"
              + (f" ({prov['cpu']})" if prov.get("cpu") else "") + ".",
              *precision,
              "", "Everything above is generated from this folder's metrics.json and config.json; report.html has "
                  "the plots."]
    path = out_dir / "MODEL_CARD.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
