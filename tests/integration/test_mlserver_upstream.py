"""MLServer as the guard will meet it: what it accepts, returns and refuses.

These tests talk to MLServer directly (no guard). They pin the wire facts the guard's
V2 backend relies on when it re-encodes requests for MLServer:

* JSON only: a binary-extension body is a 422 (a 500 when sent as
  ``application/octet-stream``); a request for binary outputs is ignored and answered
  in JSON. The guard must send JSON.
* Input names are ignored (one input, decoded by the ``np`` codec); the datatype is taken
  as given, FP32 included. Outputs ``predict`` (INT64, ``[n, 1]``) and ``predict_proba``
  (FP64, ``[n, classes]``) each carry ``parameters.content_type == "np"``.
* ``Inference-Header-Content-Length`` on a JSON body is ignored; a missing
  ``Content-Type`` is read as JSON, any other non-JSON one is a 422.
* Errors come in three shapes: MLServer's ``{"error": msg}`` (400 bad output, 404 unknown
  model), FastAPI's ``{"detail": [...]}`` (422: schema, JSON syntax, content type) and a
  plain-text 500 (any exception in the model, e.g. a wrong number of features), whose
  body is the server's traceback under MLServer's default ``debug: true``. The guard
  must map the last two to its own error body and never relay them.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from guard.models.train import TrainedModel, load_dataset
from tests.integration.mlserver_upstream import MLServerProcess, trained_breast_cancer

ROWS = 16


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    """The model MLServer serves."""
    return trained_breast_cancer()


@pytest.fixture(scope="module")
def rows(model: TrainedModel) -> np.ndarray:
    """Held-out rows in the model's input dtype (FP32)."""
    x, _, _ = load_dataset(model.dataset)
    return x[model.non_members[:ROWS]]


@pytest.fixture
def client(mlserver_breast_cancer: MLServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(mlserver_breast_cancer.address)
    yield client
    client.close()


def infer(
    client: httpclient.InferenceServerClient,
    rows: np.ndarray,
    outputs: list[str] | None = None,
    *,
    binary_input: bool = False,
    binary_output: bool = False,
) -> httpclient.InferResult:
    """``rows`` as FP32 input ``input``; no ``outputs`` asks for MLServer's default."""
    tensor = httpclient.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary_input)
    requested = [
        httpclient.InferRequestedOutput(n, binary_data=binary_output) for n in outputs or []
    ]
    return client.infer("breast_cancer", [tensor], outputs=requested or None)


def test_predict_matches_sklearn(
    client: httpclient.InferenceServerClient, rows: np.ndarray, model: TrainedModel
) -> None:
    result = infer(client, rows)

    (output,) = result.get_response()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("predict", "INT64", [ROWS, 1])
    assert output["parameters"] == {"content_type": "np"}
    expected = model.estimator.predict(rows)
    np.testing.assert_array_equal(result.as_numpy("predict").ravel(), expected)


def test_predict_proba_matches_sklearn(
    client: httpclient.InferenceServerClient, rows: np.ndarray, model: TrainedModel
) -> None:
    result = infer(client, rows, ["predict", "predict_proba"])

    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["predict", "predict_proba"]
    proba = result.as_numpy("predict_proba")
    assert proba.dtype == np.float64
    assert proba.shape == (ROWS, 2)
    np.testing.assert_allclose(proba, model.estimator.predict_proba(rows), atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("predict").ravel(), proba.argmax(axis=1))


def test_binary_outputs_are_answered_in_json(
    client: httpclient.InferenceServerClient, rows: np.ndarray, model: TrainedModel
) -> None:
    result = infer(client, rows, ["predict_proba"], binary_output=True)

    (output,) = result.get_response()["outputs"]
    assert "data" in output
    assert "binary_data_size" not in output["parameters"]
    np.testing.assert_allclose(
        result.as_numpy("predict_proba"),
        model.estimator.predict_proba(rows),
        atol=1e-6,
    )


def test_binary_inputs_are_refused(
    client: httpclient.InferenceServerClient, rows: np.ndarray
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        infer(client, rows, binary_input=True)
    # tritonclient sends no Content-Type: MLServer reads the body as JSON and fails.
    assert refused.value.status() == "422"


def _json_tensor(rows: np.ndarray) -> dict[str, object]:
    return {
        "name": "input",
        "shape": list(rows.shape),
        "datatype": "FP32",
        "data": rows.ravel().tolist(),
    }


def _body(kind: str, rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A request body of the given kind and the headers that kind needs."""
    if kind == "malformed":
        return b'{"inputs": [', {}
    if kind == "binary":  # Triton's binary tensor extension
        raw = rows.astype("<f4").tobytes()
        tensor = {
            "name": "input",
            "shape": list(rows.shape),
            "datatype": "FP32",
            "parameters": {"binary_data_size": len(raw)},
        }
        header = json.dumps({"inputs": [tensor]}).encode()
        return header + raw, {"Inference-Header-Content-Length": str(len(header))}
    request: dict[str, object] = {
        "inputs": [_json_tensor(rows[:, :29] if kind == "29 features" else rows)]
    }
    if kind == "unknown output":
        request["outputs"] = [{"name": "logits"}]
    return json.dumps(request).encode(), {}


BC = "breast_cancer"
JSON = {"Content-Type": "application/json"}
OCTETS = {"Content-Type": "application/octet-stream"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
IHCL = {"Inference-Header-Content-Length": "10"}

# id: (body kind, headers, model, status, answer)
CASES = {
    "json": ("json", JSON, BC, 200, "outputs"),
    "no content-type": ("json", {}, BC, 200, "outputs"),
    "json, Inference-Header-Content-Length ignored": ("json", {**JSON, **IHCL}, BC, 200, "outputs"),
    "octet-stream": ("json", OCTETS, BC, 422, "detail"),
    "form content-type": ("json", FORM, BC, 422, "detail"),
    "malformed json": ("malformed", JSON, BC, 422, "detail"),
    "unknown output": ("unknown output", JSON, BC, 400, "error"),
    "unknown model": ("json", JSON, "nope", 404, "error"),
    "binary extension": ("binary", {}, BC, 422, "detail"),
    "binary extension, octet-stream": ("binary", OCTETS, BC, 500, "text"),
    "29 features": ("29 features", JSON, BC, 500, "text"),
}


@pytest.mark.parametrize(
    ("kind", "headers", "model_name", "status", "answer"), CASES.values(), ids=CASES
)
def test_wire_facts(
    mlserver_breast_cancer: MLServerProcess,
    rows: np.ndarray,
    kind: str,
    headers: dict[str, str],
    model_name: str,
    status: int,
    answer: str,
) -> None:
    body, extra = _body(kind, rows)
    connection = http.client.HTTPConnection(mlserver_breast_cancer.address, timeout=10)
    try:
        connection.request("POST", f"/v2/models/{model_name}/infer", body, {**headers, **extra})
        response = connection.getresponse()
        content_type, payload = response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()

    assert response.status == status
    if answer == "text":  # Starlette's error page; MLServer's default debug mode adds the traceback
        assert content_type.startswith("text/plain")
        assert payload
        return
    assert content_type == "application/json"
    document = json.loads(payload)
    if answer == "outputs":
        assert [o["name"] for o in document["outputs"]] == ["predict"]
    elif answer == "error":
        assert set(document) == {"error"}
        assert isinstance(document["error"], str)
    else:
        assert set(document) == {"detail"}
        assert isinstance(document["detail"], list)
