#!/usr/bin/env bash
# Set up the real AppWorld (Trivedi et al. 2024) beside align, in its own virtual environment.
#
# appworld pins an old stack (pydantic < 2, fastapi 0.110, ...) that cannot live in align's .venv, so it gets
# .venv-appworld/ and align talks to its environment server over HTTP (align/agents/appworld.py).
#
#   bash evals/appworld/setup.sh            # venv + `pip install appworld` + `appworld install` (local, no download)
#   bash evals/appworld/setup.sh --data     # also `appworld download data` (needs internet; ~ a few hundred MB)
#
# Then serve it and point align at it:
#   APPWORLD_ROOT=$PWD/.venv-appworld/root .venv-appworld/bin/appworld serve environment --port 8000
#   align eval agent --world appworld --split dev ... --appworld-url http://127.0.0.1:8000
# (APPWORLD_ROOT must be the folder holding data/; align reads the task lists from $APPWORLD_ROOT/data/datasets.)
#
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${APPWORLD_VENV:-.venv-appworld}
ROOT=${APPWORLD_ROOT:-$PWD/$VENV/root}
APPWORLD_SPEC=${APPWORLD_SPEC:-appworld}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  printf '*\n' > "$VENV/.gitignore"   # never committed, whatever the top-level .gitignore says
fi
BIN=$(cd "$VENV/bin" && pwd)
if [ ! -f "$VENV/.appworld-installed" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$APPWORLD_SPEC"
  mkdir -p "$ROOT"
  (cd "$ROOT" && APPWORLD_ROOT="$ROOT" "$BIN/appworld" install)
  touch "$VENV/.appworld-installed"
fi
if [ "${1:-}" = "--data" ] && [ ! -d "$ROOT/data/tasks" ]; then
  (cd "$ROOT" && APPWORLD_ROOT="$ROOT" "$BIN/appworld" download data)
fi
echo "appworld: $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("appworld"))')  root: $ROOT" \
     "data: $([ -d "$ROOT/data/tasks" ] && echo present || echo 'absent (run with --data where internet is available)')"
