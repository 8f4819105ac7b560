"""ssw: a systemd-native model-serving platform for GPU hosts."""

__version__ = "0.1.0"
