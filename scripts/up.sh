#!/usr/bin/env bash
# Starts the six services (one process each, or all in one with `mono`), waits
# until each is healthy, seeds a demo catalog and an admin account, prints the
# endpoints, then stays in the foreground streaming logs. Ctrl-C (or
# `just down` from another terminal) stops everything gracefully.
set -euo pipefail

agora="${1:?usage: scripts/up.sh path/to/agora [mesh|mono]}"
mode="${2:-mesh}"
case "$mode" in
    mesh | mono) ;;
    *) echo "unknown mode '$mode': use mesh (default) or mono" >&2; exit 2 ;;
esac
data="${AGORA_DATA_DIR:-.data}"
run="$data/run"
logs="$data/logs"
mkdir -p "$run" "$logs"

# name:port, as in shared/CONTRACT.md
services=(users:50051 catalog:50052 inventory:50053 payments:50054 orders:50055 notifications:50056)
admin_email="admin@agora.localhost"

for pidfile in "$run"/*.pid; do
    [ -e "$pidfile" ] || continue
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "Agora is already running (pid $(cat "$pidfile")); stop it with \`just down\`." >&2
        exit 1
    fi
    rm -f "$pidfile"
done

"$agora" keygen --dir "$data/keys" >/dev/null

# Configuration for every service, through the environment (one mechanism for
# both modes): addresses, databases, the admin bootstrap email.
export AGORA_DATA_DIR="$data"
export AGORA_AUTH__ADMIN_EMAILS="[\"$admin_email\"]"
endpoints=()
: > "$run/endpoints.txt"
for entry in "${services[@]}"; do
    name="${entry%%:*}"
    port="${entry##*:}"
    upper="$(echo "$name" | tr '[:lower:]' '[:upper:]')"
    export "AGORA_${upper}__LISTEN_ADDR=127.0.0.1:$port"
    if [ -n "${DATABASE_URL:-}" ]; then
        # One PostgreSQL database per service: the named one with a _<service>
        # suffix (postgres://host/agora -> agora_users), created if missing.
        base="${DATABASE_URL%%\?*}"
        query="${DATABASE_URL#"$base"}"
        export "AGORA_${upper}__DATABASE_URL=${base}_${name}${query}"
        db="PostgreSQL database ${base##*/}_${name}"
    else
        db="$data/$name.db (SQLite)"
    fi
    endpoints+=("$name=127.0.0.1:$port")
    printf '  %-14s localhost:%-6s %s\n' "$name" "$port" "$db" >> "$run/endpoints.txt"
done

pids=()
pidfiles=()
stop() {
    trap - INT TERM EXIT
    if [ ${#pids[@]} -gt 0 ]; then
        echo "stopping ..."
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    # Only our own: a second `just up` that failed must not orphan the first.
    rm -f "${pidfiles[@]}" "$run/supervisor.pid"
}
interrupted() {
    stop
    echo "Agora stopped."
    exit 0
}
trap interrupted INT TERM
trap stop EXIT

start() { # name, targets...
    local name="$1"
    shift
    # DATABASE_URL is consumed above; don't let the child read it as well.
    env -u DATABASE_URL "$agora" serve "$@" \
        > >(sed -u "s/^/[$name] /" | tee -a "$logs/$name.log") 2>&1 &
    pids+=($!)
    echo $! > "$run/$name.pid"
    pidfiles+=("$run/$name.pid")
}

# `just down` signals this script, which stops the services in order.
echo $$ > "$run/supervisor.pid"

if [ "$mode" = mono ]; then
    start all all
else
    for entry in "${services[@]}"; do
        start "${entry%%:*}" "${entry%%:*}"
    done
fi

echo "waiting for the services to become healthy ..."
deadline=$((SECONDS + 90))
until "$agora" health "${endpoints[@]}" >/dev/null 2>&1; do
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "a service exited during start-up; see the lines above and $logs/" >&2
            exit 1
        fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
        "$agora" health "${endpoints[@]}" || true
        echo "not every service became healthy within 90 s; see $logs/" >&2
        exit 1
    fi
    sleep 0.5
done

echo
echo "seeding demo data ..."
"$agora" seed --admin-email "$admin_email"

echo
"$agora" health "${endpoints[@]}"
cat <<INFO

Agora is up ($mode mode). Endpoints (plaintext gRPC, reflection enabled):
$(cat "$run/endpoints.txt")

Try:  .venv/bin/grpcurl -plaintext localhost:50052 list
      .venv/bin/grpcurl -plaintext localhost:50052 agora.catalog.v1.CatalogService/ListProducts
Logs: $logs/   Stop: Ctrl-C here, or \`just down\` elsewhere.

INFO

# Stay in the foreground until Ctrl-C or until a service exits on its own.
set +e
wait -n "${pids[@]}"
code=$?
echo "a service exited on its own (status $code); stopping the others" >&2
exit $((code == 0 ? 1 : code))
