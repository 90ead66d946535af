"""Notifications: webhooks told about rollout state changes, failed deployments and devices offline too long.

An event is written to the database in the same transaction as the change it reports (an outbox), with
one delivery row per webhook that wants it; a sender thread posts them, signed (Standard Webhooks:
HMAC-SHA256 over id, timestamp and body), and retries with backoff. Nothing waits for a receiver, nothing
is held in memory but the requests in flight, and a restart resumes the pending deliveries.
"""
