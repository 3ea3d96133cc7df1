#!/usr/bin/env bash
# Set up, lint, type-check and run the tests (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# Static figure export (kaleido) and the HTML rendering test drive a headless Chromium: Debian's.
if [ ! -x /usr/bin/chromium ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation
fi
# Data for the integration tests: the shared folder beside the checkout unless set.
if [ -z "${PARTS_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  PARTS_DATA_DIR="$(cd ../shared/data && pwd)"
  export PARTS_DATA_DIR
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check parts tests benchmarks scripts/docs_hooks.py
.venv/bin/mypy parts
# The documentation site, strictly (a broken link, a missing reference or an undocumented public name fails);
# tests/test_docs.py opens pages of this build in Chromium.
SECONDS=0
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir site
PARTS_DOCS_SITE="$PWD/site"
export PARTS_DOCS_SITE
echo "docs site built in ${SECONDS}s"
# The wheel and sdist, the wheel installed in a fresh venv and run there (the quick start and `parts report`).
bash scripts/package_check.sh
.venv/bin/python -m pytest -q "$@"
