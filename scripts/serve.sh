#!/usr/bin/env bash
# Install into .venv and run the service with gunicorn: demo provider by default,
# page at http://127.0.0.1:8000. Settings come from the environment or a .env file.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
make_venv
.venv/bin/pip install -q -e .
echo "llm-sse-relay: http://127.0.0.1:${PORT:-8000}/ (provider: ${LLM_PROVIDER:-demo})"
exec .venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
