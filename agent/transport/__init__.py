"""Transports: how the agent core and the controller reach the broker.

``base.Transport`` is the small interface; ``mqtt.MqttTransport`` drives a real
paho client from an asyncio loop (many clients per loop, no thread per
client); ``memory.MemoryBroker`` is an in-process broker for unit tests and
contract tests.
"""
