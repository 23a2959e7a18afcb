#!/usr/bin/env bash
# Starts every implemented service as its own process, waits until each is
# healthy, prints the endpoints, then stays in the foreground streaming logs.
# Ctrl-C (or `just down` from another terminal) stops them all gracefully.
set -euo pipefail

agora="${1:?usage: scripts/up.sh path/to/agora}"
data="${AGORA_DATA_DIR:-.data}"
run="$data/run"
logs="$data/logs"
mkdir -p "$run" "$logs"

# service name, port
services=("users 50051")

for pidfile in "$run"/*.pid; do
    [ -e "$pidfile" ] || continue
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "Agora is already running (pid $(cat "$pidfile")); stop it with \`just down\`." >&2
        exit 1
    fi
    rm -f "$pidfile"
done

"$agora" keygen --dir "$data/keys" >/dev/null

pids=()
pidfiles=()
stop() {
    trap - INT TERM EXIT
    if [ ${#pids[@]} -gt 0 ]; then
        echo "stopping ${#pids[@]} service(s) ..."
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    # Only our own: a second `just up` that failed must not orphan the first.
    rm -f "${pidfiles[@]}"
}
trap stop INT TERM EXIT

endpoints=()
for entry in "${services[@]}"; do
    read -r name port <<<"$entry"
    args=(serve "$name" --data-dir "$data" --listen "127.0.0.1:$port")
    if [ -n "${DATABASE_URL:-}" ]; then
        # One PostgreSQL database per service: the named one with a _<service>
        # suffix (postgres://host/agora -> agora_users), created if missing.
        base="${DATABASE_URL%%\?*}"
        query="${DATABASE_URL#"$base"}"
        args+=(--database-url "${base}_${name}${query}")
        db="PostgreSQL database ${base##*/}_${name}"
    else
        db="$data/$name.db (SQLite)"
    fi
    # DATABASE_URL is consumed above; don't let the child read it as well.
    env -u DATABASE_URL "$agora" "${args[@]}" \
        > >(sed -u "s/^/[$name] /" | tee -a "$logs/$name.log") 2>&1 &
    pids+=($!)
    echo $! > "$run/$name.pid"
    pidfiles+=("$run/$name.pid")
    endpoints+=("$name=127.0.0.1:$port")
    printf '%-14s 127.0.0.1:%-6s %s\n' "$name" "$port" "$db" >> "$run/endpoints.txt.new"
done
mv "$run/endpoints.txt.new" "$run/endpoints.txt"

echo "waiting for the services to become healthy ..."
deadline=$((SECONDS + 60))
until "$agora" health "${endpoints[@]}" >/dev/null 2>&1; do
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "a service exited during start-up; see the lines above and $logs/" >&2
            exit 1
        fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
        "$agora" health "${endpoints[@]}" || true
        echo "not every service became healthy within 60 s; see $logs/" >&2
        exit 1
    fi
    sleep 0.5
done
echo
"$agora" health "${endpoints[@]}"

cat <<INFO

Agora is up. Endpoints (plaintext gRPC, reflection enabled):
$(cat "$run/endpoints.txt")

Try:  .venv/bin/grpcurl -plaintext localhost:50051 list
Logs: $logs/   Stop: Ctrl-C here, or \`just down\` elsewhere.

INFO

# Stay in the foreground until Ctrl-C or until a service exits on its own.
set +e
wait -n "${pids[@]}"
code=$?
echo "a service exited (status $code); stopping the others" >&2
exit "$code"
