"""Device enrollment: single-use tokens exchanged for an identity and broker credentials; revocation."""
