"""Bring your own model: a scikit-learn model trained here, exported to ONNX, with its
data in every format ``--data`` reads, through ``guard attack``, ``guard certify``,
``guard calibrate-squeeze`` and ``guard tune`` (in-process via ``guard.cli.main``,
one ``guard attack`` as a subprocess; real onnxruntime, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

from guard.cli import main
from tests.integration.own_model import (
    CLASSES,
    FEATURES,
    SIDE,
    OwnModel,
    train,
    write_csv,
    write_images,
)

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
CLI = [sys.executable, "-m", "guard.cli", "--log-level", "error", "attack"]
FAMILIES = {"evasion", "extraction", "membership", "inversion", "benign", "adaptive"}


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> OwnModel:
    return train(tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> OwnModel:
    return train(tmp_path_factory.mktemp("image"), image=True)


def guard(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "error", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def labels_of(own: OwnModel, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(own.onnx), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(["label"], {name: x.astype(np.float32)})[0]


def test_attack_runs_every_family_on_an_onnx_file_with_npz_data(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    code, stdout, err = guard(
        capsys,
        "attack",
        *("--model", str(own.onnx), "--data", str(own.npz), "--input-range", "0,1"),
        *("--samples", "2", "--budget", "60", "--benign-clients", "4", "--report", str(out)),
    )
    assert code == 0, err
    document = report(out)
    assert document["model"] == "model"
    assert {e["family"] for e in document["entries"]} == FAMILIES
    membership = [e for e in document["entries"] if e["family"] == "membership"]
    # every member record is in the evaluation set, with as many held-out ones
    assert {e["units"] for e in membership} == {2 * min(len(own.x) // 2, len(own.x_members))}
    # square-l2 cannot fold 12 values into a 4 x 4 image: left out of "all"
    assert "square-l2" not in {e["attack"] for e in document["entries"]}
    assert "knockoff" in stdout and "membership-lira" in stdout


def test_csv_data_gives_the_same_run_as_the_npz(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "held.csv"
    write_csv(data, own.x, own.y, header=True, label_first=True)
    runs: list[list[dict[str, Any]]] = []
    for args in (
        ("--data", str(own.npz)),
        ("--data", str(data), "--label-column", "label"),
        ("--data", str(_headerless(tmp_path, own)), "--label-column", "-1"),
    ):
        out = tmp_path / f"r{len(runs)}.json"
        code, _, err = guard(
            capsys,
            "attack",
            *("--model", str(own.onnx), *args, "--input-range", "0,1"),
            *("--attack", "benign,knockoff", "--budget", "60", "--benign-clients", "3"),
            *("--report", str(out)),
        )
        assert code == 0, err
        runs.append([_without_timing(e) for e in report(out)["entries"]])
    assert runs[0] == runs[1] == runs[2]


def _headerless(folder: Path, own: OwnModel) -> Path:
    path = folder / "plain.csv"
    write_csv(path, own.x, own.y, header=False, label_first=False)
    return path


def _without_timing(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if "second" not in k and "time" not in k}


def test_npy_rows_are_labelled_by_the_model_and_membership_is_skipped(
    own: OwnModel, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.npy"
    np.save(rows, own.x)
    out = tmp_path / "report.json"
    result = subprocess.run(
        [
            *(*CLI, "--model", str(own.onnx), "--data", str(rows), "--input-range", "0,1"),
            *("--attack", "membership,benign", "--budget", "40", "--benign-clients", "2"),
            *("--report", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "own answers as labels" in result.stdout
    assert "membership skipped: the data has no member rows" in result.stdout
    document = report(out)
    assert [e["attack"] for e in document["entries"]] == ["benign"]
    # Labels are the model's answers: honest clients' accuracy is agreement with the model,
    # above the accuracy against the true labels the .npz carries.
    code_npz = tmp_path / "npz.json"
    subprocess.run(
        [
            *(*CLI, "--model", str(own.onnx), "--data", str(own.npz), "--input-range", "0,1"),
            *("--attack", "benign", "--budget", "40", "--benign-clients", "2"),
            *("--report", str(code_npz)),
        ],
        capture_output=True,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    agreement = document["entries"][0]["accuracy"]
    assert agreement > report(code_npz)["entries"][0]["accuracy"]


def test_image_folder_is_read_resized_and_scaled_to_the_model(
    image_model: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.subject import resolve_subject

    native, large = tmp_path / "native", tmp_path / "large"
    x = image_model.x[:60]
    y = image_model.y[:60]
    write_images(native, x, y, scale=1)
    write_images(large, x, y, scale=3)
    subject = resolve_subject(
        str(image_model.onnx),
        data=native,
        overrides=_range01(),
    )
    assert subject.input_shape == (SIDE, SIDE, 3) and subject.input_name == "image"
    # rows in the reader's order: class folders, then file names (i.png: row i of x)
    files = sorted(native.glob("*/*.png"), key=lambda p: (int(p.parent.name), p.name))
    expected = np.stack([np.round(x[int(p.stem)] * 255) / 255 for p in files])
    assert np.allclose(subject.x, expected, atol=1e-6)
    assert np.array_equal(subject.y, [int(p.parent.name) for p in files])
    resized = resolve_subject(str(image_model.onnx), data=large, overrides=_range01())
    assert resized.x.shape == (60, SIDE * SIDE * 3)
    assert np.abs(resized.x - subject.x).mean() < 0.05  # bilinear resampling of 3x blocks
    out = tmp_path / "report.json"
    code, _, err = guard(
        capsys,
        "attack",
        *("--model", str(image_model.onnx), "--data", str(native), "--input-range", "0,1"),
        *("--attack", "simba,square-l2,knockoff", "--samples", "2", "--budget", "60"),
        *("--report", str(out)),
    )
    assert code == 0, err
    assert [e["attack"] for e in report(out)["entries"]] == ["simba", "square-l2", "knockoff"]


def _range01():  # type: ignore[no-untyped-def]
    from guard.subject import Overrides

    return Overrides(input_range=(0.0, 1.0))


def test_certify_a_user_model(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "cert.csv"
    code, stdout, err = guard(
        capsys,
        "certify",
        *("--model", str(own.onnx), "--data", str(own.npz), "--sigma", "0.02", "0.25"),
        *("--samples", "12", "--n", "400", "--n0", "50", "--report", str(rows)),
    )
    assert code == 0, err
    assert stdout.startswith("model: n=400 n0=50") and "σ = 0.25" in stdout
    with rows.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 24
    spaced = [i * len(own.x) // 12 for i in range(12)]
    clean = labels_of(own, own.x[spaced])
    small = [r for r in table if r["sigma"] == "0.02"]
    assert [int(r["index"]) for r in small] == spaced
    assert [int(r["label"]) for r in small] == own.y[spaced].tolist()
    # tiny noise: the smoothed model answers as the model does (or abstains)
    agree = [
        int(r["predict"]) == c for r, c in zip(small, clean, strict=True) if r["predict"] != "-1"
    ]
    assert len(agree) >= 8 and all(agree)


def test_calibrate_squeeze_on_a_user_model_writes_a_stage_the_guard_loads(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.config import load_policy
    from guard.runtime import build_runtime

    code, stdout, err = guard(
        capsys,
        "calibrate-squeeze",
        *("--model", str(own.onnx), "--data", str(own.npz), "--input-range", "0,1"),
        *("--fpr", "0.05", "--squeezer", "bits=3", "--holdout", "0.3"),
    )
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("threshold: ") and "on 168 benign inputs" in lines[0]
    snippet = yaml.safe_load("\n".join(lines[lines.index("# under models.<name>.stages:") + 1 :]))
    assert snippet[0]["squeeze_detect"]["range"] == [0.0, 1.0]
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {"version": 1, "models": {"mine": {"model": str(own.onnx), "stages": snippet}}}
        )
    )
    build_runtime(load_policy(policy), session=None)


def test_tune_a_policy_that_references_the_model_file(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.config import load_policy

    policy = _policy(tmp_path, own)
    code, _, err = guard(
        capsys,
        "tune",
        *("--policy", str(policy), "--model", "mine", "--data", str(own.npz)),
        *("--max-false-positive", "0.05", "--risk-tolerance", "0.05"),
        *("--out", str(tmp_path / "tuned.yaml")),
    )
    assert code == 0, err
    text = (tmp_path / "tuned.yaml").read_text()
    assert "for model mine (data: data.npz)" in text
    tuned = load_policy(tmp_path / "tuned.yaml")
    assert tuned.models["mine"].model_file == own.onnx.resolve()
    assert "prada" in {s.kind for s in tuned.models["mine"].stages}
    # the walk-through's last step: serve the tuned policy and attack through it
    from guard.attacks.guarded import InProcessGuard

    out = tmp_path / "through.json"
    with InProcessGuard(tmp_path / "tuned.yaml") as served:
        code, _, err = guard(
            capsys,
            "attack",
            *("--policy", str(tmp_path / "tuned.yaml"), "--model", "mine"),
            *("--data", str(own.npz), "--target", served.url),
            *("--attack", "jbda,benign", "--budget", "150", "--benign-clients", "3"),
            *("--report", str(out)),
        )
    assert code == 0, err
    entries = {e["attack"]: e for e in report(out)["entries"]}
    assert report(out)["target"] == served.url
    assert entries["jbda"]["queries"] == 150 and entries["benign"]["queries"] == 450


def _policy(folder: Path, own: OwnModel) -> Path:
    policy = folder / "my-policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "models": {
                    "mine": {
                        "model": str(own.onnx),
                        "stages": [
                            {"validate": {"min": 0.0, "max": 1.0, "max_batch": 256}},
                            {"prada": {"delta": 0.9, "min_queries": 100, "action": "flag"}},
                        ],
                    }
                },
            }
        )
    )
    return policy


def test_a_policy_model_takes_its_range_from_validate(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    code, _, err = guard(
        capsys,
        "attack",
        *("--policy", str(_policy(tmp_path, own)), "--model", "mine", "--data", str(own.npz)),
        *("--attack", "simba", "--samples", "2", "--budget", "40", "--report", str(out)),
    )
    assert code == 0, err
    assert report(out)["model"] == "mine"
    assert report(out)["entries"][0]["params"]["epsilon"] == pytest.approx(0.125)


def test_attack_a_v2_server_by_url(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.attacks.guarded import InProcessGuard

    policy = tmp_path / "serve.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "models": {"mine": {"model": str(own.onnx)}}}))
    results: list[dict[str, Any]] = []
    certified: list[list[tuple[str, str, str]]] = []
    with InProcessGuard(policy) as served:
        for model in (served.url, str(own.onnx)):
            out = tmp_path / f"r{len(results)}.json"
            code, _, err = guard(
                capsys,
                "attack",
                *("--model", model, "--served-name", "mine", "--data", str(own.npz)),
                *("--input-range", "0,1", "--attack", "knockoff", "--budget", "60"),
                *("--report", str(out)),
            )
            assert code == 0, err
            results.append(report(out)["entries"][0])
            rows = tmp_path / f"c{len(results)}.csv"
            code, _, err = guard(
                capsys,
                "certify",
                *("--model", model, "--served-name", "mine", "--data", str(own.npz)),
                *("--sigma", "0.1", "--n", "200", "--n0", "20", "--samples", "5", "--batch", "110"),
                *("--report", str(rows)),
            )
            assert code == 0, err
            certified.append(_certificates(rows))
    remote, local = results
    assert remote["queries"] == local["queries"] == 60
    assert remote["fidelity"] == pytest.approx(local["fidelity"], abs=0.05)
    # the same noise draws answered by the server (one request per batch) or in-process
    assert certified[0] == certified[1] and len(certified[0]) == 5


def _certificates(path: Path) -> list[tuple[str, str, str]]:
    with path.open() as f:
        return [(r["index"], r["predict"], r["radius"]) for r in csv.DictReader(f)]


def test_a_zipmap_model_needs_classes_then_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zipped = train(tmp_path / "zip", zipmap=True)
    base = ["attack", "--model", str(zipped.onnx), "--data", str(zipped.npz)]
    base += ["--input-range", "0,1", "--attack", "benign", "--budget", "20"]
    code, _, err = guard(capsys, *base)
    assert code == 2 and "--classes" in err
    code, stdout, err = guard(capsys, *base, "--classes", str(CLASSES), "--benign-clients", "2")
    assert code == 0, err
    assert "benign" in stdout


@pytest.mark.parametrize(
    ("make", "flags", "message"),
    [
        (lambda d, own: _write(d / "data.txt", "1,2\n"), (), "unknown file type '.txt'"),
        (lambda d, own: _npz(d / "x.npz", x=own.x), (), "no array 'y'"),
        (
            lambda d, own: _npz(d / "wide.npz", x=np.zeros((5, FEATURES + 3)), y=np.zeros(5)),
            (),
            f"but model takes ({FEATURES},)",
        ),
        (lambda d, own: own.npz, ("--no-range",), "--input-range"),
        (lambda d, own: _npz(d / "y.npz", x=own.x, y=own.y + CLASSES), (), "--classes"),
    ],
    ids=["unknown-type", "missing-y", "shape-mismatch", "missing-range", "labels-beyond-classes"],
)
def test_clear_errors_name_the_fault_and_the_flag(
    own: OwnModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path, OwnModel], Path],
    flags: tuple[str, ...],
    message: str,
) -> None:
    data = make(tmp_path, own)
    argv = ["attack", "--model", str(own.onnx), "--data", str(data)]
    if "--no-range" not in flags:
        argv += ["--input-range", "0,1"]
    code, stdout, err = guard(capsys, *argv)
    assert code == 2
    assert stdout == ""
    assert err.count("\n") == 1 and err.startswith("guard: ") and "Traceback" not in err
    assert message in err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def test_tune_a_policy_whose_model_is_served_by_an_upstream(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No local file: the interface comes from the upstream's V2 metadata, the bare model
    (the baseline) is the upstream itself, the candidates forward to it."""
    from guard.attacks.guarded import InProcessGuard
    from guard.config import load_policy

    upstream = tmp_path / "upstream.yaml"
    upstream.write_text(
        yaml.safe_dump({"version": 1, "models": {"theirs": {"model": str(own.onnx)}}})
    )
    with InProcessGuard(upstream) as server:
        policy = tmp_path / "policy.yaml"
        stages = [
            {"validate": {"min": 0.0, "max": 1.0}},
            {"prada": {"delta": 0.9, "min_queries": 100, "action": "flag"}},
        ]
        model = {"upstream": {"url": server.url, "model": "theirs"}, "stages": stages}
        policy.write_text(yaml.safe_dump({"version": 1, "models": {"mine": model}}))
        code, _, err = guard(
            capsys,
            "tune",
            *("--policy", str(policy), "--model", "mine", "--data", str(own.npz)),
            *("--max-false-positive", "0.05", "--risk-tolerance", "0.05"),
            *("--out", str(tmp_path / "tuned.yaml")),
        )
    assert code == 0, err
    tuned = load_policy(tmp_path / "tuned.yaml")
    assert tuned.models["mine"].upstream is not None and tuned.models["mine"].model_file is None
    assert "knockoff: fidelity" in (tmp_path / "tuned.yaml").read_text()


def test_a_model_served_by_mlserver_behind_a_policy(
    own: OwnModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same scikit-learn model served by MLServer (answers predict_proba, metadata
    empty): the policy's upstream is attacked undefended and tuned for; the flags supply
    what MLServer's metadata does not say."""
    from guard.config import load_policy
    from tests.integration.mlserver_upstream import (
        MODEL_FILE,
        start_mlserver,
        usable_mlserver_venv,
    )

    venv = usable_mlserver_venv()
    model_dir = tmp_path / "mlserver"
    model_dir.mkdir()
    (model_dir / MODEL_FILE).write_bytes((own.onnx.parent / "model.joblib").read_bytes())
    with start_mlserver(model_dir, venv=venv, name="mine", predict_fn="predict_proba") as server:
        policy = tmp_path / "policy.yaml"
        stages = [
            {"validate": {"shape": [FEATURES], "min": 0.0, "max": 1.0}},
            {"privacy": {"mechanism": "laplace", "epsilon": 2.0, "output": "predict_proba"}},
        ]
        model = {"upstream": {"url": server.url, "timeout": 10}, "stages": stages}
        policy.write_text(yaml.safe_dump({"version": 1, "models": {"mine": model}}))
        subject = ("--policy", str(policy), "--model", "mine", "--data", str(own.npz))
        code, _, err = guard(capsys, "attack", *subject, "--attack", "knockoff")
        assert code == 2 and "--classes" in err  # MLServer's metadata names no outputs
        names = ("--classes", str(CLASSES), "--scores-output", "predict_proba")
        out = tmp_path / "report.json"
        code, _, err = guard(
            capsys,
            "attack",
            *subject,
            *names,
            *("--attack", "knockoff,membership", "--budget", "60", "--report", str(out)),
        )
        assert code == 0, err
        entries = {e["attack"]: e for e in report(out)["entries"]}
        assert entries["knockoff"]["queries"] == 60 and entries["knockoff"]["fidelity"] > 0.5
        # the upstream answers the ONNX copy's probabilities: the same membership scores
        local = tmp_path / "local.json"
        code, _, err = guard(
            capsys,
            "attack",
            *("--model", str(own.onnx), "--data", str(own.npz), "--input-range", "0,1"),
            *("--attack", "membership", "--report", str(local)),
        )
        assert code == 0, err
        mine = {e["attack"]: e for e in report(local)["entries"]}
        assert entries["membership-loss"]["auc"] == pytest.approx(
            mine["membership-loss"]["auc"], abs=0.01
        )
        code, _, err = guard(
            capsys,
            "tune",
            *subject,
            *names,
            *("--risk-tolerance", "0.05", "--out", str(tmp_path / "tuned.yaml")),
        )
        assert code == 0, err
    tuned = load_policy(tmp_path / "tuned.yaml")
    assert tuned.models["mine"].upstream is not None
    assert "membership" in (tmp_path / "tuned.yaml").read_text()
