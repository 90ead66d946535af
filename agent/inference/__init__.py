"""Running models on the device: onnxruntime sessions, input sources, the worker loop."""
