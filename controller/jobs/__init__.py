"""Derive jobs: distill, prune, finetune and quantize steps on a version, each run by a worker process with
limits (``worker.py``, ``limits.py``), each step's output imported as a version with its lineage (``service.py``)."""
