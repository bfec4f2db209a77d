"""Curve fitting of quality loss against bits per weight: synthetic data from known curves must come back."""
import json
import math

import numpy as np
import pytest

from squash.eval.curve_fit import (
    CurveFit, FamilyFit, aic, aicc, akaike_weights, cliff, curvature, exponential, fit_curve, fit_family, knee,
    logistic, power_law, predict, summarize,
)

X = np.linspace(2.0, 8.0, 12)  # bits per weight
SIGMOID = dict(L=2.0, k=3.0, x0=3.5, c=0.01)
EXPONENTIAL = dict(a=5.0, b=1.2, c=0.01)
POWER = dict(a=20.0, p=2.5, c=0.01)


def chunks_from(y_true, seed, noise, m=16):
    """(points × m) per-chunk losses whose row means carry Gaussian noise of sd `noise`·range(y_true)."""
    rng = np.random.default_rng(seed)
    sd = noise * np.ptp(y_true) * math.sqrt(m)  # per chunk, so the mean of m chunks has sd noise·range
    return y_true[:, None] + rng.normal(0.0, sd, size=(len(y_true), m))


def json_safe(result: CurveFit) -> dict:
    return json.loads(json.dumps(result.to_dict(), allow_nan=False))


@pytest.fixture(scope="module")
def sigmoid_fit():
    # 2% noise, 16 chunks a point, 200 bootstrap refits (about a second). The 90% interval misses the truth
    # about 1 time in 10: in a 30-seed sweep during development it covered x0 in 28, and x0 was always within
    # 0.06 bits. Data seed 1 is one that covers; the assertions on choice and x0 held for every seed tried.
    chunks = chunks_from(logistic(X, **SIGMOID), seed=1, noise=0.02)
    return fit_curve(X, chunks=chunks, n_boot=200, seed=0), chunks


def test_sigmoid_is_chosen_and_its_cliff_recovered(sigmoid_fit):
    r, chunks = sigmoid_fit
    assert r.criterion == "AICc"
    assert r.chosen == "logistic"
    assert r.chosen_fit.weight > 0.9
    assert sum(f.weight for f in r.fits) == pytest.approx(1.0)
    assert r.cliff == pytest.approx(SIGMOID["x0"], abs=0.25)
    assert r.chosen_fit.params["k"] == pytest.approx(SIGMOID["k"], rel=0.25)
    assert r.chosen_fit.params["L"] == pytest.approx(SIGMOID["L"], rel=0.1)
    assert r.y == pytest.approx(tuple(chunks.mean(axis=1)))


def test_sigmoid_bootstrap_interval_contains_true_cliff(sigmoid_fit):
    r, _ = sigmoid_fit
    assert r.bootstrap.method == "chunks"
    assert r.bootstrap.n_ok == 200
    lo, hi = r.cliff_interval
    assert lo < SIGMOID["x0"] < hi
    assert lo <= r.cliff <= hi
    assert hi - lo < 0.5  # informative, not just wide
    # the knee is the shoulder above the cliff, where the low-loss plateau ends
    assert r.cliff < r.knee < X.max() and not r.knee_at_edge
    klo, khi = r.knee_interval
    assert klo <= r.knee <= khi


def test_sigmoid_summary_and_json(sigmoid_fit):
    r, _ = sigmoid_fit
    text = r.summary()
    assert text.startswith("Quality falls on a sigmoid (logistic, Akaike weight")
    assert f"the cliff at {r.cliff:.1f} bits per weight (90% interval" in text
    assert "plateau above" in text and "floor near loss" in text
    assert "cannot tell" not in text
    d = json_safe(r)
    assert d["chosen"] == "logistic" and d["cliff"] == pytest.approx(r.cliff)
    assert d["cliff_interval"] == pytest.approx(list(r.cliff_interval))
    assert {f["family"] for f in d["fits"]} == {"exponential", "logistic", "power"}


# Exponential and power law: at 2% noise the exponential was chosen in 23/30 seeds (the logistic's lower tail is an
# exponential, and a power law with a floor bends much the same), so these use 1% noise, where the right family
# won in 30/30 seeds and its parameters came within 12%. Tolerance here: a and the rate within 15%; the floor c,
# near 0, within 2% of the loss range (a relative tolerance on a number near zero means nothing).

@pytest.mark.parametrize("family, truth, model, rate", [
    ("exponential", EXPONENTIAL, exponential, "b"),
    ("power", POWER, power_law, "p"),
])
def test_convex_family_is_chosen_and_recovered(family, truth, model, rate):
    y_true = model(X, **truth)
    r = fit_curve(X, chunks=chunks_from(y_true, seed=3, noise=0.01), n_boot=0)
    assert r.chosen == family
    p = r.chosen_fit.params
    assert p["a"] == pytest.approx(truth["a"], rel=0.15)
    assert p[rate] == pytest.approx(truth[rate], rel=0.15)
    assert p["c"] == pytest.approx(truth["c"], abs=0.02 * np.ptp(y_true))
    assert np.max(np.abs(predict(family, p, X) - y_true)) < 0.03 * np.ptp(y_true)
    assert r.cliff is None  # convex: no inflection, only a knee
    assert X.min() < r.knee < X.max()
    assert r.bootstrap is None
    json_safe(r)


def test_exponential_summary_words():
    r = fit_curve(X, chunks=chunks_from(exponential(X, **EXPONENTIAL), seed=0, noise=0.01), n_boot=0)
    assert r.chosen_fit.weight >= 0.6
    assert r.summary().startswith("Every bit removed costs more than the last (exponential, Akaike weight")
    assert f"knee at {r.knee:.1f} bits per weight" in r.summary()
    # the same family with a weight under 0.6 (seed 3: exponential 0.57, logistic 0.43) is reported as undecided
    close = fit_curve(X, chunks=chunks_from(exponential(X, **EXPONENTIAL), seed=3, noise=0.01), n_boot=0)
    assert close.chosen == "exponential" and close.chosen_fit.weight < 0.6
    assert close.summary().startswith("The data cannot tell the families apart")
    assert "every bit removed costs more than the last (exponential" in close.summary()


def test_residual_bootstrap_without_chunks_is_seeded():
    y = exponential(X, **EXPONENTIAL) + np.random.default_rng(5).normal(0, 0.005, X.size)
    a = fit_curve(X, y, n_boot=40, seed=7)
    b = fit_curve(X, y, n_boot=40, seed=7)
    assert a.bootstrap.method == "residuals"
    assert a.knee_interval == b.knee_interval  # same seed, same interval
    lo, hi = a.knee_interval
    assert lo <= a.knee <= hi


def test_knee_matches_closed_form_for_exponential():
    # On normalised axes Y = (e^(−bx) − e^(−b·hi)) / D, D = e^(−b·lo) − e^(−b·hi), so |Y'| = u with
    # u = b·span·e^(−bx)/D and Y'' = b·span·u; κ = b·span·u/(1+u²)^(3/2) peaks at u = 1/√2.
    p, lo, hi = EXPONENTIAL, 2.0, 8.0
    D = math.exp(-p["b"] * lo) - math.exp(-p["b"] * hi)
    expected = -math.log(D / (math.sqrt(2) * p["b"] * (hi - lo))) / p["b"]
    x_knee, at_edge = knee("exponential", p, lo, hi)
    assert x_knee == pytest.approx(expected, abs=0.01) and not at_edge
    grid = np.linspace(lo, hi, 601)
    assert grid[np.argmax(curvature("exponential", p, grid, lo, hi))] == pytest.approx(expected, abs=0.02)


def test_cliff_only_for_logistic_inside_the_data():
    assert cliff("logistic", SIGMOID, 2.0, 8.0) == 3.5
    assert cliff("logistic", {**SIGMOID, "x0": 1.0}, 2.0, 8.0) is None
    assert cliff("exponential", EXPONENTIAL, 2.0, 8.0) is None


def test_information_criteria():
    assert aic(2.0, 10, 3) == pytest.approx(10 * math.log(0.2) + 6)
    assert aicc(2.0, 10, 3) == pytest.approx(10 * math.log(0.2) + 6 + 24 / 6)
    assert aicc(2.0, 5, 4) is None  # n < k + 2: undefined
    assert math.isfinite(aicc(0.0, 10, 3, floor=1e-20))  # an exact fit stays finite
    assert akaike_weights([10.0, 10.0]) == pytest.approx([0.5, 0.5])
    w = akaike_weights([0.0, 2.0, 100.0])
    assert sum(w) == pytest.approx(1.0) and w[0] / w[1] == pytest.approx(math.e)


def test_few_points_fall_back_and_say_so():
    r = fit_curve([8, 4, 2], [0.01, 0.1, 1.0])  # every 3-parameter family passes through 3 points exactly
    assert r.criterion == "AIC"
    assert r.chosen in ("exponential", "power")
    logi = next(f for f in r.fits if f.family == "logistic")
    assert logi.weight is None and "too few points" in logi.reason
    assert r.bootstrap is None
    assert "cannot tell the families apart" in r.summary()
    assert "Only 3 points" in r.summary()
    json_safe(r)
    # the usual grid of bit widths: six points, AICc defined for all three families
    r6 = fit_curve([8, 6, 5, 4, 3, 2], [0.002, 0.01, 0.03, 0.2, 1.1, 1.9], n_boot=20)
    assert r6.criterion == "AICc" and all(f.weight is not None for f in r6.fits)
    json_safe(r6)


def test_constant_y_is_a_clear_result_not_a_crash():
    r = fit_curve([2, 3, 4, 5], [0.5, 0.5, 0.5, 0.5])
    assert r.chosen is None and r.criterion is None and r.knee is None
    assert all(not f.ok and "constant" in f.reason for f in r.fits)
    assert r.summary().startswith("No curve chosen: y is constant")
    assert json_safe(r)["chosen"] is None


@pytest.mark.parametrize("x, y, message", [
    ([8, 4], [0.1, 1.0], "at least 3 points"),
    ([8, 4, 4], [0.1, 1.0, 1.1], "at least 3 points"),
    ([8, 6, 4, 2], [0.1, float("nan"), 0.5, 1.0], "must be finite"),
    ([8, 6, float("inf"), 2], [0.1, 0.2, 0.5, 1.0], "must be finite"),
    ([8, 6, 4], [0.1, 0.2], "same length"),
])
def test_bad_input_raises_one_clear_value_error(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_curve(x, y)


def test_chunks_must_match_y():
    chunks = chunks_from(logistic(X, **SIGMOID), seed=0, noise=0.02, m=4)
    with pytest.raises(ValueError, match="chunks.mean"):
        fit_curve(X, chunks.mean(axis=1) + 1.0, chunks)
    with pytest.raises(ValueError, match="2-D"):
        fit_curve(X, chunks=chunks[:5])


def test_failed_or_impossible_fits_are_returned_not_raised():
    f = fit_family([0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.5, 1.4], "power")
    assert not f.ok and "x > 0" in f.reason
    # wild data: every family either fits or says why; nothing escapes from scipy
    r = fit_curve([2, 3, 4, 5, 6], [1e90, 1e60, 1.0, 0.0, 0.0], n_boot=0)
    assert all(f.ok or f.reason for f in r.fits)
    json_safe(r)
    # loss falling as bits fall: fitted anyway, with a warning in the summary
    up = fit_curve([2, 3, 4, 5, 6], [0.1, 0.2, 0.4, 0.8, 1.6], n_boot=0)
    assert "does not rise as bits fall" in up.summary()
    json_safe(up)


def test_to_dict_turns_non_finite_numbers_into_none():
    bad = FamilyFit("exponential", True, {"a": float("inf"), "b": float("nan"), "c": 0.0}, rss=float("nan"))
    d = bad.to_dict()
    assert d["params"] == {"a": None, "b": None, "c": 0.0} and d["rss"] is None
    json.dumps(d, allow_nan=False)
    r = fit_curve([8, 4, 2], [0.01, 0.1, 1.0])
    assert summarize(r) == r.summary() == json_safe(r)["summary"]
