"""Reading a user's data for the offline tools (``--data FILE``).

* ``.npz``: arrays ``x`` (rows, any row shape) and ``y`` (integer labels), and
  optionally ``x_members`` / ``y_members`` (rows the model was trained on: the
  membership attacks need them) and ``x_train`` (the attacker's own unlabelled rows:
  the extraction attacks' pool). Any other array is an error (a misspelt name
  would otherwise be ignored). Values are taken as they are (no scaling).
* ``.npy``: rows only. The labels are then the model's own answers; the commands say so.
* ``.csv``: one row per line, numbers only, an optional header line. The label is
  the column ``--label-column`` names (a header name, or a 0-based index), else the
  last column. Integer labels are used as they are; text labels become the index of
  the label in sorted order (scikit-learn's ``classes_`` order).
* a folder of images ``CLASS/NAME.png`` (also ``.jpg``, ``.jpeg``, ``.bmp``,
  ``.gif``, ``.webp``), read with Pillow (the ``images`` extra), converted to RGB
  (3 channels) or greyscale (1 channel, or an ``(H, W)`` input), resized to the
  model's input (bilinear), and scaled from 0..255 to the model's value range.
  Classes are the folder names: integers when every name is one, else the index of
  the name in sorted order. The layout is HWC unless the shape is ``(C, H, W)``
  with ``C`` in 1 or 3.

Errors are :class:`~guard.errors.UsageError` naming the file and what is wrong.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.errors import UsageError

NPZ_ARRAYS = ("x", "y", "x_members", "y_members", "x_train")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True, slots=True)
class Rows:
    """Rows as read (``x`` ``[N, *row_shape]``); ``y`` ``None`` when the data has no labels."""

    x: np.ndarray
    y: np.ndarray | None
    x_members: np.ndarray | None = None
    y_members: np.ndarray | None = None
    x_train: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    @property
    def row_shape(self) -> tuple[int, ...] | None:
        return tuple(self.x.shape[1:]) or None


def builtin_rows(name: str) -> Rows:
    """The held-out and member rows shipped with built-in model ``name``."""
    from guard.models import load_split

    split = load_split(name)
    return Rows(split.x_nonmembers, split.y_nonmembers, split.x_members, split.y_members)


def read(
    path: Path,
    *,
    label_column: str | None = None,
    image_shape: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
) -> Rows:
    """The rows of ``path`` (see the module); ``image_shape`` and ``value_range``
    are the model's, for image folders."""
    if path.is_dir():
        return read_images(path, image_shape, value_range)
    if not path.exists():
        raise UsageError(f"--data {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_npz(path)
    if suffix == ".npy":
        return Rows(_numbers(_load_npy(path), path, "x"), None)
    if suffix == ".csv":
        return read_csv(path, label_column)
    raise UsageError(
        f"--data {path}: unknown file type {suffix or '(none)'!r}; expected .npz, .npy, .csv "
        "or a folder of images (CLASS/NAME.png)"
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--data {path}: not a readable .npy file: {exc}") from exc


def read_npz(path: Path) -> Rows:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--data {path}: not a readable .npz file: {exc}") from exc
    unknown = sorted(set(arrays) - set(NPZ_ARRAYS))
    if unknown:
        raise UsageError(
            f"--data {path}: unknown array {unknown[0]!r}; expected {', '.join(NPZ_ARRAYS)}"
        )
    if "x" not in arrays:
        raise UsageError(f"--data {path}: no array 'x' (the held-out rows)")
    if "y" not in arrays:
        raise UsageError(
            f"--data {path}: no array 'y' (the labels of x); save it with np.savez(..., x=x, "
            "y=y), or pass the rows alone as a .npy file to label them by the model's answers"
        )
    if ("x_members" in arrays) != ("y_members" in arrays):
        raise UsageError(f"--data {path}: x_members and y_members go together")
    x = _numbers(arrays["x"], path, "x")
    rows = Rows(
        x,
        _labels(arrays["y"], len(x), path, "y"),
        None if "x_members" not in arrays else _numbers(arrays["x_members"], path, "x_members"),
        None,
        None if "x_train" not in arrays else _numbers(arrays["x_train"], path, "x_train"),
    )
    if rows.x_members is not None:
        y_members = _labels(arrays["y_members"], len(rows.x_members), path, "y_members")
        rows = Rows(rows.x, rows.y, rows.x_members, y_members, rows.x_train)
    for key in ("x_members", "x_train"):
        other = getattr(rows, key)
        if other is not None and other.shape[1:] != x.shape[1:]:
            raise UsageError(
                f"--data {path}: {key} has rows of shape {other.shape[1:]}, x {x.shape[1:]}"
            )
    return rows


def _numbers(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    if array.ndim < 2 or not len(array):
        raise UsageError(
            f"--data {path}: {key} must hold rows (at least 2 dimensions, [N, ...]) and at "
            f"least one; got shape {array.shape}"
        )
    if array.dtype.kind not in "biuf":
        raise UsageError(f"--data {path}: {key} must hold numbers; got {array.dtype}")
    return array.astype(np.float32, copy=False)


def _labels(array: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    array = np.asarray(array).reshape(-1) if np.asarray(array).ndim == 2 else np.asarray(array)
    if array.ndim != 1 or len(array) != n:
        raise UsageError(
            f"--data {path}: {key} must hold one label per row ({n}); got {array.shape}"
        )
    if array.dtype.kind == "f" and np.all(array == np.round(array)):
        array = array.astype(np.int64)
    if array.dtype.kind not in "biu":
        raise UsageError(f"--data {path}: {key} must hold integer class labels; got {array.dtype}")
    return array.astype(np.int64)


def read_csv(path: Path, label_column: str | None) -> Rows:
    with path.open(newline="", encoding="utf-8") as f:
        lines = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not lines:
        raise UsageError(f"--data {path}: empty")
    header: list[str] | None = None
    if not all(_is_number(cell) for cell in lines[0]):
        header, lines = [c.strip() for c in lines[0]], lines[1:]
    if not lines:
        raise UsageError(f"--data {path}: a header and no rows")
    width = len(lines[0])
    for number, row in enumerate(lines, start=2 if header else 1):
        if len(row) != width:
            raise UsageError(f"--data {path}: line {number} has {len(row)} columns, not {width}")
    if width < 2:
        raise UsageError(f"--data {path}: needs at least one feature column and a label column")
    column = _column(label_column, header, width, path)
    features = [i for i in range(width) if i != column]
    try:
        x = np.array([[float(row[i]) for i in features] for row in lines], dtype=np.float32)
    except ValueError as exc:
        raise UsageError(f"--data {path}: a feature is not a number: {exc}") from exc
    raw = [row[column].strip() for row in lines]
    notes: tuple[str, ...] = ()
    if all(_is_integer(v) for v in raw):
        y = np.array([int(float(v)) for v in raw], dtype=np.int64)
    else:
        names = sorted(set(raw))
        y = np.array([names.index(v) for v in raw], dtype=np.int64)
        notes = (
            f"{path.name}: text labels as classes 0..{len(names) - 1} in sorted order: "
            + ", ".join(names[:10])
            + (" ..." if len(names) > 10 else ""),
        )
    return Rows(x, y, notes=notes)


def _column(label_column: str | None, header: list[str] | None, width: int, path: Path) -> int:
    if label_column is None:
        return width - 1
    if header is not None and label_column in header:
        return header.index(label_column)
    if label_column.lstrip("-").isdigit() and -width <= int(label_column) < width:
        return int(label_column) % width
    known = f"its header: {', '.join(header)}" if header else "it has no header"
    raise UsageError(
        f"--label-column {label_column!r}: no such column in {path} ({known}; or a 0-based index)"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_integer(text: str) -> bool:
    return _is_number(text) and float(text) == int(float(text))


def read_images(
    folder: Path, shape: tuple[int, ...] | None, value_range: tuple[float, float] | None
) -> Rows:
    from guard.extras import hint, installed

    if not installed("PIL"):
        raise UsageError(f"--data {folder}: reading images needs Pillow {hint('PIL')}")
    from PIL import Image

    if shape is None or len(shape) not in (2, 3):
        raise UsageError(
            f"--data {folder}: a folder of images needs the model's input to be an image "
            f"(H,W,C or H,W); it takes {shape} (a model whose metadata leaves its image shape "
            "open: pass --input-shape H,W,C)"
        )
    if value_range is None:
        raise UsageError(
            f"--data {folder}: images are scaled from 0..255 to the model's value range, "
            "which is unknown: pass --input-range LO,HI"
        )
    channels_first = len(shape) == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3)
    if len(shape) == 2:
        height, width, channels = shape[0], shape[1], 1
    elif channels_first:
        channels, height, width = shape
    else:
        height, width, channels = shape
    if channels not in (1, 3):
        raise UsageError(f"--data {folder}: images have 1 or 3 channels; the model takes {shape}")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UsageError(f"--data {folder}: no class folders (expected CLASS/NAME.png)")
    numeric = all(p.name.isdigit() for p in classes)
    lo, hi = value_range
    rows, labels = [], []
    for index, directory in enumerate(classes):
        label = int(directory.name) if numeric else index
        for file in sorted(directory.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as opened:
                    image = opened.convert("RGB" if channels == 3 else "L")
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                    pixels = np.asarray(image, dtype=np.float32)
            except OSError as exc:
                raise UsageError(f"--data {file}: not a readable image: {exc}") from exc
            if channels == 1 and len(shape) == 3:
                pixels = pixels[..., None]
            if channels_first:
                pixels = np.moveaxis(pixels, -1, 0)
            rows.append(lo + pixels / 255.0 * (hi - lo))
            labels.append(label)
    if not rows:
        raise UsageError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its folders")
    notes = (
        ()
        if numeric
        else (
            f"{folder.name}: classes in sorted folder order: "
            + ", ".join(f"{i}={p.name}" for i, p in enumerate(classes[:10]))
            + (" ..." if len(classes) > 10 else ""),
        )
    )
    return Rows(np.stack(rows).astype(np.float32), np.array(labels, dtype=np.int64), notes=notes)
