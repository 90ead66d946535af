"""Delivery: deployments of an artifact to devices, chunk broadcast with flow control, repairs."""
