"""The device registry: presence, hardware, labels."""
