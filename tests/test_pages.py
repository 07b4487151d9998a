"""report.html of training, evaluate and predict in a real browser (headless Chromium): every image loads, nothing
overflows sideways at a desktop's and a phone's width, and the console stays clean."""
import json
import re
import shutil
import subprocess

import pytest

import main

WIDTHS = (1280, 390)
HARNESS = """<!doctype html><html><body>{frames}<pre id="result"></pre><script>
window.addEventListener("load", () => {{
  const out = [...document.querySelectorAll("iframe")].map(f => {{
    const doc = f.contentDocument, root = doc.documentElement;
    return {{width: f.width | 0, images: doc.images.length,
            broken: [...doc.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
            overflow: root.scrollWidth - root.clientWidth,
            wide: [...doc.body.querySelectorAll("*")].filter(e => e.getBoundingClientRect().right > root.clientWidth + 1
                     && getComputedStyle(e.parentElement).overflowX == "visible").map(e => e.tagName + " "
                     + (e.textContent || "").slice(0, 40)).slice(0, 5)}};
  }});
  document.getElementById("result").textContent = JSON.stringify(out);
}});
</script></body></html>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    return found


def browse(page, tmp_path) -> tuple[list[dict], str]:
    """What the browser saw of `page` at each width, and its console lines."""
    frames = "".join(f'<iframe src="{page.as_uri()}" width="{w}" height="900"></iframe>' for w in WIDTHS)
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS.format(frames=frames))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=15000", "--enable-logging=stderr", "--v=0", "--dump-dom",
                           harness.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert found and found.group(1), proc.stderr[-2000:]
    console = "\n".join(line for line in proc.stderr.splitlines() if "CONSOLE" in line)
    return json.loads(found.group(1).replace("&quot;", '"')), console


def check(page, tmp_path, images: int = 1):
    seen, console = browse(page, tmp_path)
    assert [s["width"] for s in seen] == list(WIDTHS)
    for s in seen:
        assert s["images"] >= images and not s["broken"], s
        assert s["overflow"] <= 0, f"{page.name} is {s['overflow']} px wider than a {s['width']} px window: {s['wide']}"
    assert not console, console


def test_the_training_report_reads_in_a_browser(demo_run, tmp_path):
    check(demo_run / "report.html", tmp_path, images=5)


def test_the_evaluate_and_calibration_reports_read_in_a_browser(demo_run, tmp_path):
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data",
                      str(demo_run.parent / "other_site" / "images"), "--out", str(tmp_path / "ev"), "--quiet",
                      "--no-cache"]) == 0
    check(tmp_path / "ev" / "report.html", tmp_path, images=4)
    check(demo_run / "calibrate-unlabelled" / "report.html", tmp_path, images=0)


def test_the_predict_report_reads_in_a_browser(demo_run, tmp_path):
    films = sorted((demo_run / "demo_data" / "images" / "PNEUMONIA").glob("*.png"))[:3]
    assert main.main(["predict", *map(str, films), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(tmp_path / "p"), "--cam", "--quiet"]) == 0
    check(tmp_path / "p" / "report.html", tmp_path, images=6)  # a thumbnail and an overlay per film
