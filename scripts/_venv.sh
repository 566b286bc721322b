# Sourced by the scripts: make ./.venv with Shoal and its pinned dev tools, once.
# Re-installs when pyproject.toml or the data plane's sources change, so a fresh clone
# needs nothing else (but a Rust toolchain, which builds the data plane).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
sources=$(cd "$ROOT" && cat pyproject.toml dataplane/pyproject.toml dataplane/Cargo.toml \
    dataplane/Cargo.lock dataplane/src/*.rs dataplane/python/shoal_dataplane/* | sha256sum)
stamp="$VENV/.installed-${sources:0:16}"
if [ ! -f "$stamp" ]; then
    command -v cargo >/dev/null || {
        echo "shoal: building the sidecar's data plane needs Rust: https://rustup.rs" >&2
        exit 2
    }
    echo "setting up $VENV (first run only; builds the Rust data plane) ..." >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "$ROOT/dataplane" -e "$ROOT[dev]"
    # xds-protos (up to 1.85.0 at least) ships stale copies of opentelemetry-proto's
    # modules over the real ones (grpc/grpc#42926): put the real ones back.
    "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps \
        "opentelemetry-proto==$("$VENV/bin/python" -c \
            'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
