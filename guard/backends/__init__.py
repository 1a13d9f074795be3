"""Where inference happens: an HTTP upstream or an embedded ONNX model."""

from guard.backends.base import Backend

__all__ = ["Backend"]
