"""One self-contained report.html per run: config, data audit, metrics with intervals, every plot.

Usage: `write_report(run_dir, title, sections)`. Images are embedded as data URIs; no network, no
JavaScript. Kept apart from evaluate.py, which computes and draws; this only assembles the page.
"""
import base64
import html
import json
from pathlib import Path

from runs import atomic_write
from evaluate import BOOTSTRAP_RESAMPLES, METRICS, comparison_table as text_comparison, summary_table

STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1180px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:24px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:30px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.warn{background:#fff3cd;padding:8px 12px;
border-left:4px solid #e0a800}.ok{color:#17692f}.bad{color:#b00020;font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{max-width:560px;width:100%;border:1px solid #eee}
img.wide{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:13px}"""


def _img(path: Path, wide: bool = False) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="{"wide" if wide else ""}" alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def metric_table(m: dict) -> str:
    """Metric, value and 95% interval rows."""
    rows = "".join(f"<tr><td>{k}</td><td>{m[k]:.3f}</td><td>{m['ci95'][k][0]:.3f} - {m['ci95'][k][1]:.3f}</td></tr>"
                   for k in METRICS)
    return (f"<table><tr><th>metric</th><th>value</th><th>95% CI (patient bootstrap, {m.get('bootstrap_resamples', BOOTSTRAP_RESAMPLES):,} resamples)</th></tr>{rows}"
            f"</table><p>Threshold {m['threshold']:.4f}: TP {m['tp']}, TN {m['tn']}, FP {m['fp']}, FN {m['fn']} "
            f"on {m['images']} images of {m['patients']} patients. Average precision {m['average_precision']:.3f}, "
            f"Brier {m['brier']:.3f}, ECE {m['ece']:.3f}.</p>")


def comparison_table(sets: dict[str, dict]) -> str:
    """Metrics of several sets side by side, each with its interval."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in sets)
    rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{m[k]:.3f} ({m['ci95'][k][0]:.3f}-{m['ci95'][k][1]:.3f})</td>"
                                                 for m in sets.values()) + "</tr>" for k in METRICS)
    counts = "".join(f"<td>{m['images']} / {m['patients']}</td>" for m in sets.values())
    return (f"<table><tr><th>metric (95% CI)</th>{head}</tr>{rows}<tr><td>images / patients</td>{counts}</tr></table>"
            f"<p>Every set is scored at the one threshold chosen on validation; nothing is tuned on an external set.</p>")


def audit_table(audit: dict) -> str:
    """Images and patients per split and label, and the leak checks."""
    rows = "".join(f"<tr><td>{s}</td><td>{a['images']}</td><td>{a['patients']}</td><td>{a['normal']}</td>"
                   f"<td>{a['pneumonia']}</td></tr>" for s, a in audit["splits"].items())

    def check(key):
        value = audit[key]
        return f'<span class="{"ok" if value == 0 else "bad"}">{value}</span>'

    skipped = ", ".join(f"{k}: {v}" for k, v in audit["skipped_by_reason"].items()) or "none"
    return (f"<table><tr><th>split</th><th>images</th><th>patients</th><th>NORMAL</th><th>PNEUMONIA</th></tr>{rows}</table>"
            f"<p>Patients in more than one split: {check('patients_in_several_splits')}. "
            f"Byte-identical images across splits: {check('duplicates_across_splits')}. "
            f"Pixel-identical images across splits: {check('identical_pixels_across_splits')}. "
            f"Duplicates merged: {audit['duplicates_merged']}. Files skipped: {audit['skipped']} ({html.escape(skipped)}); "
            f"see skipped.csv. Ignored folders: {html.escape(', '.join(audit['ignored_folders']) or 'none')}.</p>")


def gradcam_section(g: dict) -> str:
    """The saliency sanity checks, in words and numbers."""
    parts = []
    rnd = g.get("randomisation")
    if rnd:
        cls = "ok" if rnd["passed"] else "bad"
        parts.append(f'<p>Randomisation test (Adebayo et al. 2018): median Spearman correlation between trained and fully '
                     f'randomised maps <span class="{cls}">{rnd["fully_randomised_median_spearman"]:.3f}</span> over '
                     f'{rnd["images"]} test images (low is good: the maps depend on the learned weights).</p>')
        if not rnd["passed"]:
            parts.append('<p class="warn">The maps barely change when the weights are randomised: do not trust them.</p>')
    border = g.get("border")
    if border:
        parts.append(f"<p>CAM mass in the outer {border.get('frame', 0.1):.0%} frame (where markers and text sit): {border['border_mass_share']:.3f} "
                     f"of the total, against {border['border_area_share']:.2f} of the area.</p>")
    loc = g.get("localisation")
    if loc:
        parts.append(f"<p>Phantom lesions: pointing game {loc['pointing_game']:.3f} on {loc['images']} correctly classified "
                     f"pneumonia phantoms; CAM mass inside lesions {loc['mass_in_lesions']:.3f} against their area "
                     f"{loc['lesion_area']:.3f} (ratio {loc['mass_ratio']:.1f}x).</p>")
    return "".join(parts)


def write_report(out_dir: Path, title: str, config: dict, metrics: dict, banner: str = "") -> Path:
    """Assemble report.html from metrics.json-style figures and the PNGs in `out_dir`."""
    test = metrics["test"]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if banner:
        body.append(f'<p class="warn">{html.escape(banner)}</p>')
    body.append("<h2>Test metrics</h2>" + metric_table(test))
    body.append('<div class="figs">' + "".join(_img(out_dir / n) for n in
                ("roc.png", "confusion_matrix.png", "pr.png", "calibration.png")) + "</div>")
    if metrics.get("external"):
        body.append("<h2>Test split and external sets</h2>" + comparison_table({"test split": test, **metrics["external"]}))
        body.append(_img(out_dir / "roc_all.png"))
        for name in metrics["external"]:
            folder = out_dir / "external" / name
            body.append(f"<h3>External: {html.escape(name)}</h3>" + gradcam_section(metrics["external_gradcam"][name]))
            body.append(_img(folder / "gradcam_grid.png", wide=True))
    if (out_dir / "training_curves.png").exists():
        body.append("<h2>Training</h2>" + _img(out_dir / "training_curves.png", wide=True))
    if "data" in metrics:
        body.append("<h2>Data audit</h2>" + audit_table(metrics["data"]))
    if "gradcam" in metrics:
        body.append("<h2>Grad-CAM</h2>" + gradcam_section(metrics["gradcam"]))
        body.append(_img(out_dir / "gradcam_grid.png", wide=True) + _img(out_dir / "gradcam_randomisation.png", wide=True))
    body.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=2)) + "</pre>")
    body.append("<p><em>A research tool, not a medical device: not clinically validated.</em></p>")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    path = out_dir / "report.html"
    atomic_write(path, lambda f: f.write(page.encode()))
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
    lines.append(summary_table(metrics["test"], "Test split (threshold chosen on validation)"))
    if metrics.get("external"):
        lines.append(text_comparison({"test split": metrics["test"], **metrics["external"]}))
    g = metrics["gradcam"]
    lines.append(f"Grad-CAM: randomised-model median Spearman {g['randomisation']['fully_randomised_median_spearman']:.3f}, "
                 f"border mass {g['border']['border_mass_share']:.3f} (area {g['border']['border_area_share']:.2f})"
                 + (f", pointing game {g['localisation']['pointing_game']:.3f}" if "localisation" in g else ""))
    lines.append(f"wrote {out}/report.html and everything beside it")
    return "\n".join(lines)
