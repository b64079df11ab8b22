"""Demand forecasting: Holt's linear (level + trend) exponential smoothing.

Dynamo's planner forecasts the next interval's request count, ISL and OSL with a pluggable
predictor (constant, ARIMA, Kalman, Prophet; ai-dynamo/dynamo
components/src/dynamo/planner, see /work/shared/notes/perf-anchors.md §3.1). A level +
trend model is the simplest that follows a ramp; it needs no history beyond two numbers,
so the state stays small enough for an annotation. The planner takes the larger of the
forecast and the latest observation when it scales up (a burst is never forecast away)
and the smoothed level when it scales down.
"""

from __future__ import annotations

from tandem.planner.types import Trend

ALPHA = 0.5  # weight of a new sample in the level
BETA = 0.3  # weight of a new slope in the trend


def update(prev: Trend | None, value: float, now: float, interval_s: float) -> Trend:
    """Fold ``value`` observed at ``now`` into ``prev``. The trend is per ``interval_s``.

    A gap longer than three intervals restarts the series (the old trend is stale).
    """
    if prev is None or prev.level is None or prev.updated is None or now - prev.updated > 3 * interval_s:
        return Trend(level=value, trend=0.0, updated=now)
    steps = max(1e-9, (now - prev.updated) / interval_s)
    predicted = prev.level + prev.trend * steps
    level = ALPHA * value + (1 - ALPHA) * predicted
    slope = (level - prev.level) / steps
    trend = BETA * slope + (1 - BETA) * prev.trend
    return Trend(level=level, trend=trend, updated=now)


def predict(series: Trend | None, horizon_s: float, interval_s: float) -> float | None:
    """Forecast ``horizon_s`` ahead (never below zero); ``None`` without history."""
    if series is None or series.level is None:
        return None
    return max(0.0, series.level + series.trend * horizon_s / interval_s)
