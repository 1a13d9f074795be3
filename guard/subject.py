"""The subject of an offline tool: the model under test, how to query it, and its data.

``guard attack``, ``guard tune``, ``guard certify`` and ``guard calibrate-squeeze``
name what they work on the same way (:func:`resolve_subject`, flags in
:mod:`guard.commands.subjectargs`):

* the model: a built-in name (:data:`guard.models.MODELS`), an ONNX file run by
  onnxruntime, a model of a policy (``--policy P --model NAME``: its local
  ``model:`` file, a ``builtin:`` reference, else its upstream URL), or the URL of
  a V2 server (``--model http://host:port --served-name NAME``);
* its interface (input name, row shape, dtype, value range, classes, the scores
  and label outputs): from the policy's ``validate`` stage (``shape``, ``dtype``,
  ``min``, ``max``, ``input``), the ONNX model's own inputs and outputs, or the V2
  server's model metadata (``GET /v2/models/NAME``), each overridden by a flag;
* its data: ``--data FILE`` (:mod:`guard.datafiles`), or a built-in's shipped rows.

Rows stay flat (``[N, F]``, ``F = prod(input_shape)``) for attacks and the tuner;
a target reshapes each batch to ``[N, *input_shape]`` as it sends it.

What is still unknown once every source was read is a :class:`~guard.errors.UsageError`
naming the flag that supplies it (``guard`` exits 2 with that one line). The value
range is only required by what uses it (:attr:`Subject.spec`): certification does
not need it, attacks and tuning do.

Importing this module is cheap: numpy only.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.errors import UsageError

if TYPE_CHECKING:
    from guard.attacks.membership import MembershipData
    from guard.attacks.targets import Target, TargetSpec

# V2 datatypes of a model's input that an attack can send (rows are real numbers).
_NUMERIC = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
}
_ONNX_TYPES = {  # onnxruntime's type strings -> V2 datatypes
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
}
_SCORE_TYPES = ("FP32", "FP64", "FP16")
_LABEL_TYPES = ("INT64", "INT32")
HTTP_BATCH = 64  # rows per request to an undefended V2 server
ZIPMAP = "ZIPMAP"  # skl2onnx's default probability output: a list of {class: probability}


@dataclass(frozen=True, kw_only=True, slots=True)
class Overrides:
    """What the command line says about the model, each ``None`` when not given.

    ``input_range`` is ``(lo, hi)`` or the string ``"data"`` (per-feature minimum and
    maximum of the data's rows)."""

    input_name: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_range: tuple[float, float] | str | None = None
    classes: int | None = None
    scores_output: str | None = None
    label_output: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Interface:
    """A model's interface as read from its sources (policy, ONNX, V2 metadata, flags)."""

    input_name: str | None = None
    input_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    lo: Any = None  # float64 scalar or [F] array, None when unknown
    hi: Any = None
    n_classes: int | None = None
    scores_output: str | None = None
    label_output: str | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class Subject:
    """The model under test, queried undefended, and its data.

    The model is ``model_file`` (run in-process by onnxruntime) or ``url`` +
    ``served_name`` (a V2 server). ``x`` ``[N, F]`` / ``y`` ``[N]`` are held-out rows
    (the model never trained on them); ``x_members`` / ``y_members`` rows it trained on
    (for membership attacks; ``None`` when unknown); ``x_train`` the attacker's own
    unlabelled rows (the extraction pool; ``None``: half of ``x``). ``lo``/``hi`` are
    the value range (scalars, or ``[F]`` per feature; ``None`` when unknown).
    ``notes`` say what was inferred (printed by the commands)."""

    name: str
    builtin_name: str | None = None
    model_file: Path | None = None
    url: str | None = None
    served_name: str | None = None
    input_name: str = "input"
    input_shape: tuple[int, ...]
    dtype: str = "FP32"
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    n_classes: int
    scores_output: str | None = "probabilities"
    label_output: str | None = "label"
    x: np.ndarray
    y: np.ndarray
    x_members: np.ndarray | None = None
    y_members: np.ndarray | None = None
    x_train: np.ndarray | None = None
    data_name: str = ""  # where the rows come from: a built-in's name, else the file
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def builtin(cls, name: str) -> Subject:
        """A demo model of :mod:`guard.models` with its sidecar and shipped rows, exactly
        as :meth:`TargetSpec.builtin`, :func:`~guard.models.load_samples` and
        :func:`~guard.models.load_split` give them."""
        from guard.attacks.targets import TargetSpec
        from guard.models import load_split, model_path

        spec = TargetSpec.builtin(name)
        split = load_split(name)
        return cls(
            name=name,
            builtin_name=name,
            model_file=model_path(name),
            input_shape=spec.input_shape or (spec.n_features,),
            lo=spec.lo,
            hi=spec.hi,
            n_classes=spec.n_classes,
            x=split.x_nonmembers,
            y=split.y_nonmembers,
            x_members=split.x_members,
            y_members=split.y_members,
            data_name=name,
        )

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def data_label(self) -> str:
        """``built-in NAME`` or the data file's name, for reports."""
        if self.data_name in _builtins():
            return f"built-in {self.data_name}"
        return Path(self.data_name).name or self.name

    @property
    def has_range(self) -> bool:
        return self.lo is not None and self.hi is not None

    @property
    def spec(self) -> TargetSpec:
        """The interface an attacker knows; needs the value range."""
        from guard.attacks.targets import TargetSpec

        if self.lo is None or self.hi is None:
            raise UsageError(
                f"the value range of {self.name}'s inputs is unknown: pass --input-range LO,HI "
                "(or --input-range data for each feature's range in the data), or give the "
                "policy's validate stage min and max"
            )
        return TargetSpec(self.n_features, self.n_classes, self.lo, self.hi, self._shape())

    def _shape(self) -> tuple[int, ...] | None:
        return None if self.input_shape == (self.n_features,) else self.input_shape

    def target(self, **kwargs: Any) -> Target:
        """A fresh undefended target: the local ONNX model, else the V2 server
        (:data:`HTTP_BATCH` rows per request unless ``batch_size`` says otherwise)."""
        from guard.attacks.targets import HttpTarget, OnnxTarget, TargetSpec

        spec = (
            self.spec
            if self.has_range
            else TargetSpec(
                self.n_features,
                self.n_classes,
                np.asarray(-np.inf),
                np.asarray(np.inf),
                self._shape(),
            )
        )
        names: dict[str, Any] = {
            "input_name": self.input_name,
            "scores_output": self.scores_output or "",
            "label_output": self.label_output or "",
            **kwargs,
        }
        if self.model_file is not None:
            return OnnxTarget(self.model_file, spec, **names)
        if self.url is None or self.served_name is None:
            raise UsageError(f"{self.name}: neither a model file nor a server URL to query")
        names.setdefault("batch_size", HTTP_BATCH)  # undefended: batches change only the speed
        return HttpTarget(self.url, self.served_name, spec, **names)

    def membership_data(self, rng: np.random.Generator) -> MembershipData | None:
        """The membership split of :func:`guard.attacks.membership.split_membership`;
        ``None`` when the data has no members."""
        from guard.attacks.membership import split_membership

        if self.x_members is None or self.y_members is None:
            return None
        return split_membership(self.x_members, self.y_members, self.x, self.y, rng)

    def with_labels_from_model(self) -> Subject:
        """``y`` (and ``y_members``) replaced by the model's own answers."""
        target = self.target()
        try:
            y = target.query(self.x).labels
            y_members = None if self.x_members is None else target.query(self.x_members).labels
        finally:
            target.close()
        note = (
            f"the data has no labels: using {self.name}'s own answers as labels "
            "(accuracies are agreement with the model)"
        )
        return replace(self, y=y, y_members=y_members, notes=(*self.notes, note))


# -- resolving -------------------------------------------------------------------


def resolve_subject(
    model: str,
    *,
    data: str | Path | None = None,
    policy: Path | None = None,
    served_name: str | None = None,
    label_column: str | None = None,
    overrides: Overrides | None = None,
) -> Subject:
    """The :class:`Subject` that ``--model`` (and ``--policy``, ``--served-name``,
    ``--data``, ``--label-column`` and the interface flags) name. Raises
    :class:`~guard.errors.UsageError` naming the flag that supplies what is missing,
    and :class:`~guard.errors.PolicyError` for a policy that does not load."""
    from guard import datafiles
    from guard.models import MODELS

    overrides = overrides or Overrides()
    builtin, model_file, url, name, policy_side = _locate(model, policy, served_name)
    if data is None and builtin is None and policy is not None and model in MODELS:
        data = model  # a policy's model keyed by a built-in name: that built-in's data
    builtin_data = isinstance(data, str) and data in MODELS and not Path(data).exists()
    if builtin is not None and (data is None or (builtin_data and data == builtin)):
        subject = Subject.builtin(builtin)
        if policy is not None:  # named as the policy serves it (a guard's model name)
            subject = replace(subject, name=model)
        return _apply_builtin_overrides(subject, overrides)
    if data is None:
        raise UsageError(
            f"--data is needed for {name}: a .npz, .npy or .csv file or a folder of images "
            f"(built-in data sets: {', '.join(MODELS)})"
        )
    found = Interface()
    if model_file is not None:
        found = _merge(found, onnx_interface(model_file))
    elif url is not None:
        try:
            found = _merge(found, v2_interface(url, name))
        except UsageError:
            if policy is None:
                raise
            # a policy's upstream may be down now: its validate stage and the flags say the rest
    found = _merge(found, policy_side)
    known = builtin or (str(data) if builtin_data else None)
    if known is not None:
        sidecar = Subject.builtin(known)
        found = _merge(
            found,
            Interface(
                input_name=found.input_name or sidecar.input_name,
                input_shape=sidecar.input_shape,
                lo=sidecar.lo,
                hi=sidecar.hi,
                n_classes=sidecar.n_classes,
                scores_output=found.scores_output or sidecar.scores_output,
                label_output=found.label_output or sidecar.label_output,
            ),
        )
        # The policy's validate still names the input; its min and max are bounds for
        # refusing input, looser than the built-in data's recorded range, which stays.
        found = _merge(found, replace(policy_side, lo=None, hi=None))
    found = _apply(found, overrides)
    if builtin_data:
        rows = datafiles.builtin_rows(str(data))
    else:
        rows = datafiles.read(
            Path(data),
            label_column=label_column,
            image_shape=found.input_shape,
            value_range=_scalar_range(found),
        )
    shape = found.input_shape or rows.row_shape
    if shape is None or any(d < 1 for d in shape):
        raise UsageError(
            f"the shape of {name}'s input rows is unknown: pass --input-shape, e.g. 32,32,3 or 64"
        )
    n_features = math.prod(shape)
    arrays = {}
    for key in ("x", "x_members", "x_train"):
        value = getattr(rows, key)
        if value is None:
            continue
        row = tuple(value.shape[1:])
        if math.prod(row) != n_features:
            raise UsageError(
                f"--data {data}: {key} has rows of shape {row} ({math.prod(row)} values) but "
                f"{name} takes {tuple(shape)} ({n_features}); check the data, or --input-shape"
            )
        arrays[key] = np.ascontiguousarray(value.reshape(len(value), n_features), np.float32)
    lo, hi = found.lo, found.hi
    if overrides.input_range == "data":
        stacked = np.concatenate(list(arrays.values()))
        lo, hi = stacked.min(axis=0).astype(np.float64), stacked.max(axis=0).astype(np.float64)
    n_classes = found.n_classes
    if n_classes is None:
        raise UsageError(
            f"the number of classes of {name} is unknown (its outputs do not say): pass --classes N"
        )
    if found.scores_output is None and found.label_output is None:
        raise UsageError(
            f"which output of {name} holds the class scores is unknown: pass --scores-output "
            "NAME (and --label-output NAME)"
        )
    subject = Subject(
        name=name,
        builtin_name=builtin,
        model_file=model_file,
        url=url,
        served_name=name if url is not None else None,
        input_name=found.input_name or "input",
        input_shape=tuple(shape),
        dtype=found.dtype or "FP32",
        lo=None if lo is None else np.asarray(lo, dtype=np.float64),
        hi=None if hi is None else np.asarray(hi, dtype=np.float64),
        n_classes=n_classes,
        scores_output=found.scores_output,
        label_output=found.label_output,
        x=arrays["x"],
        y=np.zeros(len(arrays["x"]), dtype=np.int64) if rows.y is None else rows.y,
        x_members=arrays.get("x_members"),
        y_members=rows.y_members,
        x_train=arrays.get("x_train"),
        data_name=str(data),
        notes=rows.notes,
    )
    _check_labels(subject, data)
    if rows.y is None:
        subject = subject.with_labels_from_model()
    return subject


def _builtins() -> tuple[str, ...]:
    from guard.models import MODELS

    return MODELS


def _check_labels(subject: Subject, data: Any) -> None:
    for name, y in (("y", subject.y), ("y_members", subject.y_members)):
        if y is None or not len(y):
            continue
        if y.min() < 0 or y.max() >= subject.n_classes:
            raise UsageError(
                f"--data {data}: {name} holds labels from {int(y.min())} to {int(y.max())} but "
                f"{subject.name} has {subject.n_classes} classes (0 to {subject.n_classes - 1}); "
                "check the data, or pass --classes"
            )


def _locate(
    model: str, policy: Path | None, served_name: str | None
) -> tuple[str | None, Path | None, str | None, str, Interface]:
    """(built-in name, model file, server URL, display name, what the policy says)."""
    from guard.models import MODELS, model_path

    if policy is not None:
        from guard.config import load_policy

        loaded = load_policy(policy)
        if model not in loaded.models:
            raise UsageError(f"{policy} has no model {model!r}; it has {', '.join(loaded.models)}")
        config = loaded.models[model]
        side = validate_interface(config.stages)
        builtin = next((n for n in MODELS if config.model_file == model_path(n)), None)
        if config.model_file is not None:
            return builtin, config.model_file, None, model, side
        upstream = config.upstream
        if upstream is None:  # load_policy refuses this; kept for the type checker
            raise UsageError(f"{policy}: models.{model} has neither a model file nor an upstream")
        return None, None, upstream.url, served_name or upstream.model or model, side
    if model in MODELS:
        return model, model_path(model), None, model, Interface()
    if model.startswith(("http://", "https://")):
        if not served_name:
            raise UsageError(f"--model {model} is a server: name its model with --served-name")
        return None, None, model.rstrip("/"), served_name, Interface()
    path = Path(model)
    if path.suffix.lower() != ".onnx" and not path.is_file():
        raise UsageError(
            f"--model {model!r} is neither a built-in ({', '.join(MODELS)}), an .onnx file, "
            "nor an http(s):// URL (a policy's model: add --policy FILE)"
        )
    if not path.is_file():
        raise UsageError(f"--model {model}: no such file")
    return None, path.resolve(), None, path.stem, Interface()


def _apply_builtin_overrides(subject: Subject, overrides: Overrides) -> Subject:
    changes: dict[str, Any] = {}
    if isinstance(overrides.input_range, tuple):
        lo, hi = overrides.input_range
        changes.update(lo=np.asarray(lo, np.float64), hi=np.asarray(hi, np.float64))
    elif overrides.input_range == "data":
        rows = [a for a in (subject.x, subject.x_members) if a is not None]
        stacked = np.concatenate(rows).astype(np.float64)
        changes.update(lo=stacked.min(axis=0), hi=stacked.max(axis=0))
    for key in ("input_name", "scores_output", "label_output"):
        if getattr(overrides, key) is not None:
            changes[key] = getattr(overrides, key)
    return replace(subject, **changes) if changes else subject


def _merge(first: Interface, second: Interface) -> Interface:
    """``first`` with the fields it lacks (``None``) taken from ``second``; ``second``'s
    fields win where it has them (later sources are more specific)."""
    values = {}
    for key in first.__dataclass_fields__:
        mine, theirs = getattr(first, key), getattr(second, key)
        values[key] = theirs if theirs is not None else mine
    return Interface(**values)


def _apply(found: Interface, overrides: Overrides) -> Interface:
    changes: dict[str, Any] = {}
    for key in ("input_name", "input_shape", "scores_output", "label_output"):
        if getattr(overrides, key) is not None:
            changes[key] = getattr(overrides, key)
    if overrides.classes is not None:
        changes["n_classes"] = overrides.classes
    if isinstance(overrides.input_range, tuple):
        changes["lo"], changes["hi"] = (np.float64(v) for v in overrides.input_range)
    return replace(found, **changes)


def _scalar_range(found: Interface) -> tuple[float, float] | None:
    if found.lo is None or found.hi is None:
        return None
    lo, hi = np.asarray(found.lo), np.asarray(found.hi)
    if lo.ndim or hi.ndim:
        return None
    return float(lo), float(hi)


# -- interface sources -------------------------------------------------------------


def validate_interface(stages: Sequence[Any]) -> Interface:
    """What a policy's ``validate`` stage declares: ``input``, ``shape``, ``dtype``,
    ``min``, ``max`` (the first validate stage; raw YAML options or typed ones)."""
    for entry in stages:
        if entry.kind != "validate":
            continue
        options = entry.options

        def get(key: str, options: Any = options) -> Any:
            if isinstance(options, Mapping):
                return options.get(key)
            return getattr(options, key, None)

        shape = get("shape")
        shape = tuple(int(d) for d in shape) if shape is not None else None
        if shape is not None and any(d < 1 for d in shape):
            shape = None
        lo, hi = get("min"), get("max")
        return Interface(
            input_name=get("input"),
            input_shape=shape,
            dtype=None if get("dtype") is None else str(get("dtype")),
            lo=None if lo is None else np.float64(lo),
            hi=None if hi is None else np.float64(hi),
        )
    return Interface()


def onnx_interface(path: Path) -> Interface:
    """The input and outputs of an ONNX model, as onnxruntime reads them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UsageError(f"--model {path}: onnxruntime cannot load it: {exc}") from exc
    inputs = [
        (i.name, _ONNX_TYPES.get(i.type, i.type), list(i.shape)) for i in session.get_inputs()
    ]
    outputs = []
    for o in session.get_outputs():
        kind = ZIPMAP if o.type.startswith("seq(map(") else _ONNX_TYPES.get(o.type, o.type)
        outputs.append((o.name, kind, list(o.shape) if o.shape is not None else []))
    return _interface(str(path), inputs, outputs)


def v2_interface(url: str, model: str, *, timeout: float = 10.0) -> Interface:
    """The input and outputs of ``model`` from a V2 server's ``GET /v2/models/NAME``."""
    import orjson

    address = f"{url}/v2/models/{urllib.parse.quote(model, safe='')}"
    try:
        with urllib.request.urlopen(address, timeout=timeout) as reply:
            body = orjson.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise UsageError(f"{address} answered {exc.code}: is --served-name right?") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"{address}: cannot read the model's metadata: {exc}") from exc

    def tensors(key: str) -> list[tuple[str, str, list[Any]]]:
        return [
            (str(t.get("name")), str(t.get("datatype")), list(t.get("shape") or []))
            for t in body.get(key) or []
            if isinstance(t, Mapping)
        ]

    return _interface(address, tensors("inputs"), tensors("outputs"))


def _interface(
    where: str, inputs: list[tuple[str, str, list[Any]]], outputs: list[tuple[str, str, list[Any]]]
) -> Interface:
    """The interface from named (name, datatype, shape) inputs and outputs; the batch
    dimension is the first. Several inputs leave the input unknown (--input-name)."""
    found: dict[str, Any] = {}
    if len(inputs) == 1:
        name, datatype, shape = inputs[0]
        found["input_name"] = name
        if datatype in _NUMERIC:
            found["dtype"] = datatype
        dims = [d if isinstance(d, int) and d > 0 else None for d in shape[1:]]
        if dims and all(d is not None for d in dims):
            found["input_shape"] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    scores = [o for o in outputs if o[1] == ZIPMAP or (o[1] in _SCORE_TYPES and len(o[2]) == 2)]
    labels = [o for o in outputs if o[1] in _LABEL_TYPES and len(o[2]) in (1, 2)]
    for candidates, key, hint in (
        (scores, "scores_output", "prob"),
        (labels, "label_output", "label"),
    ):
        if len(candidates) > 1:
            candidates = [c for c in candidates if hint in c[0].lower()] or []
        if len(candidates) == 1:
            found[key] = candidates[0][0]
    if found.get("scores_output"):
        shape = next(o[2] for o in outputs if o[0] == found["scores_output"])
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            found["n_classes"] = int(shape[1])
    return Interface(**found)
