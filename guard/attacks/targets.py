"""What an attack queries: a local ONNX model or a V2 endpoint (a guard or a bare server).

Both targets answer a batch of input rows with an :class:`Answers` and count one
query per row. Every row is logged with the HTTP status it got and the guard's
``X-Guard-Verdict`` header, so a run can tell when an attack was first caught
and whether it still succeeded.

What an attack receives for a refused row (any status but 200: a 403 deny, a 429
budget, a 400 from ``validate``, a 5xx): no answer. ``Answers.answered`` is
false there, the row's label is :data:`REFUSED` and its scores are NaN. Attacks
treat such a row as a failed query (not adversarial, no improvement, no training
label) and keep going: the target never stops on a refusal and never honours
``Retry-After``. A 200 whose label is outside ``[0, C)`` (an abstention, say
from a smoothing defence) reads the same way, though the log shows it as
answered. Only a target that cannot be attacked as configured raises
:class:`TargetError` (401: wrong or missing API key; 404: unknown model; a
connection failure; a malformed 200 body).

A row counts as *detected* when it was answered with a verdict of flag, degrade
or shadow, or refused with 403 or 429. A 400 is refused but not detected (its
verdict says ``deny`` as every refusal does): the input broke a rule, no
detector fired.
"""

from __future__ import annotations

import http.client
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from guard.defenses.squeeze import Image

REFUSED = -1  # the label of a row the target did not answer
DETECTED_VERDICTS = frozenset({"flag", "degrade", "deny", "shadow"})
DETECTED_STATUS = frozenset({403, 429})


class TargetError(Exception):
    """The target cannot be attacked as configured (bad key, unknown model, no server)."""


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """The model's interface as the attacker knows it. ``lo``/``hi`` broadcast to ``[F]``.
    Rows are flat (``[N, F]``); ``input_shape`` (``None``: ``(F,)``) is the shape of one
    row as the model takes it: a target reshapes each batch to ``[N, *input_shape]``."""

    n_features: int
    n_classes: int
    lo: np.ndarray
    hi: np.ndarray
    input_shape: tuple[int, ...] | None = None

    @classmethod
    def builtin(cls, name: str) -> TargetSpec:
        """The spec of a demo model in :mod:`guard.models` (its recorded input range)."""
        from guard.models import model_info

        info = model_info(name)
        lo, hi = (np.asarray(v, dtype=np.float64) for v in info["input_range"])
        shape = tuple(int(d) for d in info.get("input_shape") or ()) or None
        if shape == (int(info["n_features"]),):
            shape = None
        return cls(int(info["n_features"]), int(info["n_classes"]), lo, hi, shape)

    @property
    def image(self) -> Image | None:
        """The image one row holds when ``input_shape`` is one (``Image.from_shape``: HWC,
        or CHW when only the first dimension is a channel count); None for flat models."""
        from guard.defenses.squeeze import Image

        return Image.from_shape(self.input_shape)

    @property
    def scalar_range(self) -> bool:
        """Whether every feature shares one range (pixels), so norms have one unit."""
        return self.lo.ndim == 0 and self.hi.ndim == 0

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class Answers:
    """A target's answers to a batch: ``scores`` float64 ``[N, C]`` (probabilities;
    a label-only answer reads as one-hot; NaN where refused), ``labels`` int64 ``[N]``
    (:data:`REFUSED` where refused)."""

    scores: np.ndarray
    labels: np.ndarray

    @property
    def answered(self) -> np.ndarray:
        return self.labels != REFUSED

    @classmethod
    def refused(cls, n: int, n_classes: int) -> Answers:
        return cls(np.full((n, n_classes), np.nan), np.full(n, REFUSED, dtype=np.int64))


class QueryLog:
    """Status and verdict of every query row, in order. Row ``i`` is query ``i + 1``."""

    def __init__(self) -> None:
        self.status: list[int] = []
        self.verdicts: list[str | None] = []
        self.request_ids: list[str | None] = []  # the X-Request-Id each row was sent under

    def __len__(self) -> int:
        return len(self.status)

    def record(
        self, n: int, status: int, verdict: str | None, request_id: str | None = None
    ) -> None:
        self.status.extend([status] * n)
        self.verdicts.extend([verdict] * n)
        self.request_ids.extend([request_id] * n)

    def detected(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Per row of ``[start, end)``: did a detector fire on it?"""
        end = len(self) if end is None else end
        return np.array(
            [
                (s == 200 and v in DETECTED_VERDICTS) or s in DETECTED_STATUS
                for s, v in zip(self.status[start:end], self.verdicts[start:end], strict=True)
            ],
            dtype=bool,
        )

    def refused(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Per row of ``[start, end)``: was it left unanswered?"""
        return np.asarray(self.status[start:end], dtype=np.int64) != 200


class Target:
    """Base of both targets: batching, counting, logging. Subclasses implement ``_send``."""

    def __init__(self, spec: TargetSpec, *, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.spec = spec
        self.batch_size = batch_size
        self.log = QueryLog()
        self.last_request_id: str | None = None  # set by ``_send`` when it names its request

    @property
    def queries(self) -> int:
        """Rows sent so far (answered or not)."""
        return len(self.log)

    def query(self, x: np.ndarray) -> Answers:
        """Answers for the rows of ``x`` (``[N, F]``, or ``[N, *input_shape]`` as a wrapping
        target's ``_send`` gets them), sent in batches of ``batch_size``."""
        x = np.asarray(x, dtype=np.float32)
        shape = self.spec.input_shape
        if shape is not None and x.ndim > 2 and x.shape[1:] == tuple(shape):
            x = x.reshape(len(x), -1)
        if x.ndim != 2 or x.shape[1] != self.spec.n_features:
            raise ValueError(f"expected inputs of shape [N, {self.spec.n_features}]; got {x.shape}")
        parts = []
        for begin in range(0, len(x), self.batch_size):
            batch = x[begin : begin + self.batch_size]
            if shape is not None:
                batch = batch.reshape(len(batch), *shape)
            answers, status, verdict = self._send(batch)
            self.log.record(len(batch), status, verdict, self.last_request_id)
            parts.append(answers)
        if not parts:
            return Answers.refused(0, self.spec.n_classes)
        return Answers(
            np.concatenate([a.scores for a in parts]), np.concatenate([a.labels for a in parts])
        )

    def close(self) -> None:
        """Release connections or sessions; the target is not used afterwards."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        raise NotImplementedError

    def _answers(self, outputs: dict[str, np.ndarray], n: int, scores: str, label: str) -> Answers:
        """Answers from a model's named outputs: scores if present, else one-hot labels.
        A label outside ``[0, C)`` (an abstention) is no answer."""
        c = self.spec.n_classes
        if scores in outputs:
            probabilities = _probabilities(outputs[scores], c).reshape(n, c)
            labels = (
                np.asarray(outputs[label], dtype=np.int64).reshape(n)
                if label in outputs
                else probabilities.argmax(axis=1)
            )
        elif label in outputs:
            labels = np.asarray(outputs[label], dtype=np.int64).reshape(n)
            probabilities = np.eye(c)[np.clip(labels, 0, c - 1)]
        else:
            raise TargetError(
                f"the answer has neither {scores!r} nor {label!r}; got {sorted(outputs)}"
            )
        valid = (labels >= 0) & (labels < c)
        if not valid.all():
            labels = np.where(valid, labels, REFUSED)
            probabilities = np.where(valid[:, None], probabilities, np.nan)
        return Answers(probabilities, labels)


class OnnxTarget(Target):
    """An ONNX model run in-process by onnxruntime on one CPU thread: undefended,
    always answers."""

    def __init__(
        self,
        path: Path,
        spec: TargetSpec,
        *,
        input_name: str = "input",
        scores_output: str = "probabilities",
        label_output: str = "label",
        batch_size: int = 4096,
    ) -> None:
        import onnxruntime as ort

        super().__init__(spec, batch_size=batch_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = input_name
        self.outputs = (scores_output, label_output)
        self._names = [o.name for o in self.session.get_outputs()]
        declared = next((i.type for i in self.session.get_inputs() if i.name == input_name), "")
        self._dtype = _ONNX_DTYPES.get(declared, np.float32)

    @classmethod
    def builtin(cls, name: str, **kwargs: Any) -> OnnxTarget:
        """A demo model of :mod:`guard.models` with its recorded spec."""
        from guard.models import model_path

        return cls(model_path(name), TargetSpec.builtin(name), **kwargs)

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        feed = {self.input_name: x.astype(self._dtype, copy=False)}
        outputs = dict(zip(self._names, self.session.run(self._names, feed), strict=True))
        return self._answers(outputs, len(x), *self.outputs), 200, None


class HttpTarget(Target):
    """A model behind a KServe V2 REST endpoint, called synchronously over one
    keep-alive connection. ``url`` is the server's base (``http://host:port[/prefix]``).

    ``api_key`` goes in the ``X-API-Key`` header so the attack runs as a named
    client; ``headers`` adds any others. Requests are JSON unless ``binary``
    (the binary tensor extension; the guard and Triton speak it, MLServer does not).
    With ``trace`` set, request ``n`` (from 0) goes out with ``X-Request-Id:
    {trace}-{n}``, so a run can be matched with the guard's audit log.
    """

    def __init__(
        self,
        url: str,
        model: str,
        spec: TargetSpec,
        *,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        input_name: str = "input",
        scores_output: str = "probabilities",
        label_output: str = "label",
        batch_size: int = 1,
        binary: bool = False,
        timeout: float = 30.0,
        trace: str | None = None,
    ) -> None:
        super().__init__(spec, batch_size=batch_size)
        self.trace = trace
        self.requests = 0
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target URL must be http(s)://host[:port][/prefix]; got {url!r}")
        self.url = url
        self.path = f"{parts.path.rstrip('/')}/v2/models/{urllib.parse.quote(model, safe='')}/infer"
        self.model = model
        self.input_name = input_name
        self.outputs = (scores_output, label_output)
        self.binary = binary
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key is not None:
            self.headers["X-API-Key"] = api_key
        connection = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._connection = connection(parts.hostname, parts.port, timeout=timeout)

    def close(self) -> None:
        self._connection.close()

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        from guard.errors import UpstreamError
        from guard.inference import InferRequest
        from guard.protocols import v2

        body, extra = v2.encode_request(
            InferRequest(model_name=self.model, inputs={self.input_name: x}), binary=self.binary
        )
        if self.trace is not None:
            self.last_request_id = f"{self.trace}-{self.requests}"
            extra = {**extra, "X-Request-Id": self.last_request_id}
        self.requests += 1
        status, headers, payload = self._post(body, {**self.headers, **extra})
        verdict = headers.get("x-guard-verdict")
        if status in (401, 404):
            raise TargetError(f"{self.url}{self.path} answered {status}: {_message(payload)}")
        if status != 200:
            return Answers.refused(len(x), self.spec.n_classes), status, verdict
        length = headers.get(v2.HEADER_LENGTH.lower())
        try:
            response = v2.decode_response(payload, header_length=int(length) if length else None)
        except (UpstreamError, ValueError) as exc:
            raise TargetError(f"{self.url}{self.path}: malformed answer: {exc}") from exc
        return self._answers(response.outputs, len(x), *self.outputs), status, verdict

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """One POST on the kept-alive connection, retried once on a fresh connection
        when the server had closed the idle one before answering."""
        try:
            return self._exchange(body, headers)
        except _STALE:
            self._connection.close()
        try:
            return self._exchange(body, headers)
        except _STALE as exc:
            self._connection.close()
            raise TargetError(f"{self.url}: the server closed the connection") from exc

    def _exchange(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        try:
            self._connection.request("POST", self.path, body=body, headers=headers)
            reply = self._connection.getresponse()
            payload = reply.read()
        except _STALE:
            raise
        except (OSError, http.client.HTTPException) as exc:
            self._connection.close()
            raise TargetError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, payload


_ONNX_DTYPES = {"tensor(double)": np.float64, "tensor(float16)": np.float16}


def _probabilities(value: Any, n_classes: int) -> np.ndarray:
    """Scores as float64 ``[N, C]``; a ZipMap output (scikit-learn models exported
    by skl2onnx with its default options: one ``{class: probability}`` per row) too."""
    if isinstance(value, list) and (not value or isinstance(value[0], dict)):
        return np.array(
            [[float(row.get(k, 0.0)) for k in sorted(row)[:n_classes]] for row in value],
            dtype=np.float64,
        ).reshape(len(value), n_classes)
    return np.asarray(value, dtype=np.float64)


# The server closed the kept-alive connection (its idle timeout) before this request.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


def _message(payload: bytes) -> str:
    import orjson

    try:
        return str(orjson.loads(payload).get("error", ""))[:200]
    except (orjson.JSONDecodeError, AttributeError):
        return payload[:200].decode("utf-8", "replace")
