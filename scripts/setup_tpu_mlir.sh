#!/usr/bin/env bash
# Set up Sophgo's tpu-mlir (the compiler tpugraph's segments are for) in its own Python 3.10 venv.
#
#   scripts/setup_tpu_mlir.sh [PYTHON3.10] [VENV_DIR]
#
# PYTHON3.10  a Python 3.10 interpreter (default: $TPUGRAPH_PYTHON310, then
#             /root/.pyenv/versions/3.10.13/bin/python, then python3.10 on PATH)
# VENV_DIR    where the venv goes (default: $TPUGRAPH_TPU_MLIR_VENV, else
#             ${XDG_CACHE_HOME:-~/.cache}/tpugraph/tpu-mlir-venv)
#
# tpu-mlir 1.30.2 needs Python 3.10 exactly and pins onnx/protobuf/numpy, so it can never share
# tpugraph's venv. Idempotent: a stamp file in the venv records a finished setup of this recipe, and a
# second run only prints the path. The venv path is the last line on stdout; everything else goes to
# stderr. `tpugraph compile OUT --tpu-mlir VENV_DIR` and the tpu_mlir tests use it.
set -euo pipefail

RECIPE_VERSION=1
# psutil and torch are imported by model_transform without being declared; setuptools<70 because
# tpu_mlir/__init__.py imports pkg_resources.
PACKAGES=(tpu-mlir==1.30.2 onnx==1.14.1 onnxruntime==1.16.3 onnxsim==0.4.17 protobuf==3.20.3 numpy==1.24.3
          psutil "setuptools<70" torch)
# The wheel ships glibc 2.35 and its companions in tpu_mlir/lib/third_party and puts that folder first on
# LD_LIBRARY_PATH; on a newer system (Debian 12: glibc 2.36) every tool then dies with
# "GLIBC_2.36 not found (required by libexpat)". Without these copies the system's newer ones are used.
SHADOWING_LIBS=(libc.so.6 libm.so.6 libpthread.so.0 libstdc++.so.6 libgcc_s.so.1)

say() { printf 'setup_tpu_mlir: %s\n' "$*" >&2; }
die() { printf 'setup_tpu_mlir: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
[ $# -le 2 ] || { usage; die "too many arguments"; }

is_python310() {
    [ -n "$1" ] && "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 10) else 1)' 2>/dev/null
}

find_python() {
    local candidate
    if [ -n "${1:-}" ]; then
        command -v "$1" >/dev/null 2>&1 || [ -x "$1" ] || die "'$1' is not an executable Python interpreter"
        is_python310 "$1" || die "'$1' is Python $("$1" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'), tpu-mlir 1.30 needs Python 3.10 exactly"
        echo "$1"
        return
    fi
    for candidate in "${TPUGRAPH_PYTHON310:-}" /root/.pyenv/versions/3.10.13/bin/python "$(command -v python3.10 || true)"; do
        if is_python310 "$candidate"; then
            echo "$candidate"
            return
        fi
    done
    die "no Python 3.10 found (tpu-mlir 1.30 needs exactly 3.10): pass one as the first argument, set TPUGRAPH_PYTHON310, or install python3.10 (e.g. 'pyenv install 3.10.13')"
}

PYTHON=$(find_python "${1:-}")
VENV_DIR=${2:-${TPUGRAPH_TPU_MLIR_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tpugraph/tpu-mlir-venv}}
STAMP="$VENV_DIR/.tpugraph-tpu-mlir-setup"
WANT_STAMP="recipe=$RECIPE_VERSION packages=${PACKAGES[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] && [ -x "$VENV_DIR/bin/model_transform.py" ]; then
    say "already set up: $VENV_DIR"
    echo "$VENV_DIR"
    exit 0
fi

say "python: $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
say "venv:   $VENV_DIR"
if [ ! -x "$VENV_DIR/bin/python" ]; then
    mkdir -p "$(dirname "$VENV_DIR")"
    "$PYTHON" -m venv "$VENV_DIR" || die "cannot create a venv at $VENV_DIR with $PYTHON (Debian: apt-get install python3.10-venv)"
fi
is_python310 "$VENV_DIR/bin/python" || die "$VENV_DIR is an existing venv that is not Python 3.10: remove it or pick another VENV_DIR"
rm -f "$STAMP"

say "installing ${PACKAGES[*]} (torch is large: the first install takes a while, later ones come from pip's cache)"
"$VENV_DIR/bin/python" -m pip install --quiet "${PACKAGES[@]}" >&2 || die "pip install of tpu-mlir and its pinned dependencies failed"

TPU_MLIR_DIR=$("$VENV_DIR/bin/python" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("tpu_mlir")
print(os.path.dirname(spec.origin) if spec and spec.origin else "")
EOF
)
[ -d "$TPU_MLIR_DIR/lib/third_party" ] || die "tpu_mlir installed but $TPU_MLIR_DIR/lib/third_party is missing: unexpected wheel layout"

# Only move the bundled C runtime aside when the system's is newer (moving it on an older system would
# break the binaries that need glibc 2.35).
system_glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
if [ -n "$system_glibc" ] && [ "$(printf '%s\n2.35\n' "$system_glibc" | sort -V | head -n1)" = "2.35" ]; then
    aside="$TPU_MLIR_DIR/lib/third_party.shadowing-system-libs"
    mkdir -p "$aside"
    for lib in "${SHADOWING_LIBS[@]}"; do
        if [ -e "$TPU_MLIR_DIR/lib/third_party/$lib" ]; then
            mv -f "$TPU_MLIR_DIR/lib/third_party/$lib" "$aside/$lib"
            say "moved bundled $lib aside (system glibc $system_glibc is newer than the bundled 2.35)"
        fi
    done
else
    say "system glibc ${system_glibc:-unknown} is not newer than 2.35: keeping the bundled C runtime"
fi

# Smoke test: every tool tpugraph drives must start.
export PATH="$VENV_DIR/bin:$PATH"
for tool in "model_transform.py --help" "model_deploy.py --help" "model_runner.py --help" "npz_tool.py compare --help"; do
    # shellcheck disable=SC2086 # the tool and its arguments split on purpose
    out=$("$VENV_DIR"/bin/$tool 2>&1) || die "'$tool' fails after setup:
$(printf '%s\n' "$out" | tail -n 5)"
done
out=$("$VENV_DIR/bin/model_tool" 2>&1 || true)
case "$out" in
    *combine*) ;;
    *) die "'model_tool' does not start after setup:
$(printf '%s\n' "$out" | tail -n 5)" ;;
esac

printf '%s' "$WANT_STAMP" > "$STAMP"
say "done: tpu-mlir $("$VENV_DIR/bin/python" -m pip show tpu-mlir 2>/dev/null | awk '/^Version:/ {print $2}') in $VENV_DIR"
echo "$VENV_DIR"
