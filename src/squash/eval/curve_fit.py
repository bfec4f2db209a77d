"""Fit quality loss against bits per weight, choose the curve, and find where it bends.

Input: x = bits per weight (e.g. 8, 6, 5, 4, 3, 2), y = quality loss (e.g. KL divergence, in nats), which grows
as x falls; optionally `chunks`, (points × evaluation chunks) of per-chunk loss, with y = chunks.mean(axis=1).

Three families, each written so that loss rises as bits fall:
    exponential  y = a·exp(−b·x) + c                  b > 0, a ≥ 0
    logistic     y = L / (1 + exp(k·(x − x0))) + c     k > 0, L ≥ 0; inflection (the cliff) at x = x0
    power law    y = a·x^(−p) + c                      p > 0, a ≥ 0, x > 0
Each is fitted by bounded least squares from several starts (best residual sum of squares kept); a fit that
fails is returned as failed with its reason, never raised.

Selection: AICc = n·ln(RSS/n) + 2k + 2k(k+1)/(n−k−1), with k the curve's parameter count (3 or 4; the noise
variance is common to all families and not counted, as lmfit does). AICc needs n ≥ k+2 points; a family with
fewer is left out of the comparison, and when no family has enough the plain AIC = n·ln(RSS/n) + 2k is used
instead (said so in `notes`). Akaike weights w_i = exp(−Δ_i/2) / Σ_j exp(−Δ_j/2), Δ_i = IC_i − min IC.

Cliff: x0 of the logistic when the logistic is chosen and x0 lies within the measured bits; else None.
Knee: the point of maximum curvature κ = |Y''| / (1 + Y'²)^(3/2) of the chosen curve on normalised axes
(X = (x − x_min)/(x_max − x_min), Y = (y − y_lo)/(y_hi − y_lo), y_lo..y_hi the curve's range over the measured
bits), taken where the curve is convex (y'' > 0): where loss starts to climb quickly as bits are removed. For
the logistic that is the shoulder above x0, where the low-loss plateau ends.

Uncertainty: a bootstrap (seeded numpy Generator) refits the chosen family n_boot times and reports the 5–95%
interval of the cliff and of the knee. With `chunks`, whole evaluation chunks are resampled with replacement,
the same chunks at every bit width (the chunks are the same text at each x, so their errors are paired);
without, residuals of the fit are resampled and added back to it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

FAMILY_NAMES = ("exponential", "logistic", "power")
LABELS = {"exponential": "exponential", "logistic": "logistic", "power": "power law"}
PARAM_NAMES = {"exponential": ("a", "b", "c"), "logistic": ("L", "k", "x0", "c"), "power": ("a", "p", "c")}
FORMULAS = {
    "exponential": "y = a·exp(−b·x) + c",
    "logistic": "y = L / (1 + exp(k·(x − x0))) + c",
    "power": "y = a·x^(−p) + c",
}
UNDECIDED_WEIGHT = 0.6  # a best Akaike weight below this: the data cannot tell the families apart
_EXACT = 1e-9  # residuals below this fraction of the y range count as an exact fit (keeps ln(RSS) finite)
_GRID = 2001  # points on which curvature is evaluated: resolution (x_max − x_min)/2000


# ---------------------------------------------------------------------------------------------------------
# The families, in the documented form.

def exponential(x, a: float, b: float, c: float) -> np.ndarray:
    """y = a·exp(−b·x) + c."""
    return a * np.exp(-b * np.asarray(x, dtype=float)) + c


def logistic(x, L: float, k: float, x0: float, c: float) -> np.ndarray:
    """y = L / (1 + exp(k·(x − x0))) + c, written with expit so large |k·(x − x0)| cannot overflow."""
    return L * expit(-k * (np.asarray(x, dtype=float) - x0)) + c


def power_law(x, a: float, p: float, c: float) -> np.ndarray:
    """y = a·x^(−p) + c, for x > 0."""
    return a * np.asarray(x, dtype=float) ** (-p) + c


MODELS: dict[str, Callable[..., np.ndarray]] = {"exponential": exponential, "logistic": logistic,
                                                "power": power_law}


def derivatives(family: str, params: dict, x) -> tuple[np.ndarray, np.ndarray]:
    """(dy/dx, d²y/dx²) of a family at x, analytically.

    exponential: y' = −a·b·e^(−bx),          y'' = a·b²·e^(−bx)
    logistic:    s = 1/(1 + e^(k(x−x0))),   y' = −L·k·s(1−s),   y'' = L·k²·s(1−s)(1−2s)
    power law:   y' = −a·p·x^(−p−1),         y'' = a·p(p+1)·x^(−p−2)
    """
    x = np.asarray(x, dtype=float)
    if family == "exponential":
        a, b = params["a"], params["b"]
        e = a * np.exp(-b * x)
        return -b * e, b * b * e
    if family == "logistic":
        L, k, x0 = params["L"], params["k"], params["x0"]
        s = expit(-k * (x - x0))
        return -L * k * s * (1 - s), L * k * k * s * (1 - s) * (1 - 2 * s)
    if family == "power":
        a, p = params["a"], params["p"]
        return -a * p * x ** (-p - 1), a * p * (p + 1) * x ** (-p - 2)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILY_NAMES}")


def predict(family: str, params: dict, x) -> np.ndarray:
    """The fitted curve of `family` with `params` (names as in PARAM_NAMES) at x."""
    return MODELS[family](x, *(params[p] for p in PARAM_NAMES[family]))


# ---------------------------------------------------------------------------------------------------------
# Fitting one family.

@dataclass(frozen=True)
class FamilyFit:
    """One family fitted to the data. `ok`: the fit converged to finite parameters. `ic`: AICc (or AIC, see
    CurveFit.criterion), `weight`: Akaike weight; both None when the family was left out of the comparison,
    and `reason` then says why (or why the fit failed)."""

    family: str
    ok: bool
    params: dict = field(default_factory=dict)
    rss: float | None = None
    n_params: int = 0
    ic: float | None = None
    weight: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"family": self.family, "formula": FORMULAS.get(self.family), "ok": self.ok,
                "params": {k: _json_float(v) for k, v in self.params.items()}, "rss": _json_float(self.rss),
                "n_params": self.n_params, "ic": _json_float(self.ic), "weight": _json_float(self.weight),
                "reason": self.reason}


@dataclass(frozen=True)
class _Scale:
    """What the starts and bounds are built from; x_ref = x_min anchors the amplitude where it is measured
    (a·exp(−b·x) with a at x = 0 is badly conditioned: a ~ e^(b·x_min) and b are strongly correlated)."""

    x_min: float
    x_max: float
    span: float
    y_min: float
    y_max: float
    s: float  # y range, the unit of the residuals
    y_at_min: float  # loss at the fewest bits
    x_half: float  # where y crosses halfway between its extremes (linear interpolation)


def _scale(x: np.ndarray, y: np.ndarray) -> _Scale:
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    y_min, y_max = float(y.min()), float(y.max())
    s = y_max - y_min
    half = y_min + 0.5 * s
    x_half = float(np.median(xs))
    for i in range(len(xs) - 1):  # first crossing of the half level, scanning from few bits to many
        if (ys[i] - half) * (ys[i + 1] - half) <= 0 and ys[i] != ys[i + 1]:
            x_half = float(xs[i] + (half - ys[i]) * (xs[i + 1] - xs[i]) / (ys[i + 1] - ys[i]))
            break
    return _Scale(float(xs[0]), float(xs[-1]), float(xs[-1] - xs[0]), y_min, y_max, s,
                  float(y[x == xs[0]].mean()), x_half)


# Internal parameters θ (what least_squares moves) and their map to the documented ones.
#   exponential θ = (A, b, c): y = A·exp(−b·(x − x_min)) + c,  a = A·exp(b·x_min)
#   logistic    θ = (L, k, x0, c), as documented
#   power law   θ = (A, p, c): y = A·(x / x_min)^(−p) + c,    a = A·x_min^p

def _internal_model(family: str, sc: _Scale) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if family == "exponential":
        return lambda t, x: t[0] * np.exp(-t[1] * (x - sc.x_min)) + t[2]
    if family == "logistic":
        return lambda t, x: t[0] * expit(-t[1] * (x - t[2])) + t[3]
    return lambda t, x: t[0] * (x / sc.x_min) ** (-t[1]) + t[2]


def _internal_jacobian(family: str, sc: _Scale) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """∂y/∂θ, (points × parameters): analytic, cheaper and steadier than finite differences near the bounds."""
    if family == "exponential":
        def jac(t, x):
            e = np.exp(-t[1] * (x - sc.x_min))
            return np.column_stack([e, -t[0] * (x - sc.x_min) * e, np.ones_like(x)])
    elif family == "logistic":
        def jac(t, x):
            s = expit(-t[1] * (x - t[2]))
            ds = t[0] * s * (1 - s)
            return np.column_stack([s, -ds * (x - t[2]), ds * t[1], np.ones_like(x)])
    else:
        def jac(t, x):
            r = (x / sc.x_min) ** (-t[1])
            return np.column_stack([r, -t[0] * r * np.log(x / sc.x_min), np.ones_like(x)])
    return jac


def _bounds(family: str, sc: _Scale) -> tuple[np.ndarray, np.ndarray]:
    # Wide but finite: amplitude up to 100× the data range (a logistic whose upper plateau lies beyond the
    # data needs room), floor anywhere from well below the data to its top, rates from nearly flat to a step.
    amp = (0.0, 100 * sc.s)
    floor = (sc.y_min - 10 * sc.s, sc.y_max)
    if family == "exponential":
        lo, hi = zip(amp, (1e-4 / sc.span, 100 / sc.span), floor)
    elif family == "logistic":
        lo, hi = zip(amp, (1e-3 / sc.span, 200 / sc.span), (sc.x_min - sc.span, sc.x_max + sc.span), floor)
    else:
        lo, hi = zip(amp, (1e-4, 200.0), floor)
    return np.array(lo, dtype=float), np.array(hi, dtype=float)


def _starts(family: str, sc: _Scale) -> list[np.ndarray]:
    # A grid of shapes, amplitude and floor read off the data: least_squares is local, and a sigmoid started
    # with its inflection on the wrong side of the data or a rate off by 10× converges to a poor minimum.
    amp = max(sc.y_at_min - sc.y_min, 0.5 * sc.s)
    if family == "exponential":
        return [np.array([amp, r / sc.span, sc.y_min]) for r in (0.5, 2.0, 5.0, 12.0, 30.0)]
    if family == "logistic":
        centres = {sc.x_half, sc.x_min + 0.25 * sc.span, sc.x_min + 0.5 * sc.span, sc.x_min + 0.75 * sc.span}
        return [np.array([sc.s, r / sc.span, x0, sc.y_min]) for x0 in sorted(centres) for r in (3.0, 10.0, 30.0)]
    return [np.array([amp, p, sc.y_min]) for p in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]


def _to_public(family: str, t: np.ndarray, sc: _Scale) -> dict:
    with np.errstate(over="ignore"):
        if family == "exponential":
            return {"a": float(t[0] * np.exp(t[1] * sc.x_min)), "b": float(t[1]), "c": float(t[2])}
        if family == "logistic":
            return {"L": float(t[0]), "k": float(t[1]), "x0": float(t[2]), "c": float(t[3])}
        return {"a": float(t[0] * sc.x_min ** t[1]), "p": float(t[1]), "c": float(t[2])}


def _to_internal(family: str, params: dict, sc: _Scale) -> np.ndarray:
    if family == "exponential":
        return np.array([params["a"] * math.exp(-params["b"] * sc.x_min), params["b"], params["c"]])
    if family == "logistic":
        return np.array([params["L"], params["k"], params["x0"], params["c"]])
    return np.array([params["a"] * sc.x_min ** (-params["p"]), params["p"], params["c"]])


def fit_family(x, y, family: str, *, starts: Sequence[dict] | None = None) -> FamilyFit:
    """Least-squares fit of one family (see the module docstring) to (x, y); never raises on a failed fit.

    Residuals are measured in units of the y range so that the tolerances mean the same for any loss scale.
    `starts`: starting parameters in the documented form, tried instead of the built-in grid (the bootstrap
    passes the original fit). Returns a FamilyFit without ic/weight; `fit_curve` adds those.
    """
    if family not in MODELS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILY_NAMES}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    k = len(PARAM_NAMES[family])
    if family == "power" and np.any(x <= 0):
        return FamilyFit(family, False, n_params=k, reason="the power law needs every x > 0")
    sc = _scale(x, y)
    if sc.span <= 0 or sc.s <= 0:
        return FamilyFit(family, False, n_params=k, reason="x or y does not vary: nothing to fit")
    model = _internal_model(family, sc)
    lo, hi = _bounds(family, sc)
    width = hi - lo
    inside = lambda t: np.clip(t, lo + 1e-9 * width, hi - 1e-9 * width)  # least_squares wants a feasible start
    if starts is None:
        tries = _starts(family, sc)
    else:
        tries = []
        for p in starts:
            try:
                tries.append(_to_internal(family, p, sc))
            except (KeyError, OverflowError, ZeroDivisionError) as e:
                return FamilyFit(family, False, n_params=k, reason=f"bad start {p!r}: {e}")

    model_jac = _internal_jacobian(family, sc)

    def residuals(t):
        return (model(t, x) - y) / sc.s

    def jacobian(t):
        return model_jac(t, x) / sc.s

    best, errors = None, []
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # overflow inside a trial step is expected; non-finite results are caught
        for t0 in tries:
            t0 = inside(np.nan_to_num(t0, nan=0.0, posinf=hi.max(), neginf=lo.min()))
            try:
                r = least_squares(residuals, t0, jac=jacobian, bounds=(lo, hi), method="trf", x_scale="jac",
                                  max_nfev=300)
            except Exception as e:  # a start with non-finite residuals, or scipy giving up: try the next
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if np.all(np.isfinite(r.x)) and np.isfinite(r.cost) and (best is None or r.cost < best.cost):
                best = r
    if best is None and starts is not None:  # the given start led nowhere: fall back to the grid
        return fit_family(x, y, family)
    if best is None:
        why = errors[-1] if errors else "no start converged to finite parameters"
        return FamilyFit(family, False, n_params=k, reason=f"fit failed from all {len(tries)} starts ({why})")
    params = _to_public(family, best.x, sc)
    if not all(math.isfinite(v) for v in params.values()):
        return FamilyFit(family, False, params, n_params=k, reason="fitted parameters overflow the documented form")
    rss = float(np.sum((model(best.x, x) - y) ** 2))
    return FamilyFit(family, True, params, rss, k)


# ---------------------------------------------------------------------------------------------------------
# Model selection.

def aicc(rss: float, n: int, k: int, *, floor: float = 0.0) -> float | None:
    """AICc = n·ln(RSS/n) + 2k + 2k(k+1)/(n−k−1) (Gaussian residuals); None when n < k+2, where it is undefined.

    `floor` bounds RSS from below so that an exact fit gives a finite value rather than −inf."""
    if n < k + 2:
        return None
    return aic(rss, n, k, floor=floor) + 2 * k * (k + 1) / (n - k - 1)


def aic(rss: float, n: int, k: int, *, floor: float = 0.0) -> float:
    """AIC = n·ln(RSS/n) + 2k (Gaussian residuals, up to a constant common to all families)."""
    return n * math.log(max(rss, floor, 1e-300) / n) + 2 * k


def akaike_weights(ics: Sequence[float]) -> list[float]:
    """w_i = exp(−Δ_i/2) / Σ_j exp(−Δ_j/2), Δ_i = IC_i − min IC: the relative likelihood of each model."""
    ics = np.asarray(ics, dtype=float)
    rel = np.exp(-0.5 * (ics - ics.min()))
    return [float(v) for v in rel / rel.sum()]


# ---------------------------------------------------------------------------------------------------------
# Knee and cliff.

def curvature(family: str, params: dict, x, x_lo: float, x_hi: float) -> np.ndarray:
    """κ = |Y''| / (1 + Y'²)^(3/2) at x on normalised axes: X = (x − x_lo)/(x_hi − x_lo) and Y = the curve
    scaled to [0, 1] over [x_lo, x_hi]. Normalising makes κ independent of the units of bits and of loss."""
    grid = np.linspace(x_lo, x_hi, _GRID)
    with np.errstate(all="ignore"):
        ys = predict(family, params, grid)
        y_range = float(np.ptp(ys))
        d1, d2 = derivatives(family, params, x)
    if not (y_range > 0 and math.isfinite(y_range)):
        return np.zeros_like(np.asarray(x, dtype=float))
    span = x_hi - x_lo
    s1, s2 = d1 * span / y_range, d2 * span * span / y_range  # chain rule onto the unit square
    return np.abs(s2) / (1 + s1 * s1) ** 1.5


def _max_curvature(family: str, params: dict, x_lo: float, x_hi: float, convex: bool) -> tuple[float | None, bool]:
    grid = np.linspace(x_lo, x_hi, _GRID)
    with np.errstate(all="ignore"):
        _, d2 = derivatives(family, params, grid)
        kappa = curvature(family, params, grid, x_lo, x_hi)
    side = (d2 > 0) if convex else (d2 < 0)
    kappa = np.where(side & np.isfinite(kappa), kappa, -1.0)
    i = int(np.argmax(kappa))
    if kappa[i] <= 0:
        return None, False
    return float(grid[i]), i in (0, _GRID - 1)


def knee(family: str, params: dict, x_lo: float, x_hi: float) -> tuple[float | None, bool]:
    """(x of maximum curvature on normalised axes where the curve is convex, at_edge) within [x_lo, x_hi].

    at_edge: the maximum is at x_lo or x_hi, so the curve bends hardest at or beyond the measured range and the
    true knee may lie outside it. None when the curve is flat or has no convex part in the range."""
    return _max_curvature(family, params, x_lo, x_hi, convex=True)


def saturation(family: str, params: dict, x_lo: float, x_hi: float) -> tuple[float | None, bool]:
    """Like `knee`, on the concave side (y'' < 0): for the logistic, the shoulder below x0 where loss levels off
    at its ceiling L + c. None for the convex families."""
    return _max_curvature(family, params, x_lo, x_hi, convex=False)


def cliff(family: str, params: dict, x_lo: float, x_hi: float) -> float | None:
    """The logistic's inflection x0 when it lies within [x_lo, x_hi]; None for other families (no inflection)
    and for an inflection outside the measured bits (an extrapolation, not a cliff the data show)."""
    if family != "logistic":
        return None
    x0 = params.get("x0")
    return float(x0) if x0 is not None and x_lo <= x0 <= x_hi else None


# ---------------------------------------------------------------------------------------------------------
# Bootstrap.

@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap intervals (percentiles `ci` of the replicates) of the inflection x0 (logistic only) and of
    the knee, from `n_ok` successful refits out of `n_boot`; `method` is "chunks" or "residuals"."""

    method: str
    n_boot: int
    n_ok: int
    ci: tuple[float, float]
    x0_interval: tuple[float, float] | None
    knee_interval: tuple[float, float] | None

    def to_dict(self) -> dict:
        return {"method": self.method, "n_boot": self.n_boot, "n_ok": self.n_ok, "ci": list(self.ci),
                "x0_interval": _json_pair(self.x0_interval), "knee_interval": _json_pair(self.knee_interval)}


def bootstrap(x, fit: FamilyFit, *, y=None, chunks=None, n_boot: int = 200, seed: int = 0,
              ci: tuple[float, float] = (5.0, 95.0)) -> Bootstrap | None:
    """Refit `fit.family` to n_boot resampled data sets, starting from `fit.params`.

    With `chunks` (points × chunks): y* = chunks[:, J].mean(axis=1), J drawn with replacement from the chunk
    indices, one J for all points (paired: chunk j is the same text at every bit width).
    Without: y* = ŷ + e*, e* drawn with replacement from the centred residuals scaled by √(n/(n−k)) (raw
    residuals of a least-squares fit are too small by about that factor). Needs n − k ≥ 2 residual degrees of
    freedom; returns None otherwise, and when fewer than half the refits succeed.
    """
    if not fit.ok or n_boot <= 0:
        return None
    x = np.asarray(x, dtype=float)
    n, k = len(x), fit.n_params
    rng = np.random.default_rng(seed)
    x_lo, x_hi = float(x.min()), float(x.max())
    if chunks is not None:
        chunks = np.asarray(chunks, dtype=float)
        method = "chunks"
        m = chunks.shape[1]
        draw = lambda: chunks[:, rng.integers(0, m, size=m)].mean(axis=1)
    else:
        if y is None or n - k < 2:
            return None
        method = "residuals"
        y_hat = predict(fit.family, fit.params, x)
        e = (np.asarray(y, dtype=float) - y_hat) * math.sqrt(n / (n - k))
        e = e - e.mean()
        draw = lambda: y_hat + rng.choice(e, size=n, replace=True)
    x0s, knees = [], []
    for _ in range(n_boot):
        refit = fit_family(x, draw(), fit.family, starts=[fit.params])
        if not refit.ok:
            continue
        if fit.family == "logistic":
            x0s.append(refit.params["x0"])
        kx, _ = knee(fit.family, refit.params, x_lo, x_hi)
        knees.append(np.nan if kx is None else kx)
    n_ok = len(knees)
    if n_ok < n_boot / 2:
        return Bootstrap(method, n_boot, n_ok, tuple(ci), None, None)

    def interval(v):
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        if len(v) < n_ok / 2:  # the statistic is mostly undefined across replicates: no honest interval
            return None
        lo, hi = np.percentile(v, ci)
        return float(lo), float(hi)

    return Bootstrap(method, n_boot, n_ok, tuple(ci), interval(x0s) if x0s else None, interval(knees))


# ---------------------------------------------------------------------------------------------------------
# The whole analysis.

@dataclass(frozen=True)
class CurveFit:
    """Every family's fit, the chosen one by `criterion` ("AICc", "AIC", or None when nothing was chosen),
    its cliff and knee (see the module docstring) with bootstrap intervals, and notes on what was assumed."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    fits: tuple[FamilyFit, ...]
    criterion: str | None
    chosen: str | None
    cliff: float | None
    knee: float | None
    knee_at_edge: bool
    bootstrap: Bootstrap | None
    notes: tuple[str, ...] = ()

    @property
    def chosen_fit(self) -> FamilyFit | None:
        return next((f for f in self.fits if f.family == self.chosen), None)

    @property
    def cliff_interval(self) -> tuple[float, float] | None:
        return self.bootstrap.x0_interval if self.bootstrap and self.cliff is not None else None

    @property
    def knee_interval(self) -> tuple[float, float] | None:
        return self.bootstrap.knee_interval if self.bootstrap and self.knee is not None else None

    def summary(self) -> str:
        return summarize(self)

    def to_dict(self) -> dict:
        """JSON-safe: NaN and ±inf become None, tuples become lists."""
        return {
            "x": [_json_float(v) for v in self.x], "y": [_json_float(v) for v in self.y],
            "fits": [f.to_dict() for f in self.fits], "criterion": self.criterion, "chosen": self.chosen,
            "cliff": _json_float(self.cliff), "cliff_interval": _json_pair(self.cliff_interval),
            "knee": _json_float(self.knee), "knee_at_edge": self.knee_at_edge,
            "knee_interval": _json_pair(self.knee_interval),
            "bootstrap": self.bootstrap.to_dict() if self.bootstrap else None,
            "notes": list(self.notes), "summary": self.summary(),
        }


def _validate(x, y, chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    x = np.asarray(x, dtype=float)
    if chunks is not None:
        chunks = np.asarray(chunks, dtype=float)
        if chunks.ndim != 2 or chunks.shape[0] != x.size or chunks.shape[1] < 2:
            raise ValueError(f"chunks must be 2-D, one row per x and at least 2 chunks (points × chunks); "
                             f"got shape {chunks.shape} for {x.size} points")
        if not np.all(np.isfinite(chunks)):
            raise ValueError("chunks must be finite: found NaN or inf")
        mean = chunks.mean(axis=1)
        if y is None:
            y = mean
        elif not np.allclose(np.asarray(y, dtype=float), mean, rtol=1e-6, atol=1e-12):
            raise ValueError("y must be chunks.mean(axis=1) (or pass y=None to take it from chunks)")
    if y is None:
        raise ValueError("give y, or chunks to take y from")
    y = np.asarray(y, dtype=float)
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(f"x and y must be 1-D and the same length; got shapes {x.shape} and {y.shape}")
    bad = np.flatnonzero(~(np.isfinite(x) & np.isfinite(y)))
    if bad.size:
        raise ValueError(f"x and y must be finite: NaN or inf at position(s) {bad.tolist()}")
    if np.abs(y).max() > 1e100:  # RSS would overflow; no quality loss is this large
        raise ValueError("y must be a quality loss of moderate size (|y| ≤ 1e100)")
    if np.unique(x).size < 3:
        raise ValueError(f"need at least 3 points at distinct bit widths to fit a curve; "
                         f"got {x.size} point(s) at {np.unique(x).size} distinct x")
    order = np.argsort(x, kind="stable")  # ascending bits: tidier output, same fit
    return x[order], y[order], None if chunks is None else chunks[order]


def fit_curve(x, y=None, chunks=None, *, families: Sequence[str] = FAMILY_NAMES, n_boot: int = 200,
              seed: int = 0, ci: tuple[float, float] = (5.0, 95.0)) -> CurveFit:
    """Fit every family, choose one by AICc, report its cliff and knee with bootstrap intervals.

    x: bits per weight; y: quality loss (may be None when chunks is given); chunks: (points × chunks) per-chunk
    loss, y = its row means, enabling the chunk bootstrap (else residuals are resampled). n_boot=0: no bootstrap.
    Raises ValueError for NaN/inf, mismatched shapes, or fewer than 3 distinct x; everything else, including a
    constant y or failed fits, comes back as a result whose `notes` say what happened.
    """
    unknown = [f for f in families if f not in MODELS]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {FAMILY_NAMES}; got {list(families)}")
    x, y, chunks = _validate(x, y, chunks)
    n = x.size
    notes: list[str] = []
    empty = dict(x=tuple(map(float, x)), y=tuple(map(float, y)), criterion=None, chosen=None, cliff=None,
                 knee=None, knee_at_edge=False, bootstrap=None)
    if np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
        reason = f"y is constant ({y[0]:.6g} at every x): there is no loss curve to fit"
        fits = tuple(FamilyFit(f, False, n_params=len(PARAM_NAMES[f]), reason=reason) for f in families)
        return CurveFit(fits=fits, notes=(reason,), **empty)
    with np.errstate(all="ignore"):
        rising = np.corrcoef(x, y)[0, 1] >= 0
    if rising:
        notes.append("loss does not rise as bits fall in these data; every family assumes it does, so the fits "
                     "will be close to flat")

    raw = [fit_family(x, y, f) for f in families]
    floor = n * (_EXACT * float(np.ptp(y))) ** 2
    # AICc where a family has n ≥ k+2 points; if none has, plain AIC over families with a residual left (n > k),
    # or, with 3 points, over those that at least interpolate them (n = k), which then tie on the penalty.
    if any(n >= f.n_params + 2 for f in raw):
        criterion, eligible = "AICc", lambda f: n >= f.n_params + 2
    else:
        min_extra = 1 if any(n > f.n_params for f in raw) else 0
        criterion, eligible = "AIC", lambda f: n >= f.n_params + min_extra
        notes.append(f"only {n} points: AICc needs at least k+2 (5 for 3 parameters), so plain AIC is used and "
                     f"the choice is weak")
    fits, ics = [], {}
    for f in raw:
        if f.ok and eligible(f):
            ics[f.family] = aicc(f.rss, n, f.n_params, floor=floor) if criterion == "AICc" else \
                aic(f.rss, n, f.n_params, floor=floor)
        elif f.ok:
            notes.append(f"the {LABELS[f.family]} ({f.n_params} parameters) was left out: {n} points are too few "
                         f"for {criterion}")
    weights = dict(zip(ics, akaike_weights(list(ics.values())))) if ics else {}
    for f in raw:
        if f.family in ics:
            fits.append(FamilyFit(f.family, True, f.params, f.rss, f.n_params, ics[f.family], weights[f.family]))
        elif f.ok:
            fits.append(FamilyFit(f.family, True, f.params, f.rss, f.n_params,
                                  reason=f"too few points ({n}) for {criterion} with {f.n_params} parameters"))
        else:
            fits.append(f)
            notes.append(f"the {LABELS[f.family]} fit failed: {f.reason}")
    if not weights:
        notes.append("no family could be fitted and compared")
        return CurveFit(fits=tuple(fits), notes=tuple(notes), **{**empty, "criterion": criterion})

    chosen = max(weights, key=weights.get)
    best = next(f for f in fits if f.family == chosen)
    x_lo, x_hi = float(x[0]), float(x[-1])
    the_cliff = cliff(chosen, best.params, x_lo, x_hi)
    if chosen == "logistic" and the_cliff is None:
        notes.append(f"the logistic's inflection x0 = {best.params['x0']:.2f} lies outside the measured bits "
                     f"({x_lo:g}–{x_hi:g}): no cliff within the data")
    the_knee, at_edge = knee(chosen, best.params, x_lo, x_hi)
    boot = bootstrap(x, best, y=y, chunks=chunks, n_boot=n_boot, seed=seed, ci=ci)
    if n_boot > 0 and boot is None:
        notes.append(f"no bootstrap: {n} points leave fewer than 2 residual degrees of freedom for the "
                     f"{LABELS[chosen]}")
    elif boot is not None and boot.n_ok < n_boot:
        notes.append(f"{n_boot - boot.n_ok} of {n_boot} bootstrap refits failed"
                     + ("; too many for an interval" if boot.n_ok < n_boot / 2 else ""))
    return CurveFit(tuple(map(float, x)), tuple(map(float, y)), tuple(fits), criterion, chosen, the_cliff,
                    the_knee, at_edge, boot, tuple(notes))


# ---------------------------------------------------------------------------------------------------------
# Plain words.

def _interval_text(iv: tuple[float, float] | None, ci: tuple[float, float]) -> str:
    if iv is None:
        return ""
    d = 2 if iv[1] - iv[0] < 0.2 else 1  # a narrow interval would print as "3.5–3.5"
    return f" ({ci[1] - ci[0]:g}% interval {iv[0]:.{d}f}–{iv[1]:.{d}f})"


def summarize(result: CurveFit) -> str:
    """One paragraph saying which curve the loss is on, where it bends, and how sure that is."""
    if result.chosen is None:
        why = result.notes[-1] if result.notes else "nothing was fitted"
        return f"No curve chosen: {why}."
    fit = result.chosen_fit
    p, w, label = fit.params, fit.weight, LABELS[result.chosen]
    x_lo, x_hi = result.x[0], result.x[-1]
    ci = result.bootstrap.ci if result.bootstrap else (5.0, 95.0)
    ranked = sorted((f for f in result.fits if f.weight is not None), key=lambda f: -f.weight)
    lead = ""
    if w < UNDECIDED_WEIGHT:
        others = ", ".join(f"{LABELS[f.family]} {f.weight:.2f}" for f in ranked)
        lead = (f"The data cannot tell the families apart (Akaike weights: {others}); reading the best, "
                f"loosely: ")

    if result.knee is None:
        knee_text = "no knee within the measured bits"
    elif result.knee_at_edge:
        knee_text = (f"the curve bends hardest at the edge of the data ({result.knee:.1f} bits), so the knee "
                     f"may lie beyond the measured range")
    else:
        knee_text = f"knee at {result.knee:.1f} bits per weight{_interval_text(result.knee_interval, ci)}"

    if result.chosen == "logistic":
        parts = []
        if result.knee is not None and not result.knee_at_edge:
            parts.append(f"a plateau above {result.knee:.1f} bits (loss ≈ {p['c']:.3g})")
        else:
            parts.append("no low-loss plateau within the measured bits")
        if result.cliff is not None:
            parts.append(f"the cliff at {result.cliff:.1f} bits per weight"
                         f"{_interval_text(result.cliff_interval, ci)}")
        else:
            parts.append(f"the inflection ({p['x0']:.1f} bits) outside the measured {x_lo:g}–{x_hi:g} bits, "
                         f"so no cliff in the data")
        sat, sat_edge = saturation("logistic", p, x_lo, x_hi)
        if sat is not None and not sat_edge:
            parts.append(f"a floor near loss {p['L'] + p['c']:.3g} below {sat:.1f} bits")
        else:
            parts.append(f"loss still climbing at {x_lo:g} bits (its ceiling, ≈ {p['L'] + p['c']:.3g}, not reached)")
        body = f"quality falls on a sigmoid ({label}, Akaike weight {w:.2f}): " + ", ".join(parts)
    elif result.chosen == "exponential" and p["b"] < math.log(1e3):
        body = (f"every bit removed costs more than the last ({label}, Akaike weight {w:.2f}; each bit removed "
                f"multiplies the excess loss by e^b ≈ {math.exp(p['b']):.3g}, floor ≈ {p['c']:.3g}); {knee_text}")
    elif result.chosen == "power" and p["p"] < math.log2(1e3):
        body = (f"loss follows a power law in the bit width ({label}, Akaike weight {w:.2f}; halving the bits "
                f"multiplies the excess loss by 2^p ≈ {2 ** p['p']:.3g}, floor ≈ {p['c']:.3g}); {knee_text}")
    else:  # a rate beyond any sense: flat, then one jump at the lowest points
        body = (f"loss is flat, then jumps at the lowest widths measured ({label}, Akaike weight {w:.2f}); too few "
                f"points on the fall to size it: measure more there; {knee_text}")
    text = lead + body
    text = text[0].upper() + text[1:] + "."
    caveats = [n for n in result.notes if n.startswith(("only ", "loss does not", "no bootstrap"))]
    return " ".join([text] + [c[0].upper() + c[1:] + "." for c in caveats])


def _json_float(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _json_pair(v) -> list | None:
    return None if v is None else [_json_float(v[0]), _json_float(v[1])]
