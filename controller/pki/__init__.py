"""Device certificates for mutual TLS with the broker: the CA, issuing, renewal, revocation lists."""
