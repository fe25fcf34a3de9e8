#!/usr/bin/env bash
# Install the fast local LM runtime (llama-cpp-python) into a venv, from a cached wheel.
#
#   tools/fast_lm.sh PYTHON        (make venv runs it with the venv's python)
#
# llama-cpp-python has no prebuilt wheel that fits these machines, and its default source build
# (-march=native) dies with SIGILL here, so it is built once with CMAKE_ARGS=-DGGML_NATIVE=OFF
# (and -DLLAVA_BUILD=OFF: the multimodal library, a quarter of the build, is loaded only for
# image models) (about 5 minutes on 2 cores) into the wheel cache, ${MLBRIDGE_WHEEL_CACHE:-~/.cache/mlbridge/
# wheels}, in a directory keyed by version, python tag, machine and the CMAKE_ARGS used (a wheel
# built any other way is never taken). Later installs take seconds.
# Best effort: when the build fails (no compiler, ...) it says so in one line and exits 0; the
# Transformers bridge's runtime = "auto" then uses Transformers. MLBRIDGE_FAST_LM=0 skips it all.
set -u
PY=${1:?usage: tools/fast_lm.sh /path/to/venv/bin/python}
VERSION=0.3.36
BUILD_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
fallback='runtime = "auto" falls back to Transformers'

if [ "${MLBRIDGE_FAST_LM:-1}" = "0" ]; then
    echo "fast_lm: skipped (MLBRIDGE_FAST_LM=0); $fallback"
    exit 0
fi
CACHE=${MLBRIDGE_WHEEL_CACHE:-$HOME/.cache/mlbridge/wheels}
TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') || exit 1
KEY=$(printf '%s' "$BUILD_ARGS" | sha256sum | cut -c1-12)
DIR="$CACHE/llama-cpp-python-$VERSION-$TAG-$(uname -m)-$KEY"
find_wheel() { ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }

mkdir -p "$CACHE" || { echo "fast_lm: cannot create the wheel cache $CACHE; $fallback"; exit 0; }
exec 9>"$CACHE/.fast_lm.lock"
flock 9  # one build at a time; a second make waits, then finds the wheel
wheel=$(find_wheel)
if [ -z "$wheel" ]; then
    log="$CACHE/build-llama-cpp-python-$VERSION-$TAG-$KEY.log"
    tmp=$(mktemp -d "$CACHE/.build-XXXXXX")
    echo "fast_lm: building llama-cpp-python $VERSION with CMAKE_ARGS=$BUILD_ARGS (once, ~5 min on 2 cores; log $log)"
    # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and could hand back a native build
    if CMAKE_ARGS="$BUILD_ARGS" "$PY" -m pip wheel -q --no-deps --no-cache-dir \
            --wheel-dir "$tmp" "llama-cpp-python==$VERSION" >"$log" 2>&1 \
        && ls "$tmp"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        mkdir -p "$DIR" && mv "$tmp"/llama_cpp_python-*.whl "$DIR"/
        rm -rf "$tmp"
        wheel=$(find_wheel)
    else
        rm -rf "$tmp"
        echo "fast_lm: building llama-cpp-python $VERSION failed (a C/C++ compiler and cmake are needed; see $log); $fallback"
        exit 0
    fi
fi
# its runtime dependencies (no-ops when already satisfied), then the wheel itself
if "$PY" -m pip install -q "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" \
        "jinja2>=2.11.3" && "$PY" -m pip install -q --no-deps --force-reinstall "$wheel"; then
    echo "fast_lm: llama-cpp-python $VERSION installed from $wheel"
else
    echo "fast_lm: installing $wheel failed; $fallback"
fi
exit 0
