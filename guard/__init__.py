"""inference-guard: an inference-time defence proxy for ML model servers."""

__version__ = "0.1.0"
