#!/usr/bin/env bash
# Create the virtualenv that runs MLServer for the integration tests, or reuse it.
#
# Usage: .ci/mlserver-venv.sh [DIR]        (DIR defaults to <repo>/.mlserver-venv)
#
# MLServer pins its own dependencies, so it gets a venv of its own. Its numpy and
# scikit-learn match the project's interpreter (GUARD_PYTHON, default: the python3 on PATH,
# i.e. the active virtualenv)
# so that a model pickled by the tests loads unchanged. A DIR that already holds those
# versions is reused; any other venv there is rebuilt. MLSERVER_PYTHON (default python3,
# 3.9 to 3.12) builds the venv.
# On success the venv's python is the only line on stdout; on failure the exit status is
# non-zero and the reason is on stderr.
set -euo pipefail

MLSERVER_VERSION=1.7.1
# Used when the project's interpreter cannot report its own versions.
FALLBACK_NUMPY=2.4.6
FALLBACK_SKLEARN=1.9.1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$REPO/.mlserver-venv}
BASE_PYTHON=${MLSERVER_PYTHON:-python3}
PROJECT_PYTHON=${GUARD_PYTHON:-python3}

die() { echo "mlserver-venv: $*" >&2; exit 1; }
log() { echo "mlserver-venv: $*" >&2; }

if versions=$("$PROJECT_PYTHON" -c 'from importlib.metadata import version as v; print(v("numpy"), v("scikit-learn"))' 2>/dev/null); then
    read -r NUMPY SKLEARN <<<"$versions"
else
    NUMPY=$FALLBACK_NUMPY SKLEARN=$FALLBACK_SKLEARN
    log "$PROJECT_PYTHON has no numpy or scikit-learn; using numpy $NUMPY, scikit-learn $SKLEARN"
fi
WANT="$MLSERVER_VERSION $MLSERVER_VERSION $NUMPY $SKLEARN"

installed() {
    "$DIR/bin/python" - <<'EOF' 2>/dev/null
from importlib.metadata import version
import mlserver_sklearn  # noqa: F401  (the runtime must import, not only be listed)
print(*(version(p) for p in ("mlserver", "mlserver-sklearn", "numpy", "scikit-learn")))
EOF
}

if [[ -x $DIR/bin/python && "$(installed)" == "$WANT" && -x $DIR/bin/mlserver ]]; then
    echo "$DIR/bin/python"
    exit 0
fi

command -v "$BASE_PYTHON" >/dev/null || die "$BASE_PYTHON not found; set MLSERVER_PYTHON to a Python 3.9-3.12"
"$BASE_PYTHON" -c 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))' \
    || die "MLServer $MLSERVER_VERSION needs Python 3.9-3.12; $BASE_PYTHON is $("$BASE_PYTHON" -V 2>&1)"

if [[ -e $DIR ]]; then
    [[ -f $DIR/pyvenv.cfg ]] || die "$DIR exists and is not a virtualenv; refusing to replace it"
    log "rebuilding $DIR (want mlserver, mlserver-sklearn, numpy, scikit-learn = $WANT)"
    rm -rf -- "$DIR"
fi

log "creating $DIR with $("$BASE_PYTHON" -V 2>&1)"
"$BASE_PYTHON" -m venv "$DIR" || die "python -m venv $DIR failed"
"$DIR/bin/python" -m pip install --quiet --disable-pip-version-check \
    "mlserver==$MLSERVER_VERSION" "mlserver-sklearn==$MLSERVER_VERSION" \
    "numpy==$NUMPY" "scikit-learn==$SKLEARN" \
    || die "pip install into $DIR failed (see above)"

got=$(installed) || die "$DIR: mlserver_sklearn does not import after installing"
[[ $got == "$WANT" ]] || die "$DIR: installed versions '$got', wanted '$WANT'"
echo "$DIR/bin/python"
