#!/usr/bin/env bash
# Stops a mesh started by `just up`. Signals the `just up` supervisor, which
# stops its services and waits for them to drain; if the supervisor is gone,
# signals the services directly. Anything still running after 30 s is killed.
set -euo pipefail

run="${AGORA_DATA_DIR:-.data}/run"
targets=()
supervisor="$(cat "$run/supervisor.pid" 2>/dev/null || true)"
if [ -n "$supervisor" ] && kill -TERM "$supervisor" 2>/dev/null; then
    # The supervisor stops its own services and waits for them.
    targets+=("$supervisor")
else
    for pidfile in "$run"/*.pid; do
        pid="$(cat "$pidfile" 2>/dev/null)" || continue
        if kill -TERM "$pid" 2>/dev/null; then
            targets+=("$pid")
        fi
    done
fi
if [ ${#targets[@]} -eq 0 ]; then
    echo "Agora is not running"
    rm -f "$run"/*.pid
    if [ -f "${AGORA_DATA_DIR:-.data}/pg/data/postmaster.pid" ]; then
        "$(dirname "$0")/pg.sh" stop "${AGORA_DATA_DIR:-.data}/pg" fast || true
    fi
    exit 0
fi
for _ in $(seq 300); do
    alive=0
    for pid in "${targets[@]}"; do
        kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 1 ] || break
    sleep 0.1
done
for pid in "${targets[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
        echo "pid $pid did not stop in 30 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
done
# A supervisor killed mid-way may leave services behind: stop those too.
for pidfile in "$run"/*.pid; do
    pid="$(cat "$pidfile" 2>/dev/null)" || continue
    kill -TERM "$pid" 2>/dev/null || true
done
rm -f "$run"/*.pid
# The private PostgreSQL of `just up pg`, if a killed supervisor left it.
if [ -f "${AGORA_DATA_DIR:-.data}/pg/data/postmaster.pid" ]; then
    "$(dirname "$0")/pg.sh" stop "${AGORA_DATA_DIR:-.data}/pg" fast || true
fi
echo "Agora stopped"
