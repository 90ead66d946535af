"""Rollouts: a model version to a label selector in waves, judged by how the model behaves once it runs."""
