#!/usr/bin/env bash
# Create the separate virtual environment that runs the tk_r_em benchmark peer (never a stemd
# dependency: it needs TensorFlow 2.12 and numpy<1.24). Idempotent; prints the venv path last.
#   usage: bash bench/peers/tk_r_em_setup.sh [VENV_DIR]
#   env:   TKREM_VENV (default venv dir), TKREM_PYTHON (interpreter, default python3.11),
#          TKREM_FIND_LINKS (a folder holding tk_r_em-1.0.4.tar.gz, to skip the 189 MB download)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-${TKREM_VENV:-$repo_root/.venv-tkrem}}"
python="${TKREM_PYTHON:-python3.11}"

# The working set on Python 3.11 / Linux x86_64, found by resolving tensorflow-cpu==2.12.* with tk-r-em.
pins=(
  "tensorflow-cpu==2.12.1"
  "tk-r-em==1.0.4"
  "numpy==1.23.5"
  "h5py==3.11.0"
  "matplotlib==3.8.4"
)

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import tk_r_em, tensorflow" 2>/dev/null; then
  echo "tk_r_em venv already set up" >&2
  echo "$venv"
  exit 0
fi

if ! command -v "$python" >/dev/null; then
  echo "error: $python not found; set TKREM_PYTHON to a Python 3.8-3.11 interpreter" >&2
  exit 1
fi

"$python" -m venv "$venv"
extra=()
if [[ -n "${TKREM_FIND_LINKS:-}" ]]; then
  extra+=(--find-links "$TKREM_FIND_LINKS")
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet "${extra[@]}" "${pins[@]}" >&2
"$venv/bin/python" -c "import tk_r_em, tensorflow as tf; print('tensorflow', tf.__version__)" >&2
echo "$venv"
