"""Thresholds, metrics on a hand-made example, patient bootstrap and calibration."""
import numpy as np
import pytest

import evaluate


def test_metrics_on_a_hand_made_example():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1, 0.1, 0.05])
    m = evaluate.binary_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == pytest.approx(0.75) and m["npv"] == pytest.approx(5 / 6)
    # pairs: 4 positives x 6 negatives = 24; ranked wrong: 0.2 < 0.6, 0.3, and ties 0.2=0.2 count half
    assert m["auc"] == pytest.approx((24 - 2 - 0.5) / 24)


def test_threshold_policies_use_only_the_given_predictions():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    youden = evaluate.choose_threshold(y, p, "youden")
    assert youden == pytest.approx(0.7)  # sens 0.75, spec 1.0: J = 0.75, best
    sens = evaluate.choose_threshold(y, p, "sens=0.95")
    assert sens == pytest.approx(0.4)  # the highest threshold that still catches every positive
    assert evaluate.choose_threshold(y, p, "0.25") == 0.25
    # a run of positives with no negative between them: the strictest threshold reaching the sensitivity,
    # not the run's loosest end (which has the same specificity here, and less elsewhere)
    y, p = np.array([1, 1, 1, 1, 0, 0]), np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    assert evaluate.choose_threshold(y, p, "sens=0.5") == pytest.approx(0.8)
    assert evaluate.choose_threshold(y, p, "sens=0.75") == pytest.approx(0.7)
    with pytest.raises(ValueError):
        evaluate.choose_threshold(y, p, "1.5")


def test_bootstrap_resamples_patients_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    p = np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1)
    patients = np.repeat(np.arange(n // 3), 3)
    m = evaluate.score(y, p, patients, 0.5, n_resamples=300)
    for name in evaluate.METRICS:
        lo, hi = m["ci95"][name]
        assert lo <= m[name] <= hi and hi - lo > 0, name
    assert m["patients"] == 100
    # one patient per image vs everything from one patient: the single-patient data has no spread
    one = evaluate.bootstrap_ci(y, p, np.zeros(n), 0.5, n_resamples=50)
    assert one["accuracy"][0] == one["accuracy"][1]
    # correlated images: resampling patients gives wider intervals than resampling images
    y_c, p_c = np.repeat(y[:100], 3), np.repeat(p[:100], 3)
    by_patient = evaluate.bootstrap_ci(y_c, p_c, np.repeat(np.arange(100), 3), 0.5, 500)
    by_image = evaluate.bootstrap_ci(y_c, p_c, np.arange(300), 0.5, 500)
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]  # noqa: E731
    assert width(by_patient) > 1.3 * width(by_image)


def test_the_brier_score_has_a_patient_bootstrap_interval_computed_as_the_formula_says():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 90), rng.random(90)
    patients = np.repeat(np.arange(30), 3)
    m = evaluate.score(y, p, patients, 0.5, n_resamples=400)
    lo, hi = m["ci95"]["brier"]
    assert lo < m["brier"] < hi
    # by hand: every resample's mean squared error over the images of the patients it drew, with their repeats
    weights, codes = evaluate.patient_resamples(patients, 400, 0)
    draws = [np.average((p - y) ** 2, weights=w[codes]) for w in weights]
    assert [lo, hi] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) * 0.6 + y * 0.3, 1)  # coarse: many ties
    w = rng.integers(0, 4, (5, 200)).astype(float)
    ours = evaluate.weighted_auc(y, p, w)
    assert np.allclose(ours, [roc_auc_score(y, p, sample_weight=row) for row in w])


def test_expected_calibration_error():
    y = np.array([0, 1] * 50)
    assert evaluate.expected_calibration_error(y, np.full(100, 0.5)) == pytest.approx(0.0)
    assert evaluate.expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.4)


def test_one_table_builder_renders_the_same_cells_as_text_html_and_markdown():
    from app import report
    m = {k: 0.5 + i / 100 for i, k in enumerate(evaluate.METRICS)}
    m["ci95"] = {k: [m[k] - 0.1, m[k] + 0.05] for k in evaluate.METRICS}
    m["images"], m["patients"] = 10, 7
    table = report.sets_table({"test split": m, "site <b>": m})
    text, page, markdown = table.text(), table.html(), table.markdown()
    for k in evaluate.METRICS:
        cell = f"{m[k]:.3f} ({m['ci95'][k][0]:.3f} - {m['ci95'][k][1]:.3f})"
        assert text.count(cell) == 2 and page.count(f"<td>{cell}</td>") == 2 and markdown.count(f"| {cell} ") == 2
    assert "site &lt;b&gt;" in page and "<b>" not in page  # set names are escaped in HTML
    assert len(markdown.splitlines()) == 2 + len(evaluate.FIGURES) + 1 and "10 / 7" in text
