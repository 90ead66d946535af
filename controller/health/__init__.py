"""Fleet health per model version: telemetry summed into time buckets (rollups) and read back as series.

``rollup`` is the scheduled job that sums new telemetry rows into ``health_rollup`` (one row per model
version, variant and minute, and per hour) and notes each device's latest trouble in ``device_health``;
``series`` reads them for the dashboard: inference rate, error rate, fleet p50/p95 from merged histograms,
and the drift signals devices send (label counts, score histograms) over time.
"""
