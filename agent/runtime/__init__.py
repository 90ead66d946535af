"""The device driver: runs the sans-IO core over paho, with real models, files and signals."""
