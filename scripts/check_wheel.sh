#!/usr/bin/env bash
# The packaging check (CI runs it after the tests): a wheel built from the repo, installed in a fresh venv,
# runs `flan data tasks` from a folder outside the repo, its task and template files read from the wheel.
#
#   bash scripts/check_wheel.sh          # uses the project's venv (scripts/venv.sh); no network, ~10 s
#
# The wheel is built from a copy of the repo's files (tracked and untracked, not ignored), so nothing is
# written into the checkout. The fresh venv reuses the current venv's packages (torch, ...) through a .pth
# file of plain paths, added after the wheel is installed: the wheel's flan, engine and kernels come first,
# and the current venv's editable install of the repo is not activated.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
repo="$ROOT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/src" "$work/dist" "$work/elsewhere"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$work/src"
python -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$work/dist" "$work/src"
wheel=("$work"/dist/flan_engine-*.whl)

python -m venv --without-pip "$work/venv"
python -m pip --python "$work/venv/bin/python" install --quiet --no-deps --no-index "${wheel[0]}"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' \
    > "$site/zz-reused-packages.pth"

cd "$work/elsewhere"
run() { env -u PYTHONPATH "$@"; }
run "$work/venv/bin/python" - "$site" <<'EOF'
import sys
import engine, flan, kernels
from flan.templates import TEMPLATES_DIR
for module in (engine, flan, kernels):
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} imported from {module.__file__}, not the wheel"
assert str(TEMPLATES_DIR).startswith(sys.argv[1]), f"templates read from {TEMPLATES_DIR}, not the wheel"
EOF
# The wheel's registry and templates must be the repo's: every dataset, each with all its templates.
keys='import json, sys
print(json.dumps([[d[k] for k in ("name", "cluster", "kind", "templates")] for d in json.load(sys.stdin)]))'
theirs="$(run "$work/venv/bin/flan" data tasks --json)"
ours="$(cd "$repo" && python -m flan data tasks --json)"
if [[ "$(python -c "$keys" <<< "$theirs")" != "$(python -c "$keys" <<< "$ours")" ]]; then
    echo "check_wheel: FAILED: flan data tasks from the wheel differs from the repo's (tasks or templates missing)" >&2
    exit 1
fi
summary="$(run "$work/venv/bin/flan" data tasks | tail -n 1)"
echo "check_wheel: ok: ${wheel[0]##*/} in a fresh venv, run from $work/elsewhere: $summary"
