"""What the agent measures: latency histograms, inference counters, process and host samples."""
