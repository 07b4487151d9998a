"""Every figure's text lies inside its canvas: training, evaluate and predict figures, with demo and long names."""
import shutil

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

import evaluate
import main


def words(fig) -> list[matplotlib.text.Text]:
    """The texts of a figure a reader reads: its titles, axis labels, annotations and legends (tick labels are in
    the figure's tight box, which holds only the ticks drawn)."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts, ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def pixels_outside(box, width: float, height: float) -> float:
    return max(-box.x0, -box.y0, box.x1 - width, box.y1 - height)


@pytest.fixture
def outside(monkeypatch):
    """Each figure saved with something drawn outside its canvas, as (file, the words that stick out, how far out
    in pixels)."""
    found = []
    save = Figure.savefig

    def checked(fig, path, *args, **kwargs):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        out = pixels_outside(fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans), width, height)
        if out > 1:  # a pixel of antialiasing is not a clipped word
            which = [t.get_text() for t in words(fig)
                     if pixels_outside(t.get_window_extent(renderer), width, height) > 1]
            found.append((str(path).rsplit("/", 1)[-1], which, round(out)))
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked)
    return found


def test_training_curves_fit(outside, tmp_path):
    history = [{"member": m, "epoch": e, "loss": 0.5 / (e + 1), "val_loss": 0.6 / (e + 1), "val_auc": 0.9,
                "lr": 0.01, "seconds": 1.0, "kept": e == 4} for m in range(3) for e in range(5)]
    evaluate.plot_history(history, tmp_path / "training_curves.png")
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(60, int)]
    prob = np.clip(0.3 * y + rng.random(100) * 0.7, 0, 1)
    m = evaluate.score(y, prob, [f"p{i}" for i in range(100)], 0.5)
    evaluate.draw_all(y, prob, m, tmp_path, ", test split [SYNTHETIC DEMO]")  # the demo's note made titles overflow
    assert not outside, outside


def test_evaluate_figures_fit_with_a_demo_checkpoint_and_long_names(outside, demo_run, tmp_path):
    data = tmp_path / "a site with a rather long folder name for its films"
    shutil.copytree(demo_run.parent / "other_site" / "images", data)
    for i, f in enumerate(sorted(data.rglob("*.png"))[::5]):  # long names in the thumbnails' captions
        f.rename(f.with_name(f"{f.stem}_scanned_at_the_night_shift_station_{i:03d}_portable_AP_view.png"))
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data", str(data), "--out",
                      str(tmp_path / "ev"), "--quiet", "--no-cache"]) == 0
    assert len({name for name, _, _ in outside} | {"-"}) >= 1 and not outside, outside


def test_predict_figures_fit_with_long_names(outside, demo_run, tmp_path):
    films = tmp_path / "films"
    films.mkdir()
    for i, f in enumerate(sorted((demo_run / "demo_data" / "images" / "PNEUMONIA").glob("*.png"))[:4]):
        shutil.copy(f, films / f"patient_{i:04d}_chest_PA_erect_inspiration_repeat_exposure_{i}.png")
    (films / "blank.png").write_bytes((demo_run / "demo_data" / "images" / "NORMAL").glob("*.png").__next__()
                                      .read_bytes())
    assert main.main(["predict", str(films), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(tmp_path / "p"), "--cam", "--quiet"]) == 0
    assert not outside, outside


def test_every_text_a_figure_draws_is_made_printable(tmp_path):
    """gradcam.printable_text walks the figure's texts itself (fig.findobj would lay out every hidden axis's ticks):
    whatever kind of text a name lands in, none keeps its control character."""
    import gradcam
    import matplotlib.pyplot as plt
    name = "ward\x07 7"
    fig, (shown, hidden) = plt.subplots(1, 2)
    shown.plot([0, 1], label=name)
    shown.legend()
    shown.set_title(name)
    shown.set_xlabel(name)
    shown.set_ylabel(name)
    shown.annotate(name, (0.5, 0.5))
    fig.colorbar(shown.imshow([[0, 1]]), ax=shown, label=name)
    hidden.imshow(np.zeros((4, 4)))
    hidden.set_title(name, loc="left")
    fig.suptitle(name)
    fig.legend([name])
    gradcam._save(fig, tmp_path / "f.png", name)
    texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert sum("ward" in t for t in texts) == 9 and not any("\x07" in t for t in texts)


def test_overlays_drawn_into_one_figure_are_the_pictures_each_its_own_figure_gives(tmp_path):
    """save_overlay_files reuses one figure: no film's grey scale, heatmap, title or layout may carry over to the
    next (a layout fitted from the previous film's moves every axis by a pixel)."""
    import gradcam
    from PIL import Image
    rng = np.random.default_rng(0)
    films = [(rng.random((64, 64)) * scale, rng.random((64, 64)), f"film_{k}.png: p=0.{k}" + " long" * 30 * k,
              tmp_path / f"together_{k}.png") for k, scale in enumerate((1.0, 0.3, 5.0))]  # 1, 2 and 3 title lines
    films.append((rng.random((40, 56)), rng.random((40, 56)), "another size", tmp_path / "together_3.png"))
    gradcam.save_overlay_files(films)
    for k, (image, cam, title, path) in enumerate(films):
        gradcam.save_overlay(image, cam, title, tmp_path / f"alone_{k}.png")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / f"alone_{k}.png"))), k
