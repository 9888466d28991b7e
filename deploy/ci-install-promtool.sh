#!/usr/bin/env bash
# Make `promtool` available for tests/test_deploy.py (alert rule checks and unit tests).
# Idempotent: does nothing when promtool is already on PATH. Otherwise installs Debian's
# `prometheus` package, which ships /usr/bin/promtool (2.42 on bookworm);
# --no-install-recommends skips the node exporter. The package's prometheus service is not
# needed (and is not started in containers without an init).
# Needs root (or sudo) and apt. CI sets CI=true, so the promtool tests fail rather than skip
# if this did not work.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

# Quiet on success; apt's full output on failure.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { $sudo apt-get update -qq \
       && $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "ci-install-promtool: installing Debian's prometheus package failed" >&2
    exit 1
fi

promtool --version 2>&1 | head -n 1
