#!/usr/bin/env bash
# The README's first command, as a newcomer runs it: a venv of its own, the plain
# install from this checkout (`pip install '.[fast]'`, not editable, no test extra: no
# scikit-learn, no matplotlib), then `guard demo` to the end.
#
# Usage: .ci/plain-demo.sh [DIR]   (DIR: where the venv goes; default a temporary folder,
#                                   removed afterwards)
# The pip cache is used as usual, so a second run installs from cached wheels. The demo's
# output is printed on failure only; the exit status is non-zero when the install or the
# demo fails, or when the demo stops before its last part.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_PYTHON=${GUARD_PLAIN_PYTHON:-python3}
if [ $# -ge 1 ]; then
    DIR=$1
    mkdir -p "$DIR"
else
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/guard-plain.XXXXXX")
    trap 'rm -rf "$DIR"' EXIT
fi

die() { echo "plain-demo: $*" >&2; exit 1; }

"$BASE_PYTHON" -m venv --clear "$DIR/venv"
# Exactly the README's install: its pip, the checkout as a package.
(cd "$REPO" && "$DIR/venv/bin/pip" install --quiet '.[fast]') || die "pip install '.[fast]' failed"
if "$DIR/venv/bin/python" -c 'import sklearn' 2>/dev/null; then
    die "the plain install brought scikit-learn: the demo would not be tested without it"
fi
# Outside the checkout, so that `guard` is the installed package, not the source tree.
if ! (cd "$DIR" && timeout 600 "$DIR/venv/bin/guard" demo >"$DIR/demo.log" 2>&1); then
    cat "$DIR/demo.log" >&2
    die "guard demo failed on the plain install"
fi
grep -q "who was caught" "$DIR/demo.log" || { cat "$DIR/demo.log" >&2; die "guard demo stopped early"; }
grep -q "Traceback" "$DIR/demo.log" && { cat "$DIR/demo.log" >&2; die "guard demo printed a traceback"; }
echo "plain-demo: guard demo ran to the end on a plain install ($(wc -l <"$DIR/demo.log") lines)"
