"""Train the demo breast cancer model for MLServer and save it beside its model-settings.json.

    python train.py models/breast_cancer          # writes models/breast_cancer/model.joblib

The same model as ``guard.models.train.train_breast_cancer``: scikit-learn's bundled
breast cancer data set (nothing is downloaded), a stratified 50/50 member/non-member
split and a 100-tree random forest, all seeded, so the guard's built-in
``breast_cancer`` ONNX copy and this pickle give the same labels. Standalone on
purpose: the MLServer image needs neither the guard nor onnx.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split


def train(seed: int) -> RandomForestClassifier:
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    members, _ = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=seed)
    members = np.sort(members)
    model = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    return model.fit(x[members], y[members])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder holding model-settings.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(train(args.seed), args.model_dir / "model.joblib")


if __name__ == "__main__":
    main()
