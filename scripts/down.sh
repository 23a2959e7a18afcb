#!/usr/bin/env bash
# Stops a mesh started by `just up`: SIGTERM to every service, then waits for
# them to drain (up to 30 s each).
set -euo pipefail

run="${AGORA_DATA_DIR:-.data}/run"
found=0
for pidfile in "$run"/*.pid; do
    [ -e "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    name="$(basename "$pidfile" .pid)"
    if kill -TERM "$pid" 2>/dev/null; then
        found=1
        for _ in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name (pid $pid) did not stop in 30 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "stopped $name"
    fi
    rm -f "$pidfile"
done
[ "$found" = 1 ] || echo "Agora is not running"
