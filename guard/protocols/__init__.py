"""Wire codecs: protocol bodies <-> :class:`~guard.inference.InferRequest` / ``InferResponse``.

Pure functions over bytes (no HTTP framework), used by the server for clients
calling the guard and by the HTTP backend for the guard calling an upstream.

* :mod:`guard.protocols.v2`: Open Inference Protocol (KServe V2) REST, with
  Triton's binary tensor data extension.
* :mod:`guard.protocols.tfserving`: TensorFlow Serving REST ``:predict``.
* :mod:`guard.protocols.tensors` / :mod:`guard.protocols.binary`: tensor values
  as JSON and as raw bytes, shared by both.

Every malformed client body raises :class:`~guard.errors.RequestError` (400)
naming the offending field; a malformed upstream body raises
:class:`~guard.errors.UpstreamError` (502).
"""
