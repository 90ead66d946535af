"""One virtual device: the agent's core on simulated hardware (``virtual``), its network (``net``), its
model host and job timing (``modelops``), its inference (``behaviour``), and the real-onnxruntime variant
(``real``)."""
