"""Benchmarks: ``python -m benchmarks NAME [--quick]`` prints one JSON object with the measured
figures and the baseline measured in the same run (ratios hold on a noisy shared machine)."""
