#!/usr/bin/env bash
# `just bench checkout`: checkout throughput and latency of the monolith
# (`agora serve all`, release build), on PostgreSQL and then on SQLite in the
# same run, driven by `agora loadgen` on the same machine:
#
#   1. a checkout-only run (`--mix checkout`) and a browse-heavy run (the
#      default mix), each CONCURRENCY virtual users for DURATION seconds;
#   2. the CPU each process used during the checkout run (agora, the
#      PostgreSQL server and its backends, nats-server, loadgen itself);
#   3. where checkout time goes: median and p99 per saga step, from the
#      orders database's `checkout_saga_steps` (the checkout run's sagas only).
#
# Everything is private and deleted at the end: a durable PostgreSQL
# (`scripts/pg.sh with-test-cluster --durable`: fsync on, as a real server;
# or the server AGORA_TEST_POSTGRES_URL names, with fresh databases), one
# nats-server per backend (JetStream with `sync_interval: always`, as
# `just up` runs it), data folders under a temp folder, free ports.
#
# Usage: scripts/bench-checkout.sh [CONCURRENCY [DURATION]]
#   AGORA_BENCH_CONCURRENCY  virtual users (default 16)
#   AGORA_BENCH_DURATION     seconds per run (default 30)
#   AGORA_BENCH_BACKENDS     which backends, in order (default "postgres sqlite")
#   AGORA_BENCH_KEEP         a folder to copy the loadgen JSON summaries and
#                            the services' logs into (default: none kept)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
agora="${CARGO_TARGET_DIR:-$root/target}/release/agora"

# First pass: build, then run the rest again inside a throwaway PostgreSQL
# that scripts/pg.sh deletes afterwards, whatever happens.
if [ -z "${AGORA_BENCH_CHECKOUT_INNER:-}" ]; then
    echo "building agora (release) ..."
    cargo build --release -p agora --locked
    export AGORA_BENCH_CHECKOUT_INNER=1
    if [[ " ${AGORA_BENCH_BACKENDS:-postgres sqlite} " == *" postgres "* ]]; then
        exec scripts/pg.sh with-test-cluster --durable "$0" "$@"
    fi
    exec "$0" "$@"
fi

concurrency="${1:-${AGORA_BENCH_CONCURRENCY:-16}}"
duration="${2:-${AGORA_BENCH_DURATION:-30}}"
backends="${AGORA_BENCH_BACKENDS:-postgres sqlite}"
[[ "$concurrency" =~ ^[1-9][0-9]*$ ]] || { echo "concurrency must be a positive number, not '$concurrency'" >&2; exit 2; }
[[ "$duration" =~ ^[1-9][0-9]*$ ]] || { echo "duration must be a positive number of seconds, not '$duration'" >&2; exit 2; }
python=.venv/bin/python
admin_email="admin@agora.localhost"
services=(users catalog inventory payments orders notifications)

work="$(mktemp -d -t agora-bench-checkout.XXXXXX)"
agora_pid=
nats_pid=
loadgen_pid=
stop_process() { # pid: SIGTERM, then wait for it
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    stop_process "$loadgen_pid"
    stop_process "$agora_pid"
    stop_process "$nats_pid"
    if [ -n "${AGORA_BENCH_KEEP:-}" ]; then
        mkdir -p "$AGORA_BENCH_KEEP"
        cp "$work"/*.json "$AGORA_BENCH_KEEP"/ 2>/dev/null || true
        for log in "$work"/*/agora.log; do
            [ -e "$log" ] && cp "$log" "$AGORA_BENCH_KEEP/$(basename "$(dirname "$log")")-agora.log"
        done
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

now_micros() {
    date +%s%6N
}

# CPU time (clock ticks) of each process, as "pid ticks" lines.
proc_ticks() {
    local pid
    for pid in "$@"; do
        [ -r "/proc/$pid/stat" ] || continue
        # Fields after the command name: utime and stime are the 12th and 13th.
        awk -v pid="$pid" '{ sub(/^.*\) /, ""); print pid, $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || true
    done
}

# The PostgreSQL server's processes (postmaster and backends), when it runs here.
postgres_pids() {
    local pidfile postmaster
    [ -n "${pg_data_dir:-}" ] || return 0
    pidfile="$pg_data_dir/postmaster.pid"
    [ -r "$pidfile" ] || return 0
    postmaster="$(head -n1 "$pidfile")"
    echo "$postmaster"
    pgrep -P "$postmaster" || true
}

# One sample of every group: "group pid ticks" lines, then "machine busy
# total" and "time µs".
cpu_sample() {
    proc_ticks "$agora_pid" | sed 's/^/agora /'
    proc_ticks "$nats_pid" | sed 's/^/nats-server /'
    proc_ticks "$loadgen_pid" | sed 's/^/loadgen /'
    # shellcheck disable=SC2046
    proc_ticks $(postgres_pids) | sed 's/^/postgres /'
    awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print "machine", busy, busy + $5 + $6 }' /proc/stat
    echo "time $(now_micros) -"
}

# CPU use per group between two samples, in percent of one core.
cpu_report() { # before after
    "$python" - "$1" "$2" "$(getconf CLK_TCK)" "$(nproc)" <<'PY'
import sys
before, after, hz, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def load(path):
    groups, machine, time = {}, None, 0
    for line in open(path):
        parts = line.split()
        if parts[0] == "machine":
            machine = (int(parts[1]), int(parts[2]))
        elif parts[0] == "time":
            time = int(parts[1])
        else:
            groups.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return groups, machine, time
(b, bm, bt), (a, am, at) = load(before), load(after)
seconds = max(1e-3, (at - bt) / 1e6)
line, ours = [], 0.0
for group in ["agora", "postgres", "nats-server", "loadgen"]:
    if group not in a:
        continue
    ticks = sum(t - b.get(group, {}).get(pid, 0) for pid, t in a[group].items())
    ours += 100.0 * ticks / hz / seconds
    line.append(f"{group} {100.0 * ticks / hz / seconds:.0f}%")
# /proc/stat counts every core: its busy ticks less ours are everybody else's
# (a shared machine's builds skew a run; this says by how much).
machine = 100.0 * (am[0] - bm[0]) / hz / seconds
line.append(f"other processes {max(0.0, machine - ours):.0f}%")
busy = 100.0 * (am[0] - bm[0]) / max(1, am[1] - bm[1])
print(f"CPU over {seconds:.0f} s (100% = one core, {cores} cores): " + ", ".join(line) + f"; machine busy {busy:.0f}%")
PY
}

# Transactions and rows written so far per service database of this run
# (PostgreSQL's own statistics), as "service commits rows" lines.
pg_writes() {
    "$(scripts/pg.sh bin)/psql" -X -A -t -q -F ' ' "$AGORA_TEST_POSTGRES_URL" -c "
        SELECT substr(datname, length('$db_prefix') + 2), xact_commit + xact_rollback,
               tup_inserted + tup_updated + tup_deleted
        FROM pg_stat_database WHERE starts_with(datname, '${db_prefix}_') ORDER BY datname"
}

# Transactions and rows written per completed checkout, per service database.
pg_writes_report() { # before after loadgen-json
    "$python" - "$1" "$2" "$3" <<'PY'
import json, sys
load = lambda path: {p[0]: (int(p[1]), int(p[2])) for p in (l.split() for l in open(path)) if len(p) == 3}
before, after = load(sys.argv[1]), load(sys.argv[2])
checkouts = max(1, json.load(open(sys.argv[3]))["checkouts"])
parts = []
for service, (commits, rows) in sorted(after.items()):
    b = before.get(service, (0, 0))
    parts.append(f"{service} {(commits - b[0]) / checkouts:.1f}/{(rows - b[1]) / checkouts:.1f}")
print("PostgreSQL transactions/rows written per checkout (background polling included): " + ", ".join(parts))
PY
}

# What the run's busy PostgreSQL backends are doing, twice a second for
# `seconds`: one "wait_event_type/wait_event" line per active backend per
# sample ("CPU" when not waiting).
pg_wait_samples() { # seconds
    local psql end
    psql="$(scripts/pg.sh bin)/psql"
    end=$((SECONDS + $1))
    while [ "$SECONDS" -lt "$end" ]; do
        "$psql" -X -A -t -q "$AGORA_TEST_POSTGRES_URL" -c "
            SELECT coalesce(wait_event_type || '/' || wait_event, 'CPU')
            FROM pg_stat_activity
            WHERE starts_with(datname, '${db_prefix}_') AND state = 'active'" 2>/dev/null || true
        sleep 0.5
    done
}

pg_wait_report() { # samples file
    "$python" - "$1" <<'PY'
import collections, sys
counts = collections.Counter(l.strip() for l in open(sys.argv[1]) if l.strip())
total = sum(counts.values())
if total:
    top = ", ".join(f"{event} {100 * n / total:.0f}%" for event, n in counts.most_common(6))
    print(f"PostgreSQL active backends by wait event ({total} samples): {top}")
PY
}

start_nats() { # dir
    local dir="$1" port
    port="$(free_port)"
    mkdir -p "$dir/jetstream"
    # sync_interval: always, as `just up` and the tests run it: Jepsen's 2025
    # analysis of NATS 2.12 lost acknowledged writes under the default policy.
    cat > "$dir/nats.conf" <<NATS
listen: 127.0.0.1:$port
server_name: agora-bench
jetstream {
  store_dir: "$dir/jetstream"
  sync_interval: always
}
NATS
    .venv/bin/nats-server -c "$dir/nats.conf" > "$dir/nats.log" 2>&1 &
    nats_pid=$!
    for _ in $(seq 100); do
        kill -0 "$nats_pid" 2>/dev/null || break
        if grep -q "Server is ready" "$dir/nats.log" 2>/dev/null; then
            nats_url="nats://127.0.0.1:$port"
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$dir/nats.log" >&2 || true
    echo "nats-server did not start" >&2
    exit 1
}

# The median and p99 duration of each saga step (and of whole sagas) that
# started in [since, until] µs, from `checkout_saga_steps`.
step_table_postgres() { # orders database URL, since, until
    "$(scripts/pg.sh bin)/psql" -X -q -v ON_ERROR_STOP=1 "$1" <<SQL
WITH steps AS (
    SELECT saga_id, seq, step, outcome, finished_at - started_at AS took
    FROM checkout_saga_steps
    WHERE started_at BETWEEN $2 AND $3
), sagas AS (
    SELECT saga_id, max(seq) AS seq, 'whole saga'::text AS step, '' AS outcome,
           max(finished_at) - min(started_at) AS took
    FROM checkout_saga_steps
    WHERE started_at BETWEEN $2 AND $3
    GROUP BY saga_id
)
SELECT step, count(*) AS count,
       count(*) FILTER (WHERE outcome <> 'ok' AND step <> 'whole saga') AS not_ok,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY took) / 1000.0)::numeric, 2) AS p50_ms,
       round((percentile_cont(0.99) WITHIN GROUP (ORDER BY took) / 1000.0)::numeric, 2) AS p99_ms
FROM (SELECT * FROM steps UNION ALL SELECT * FROM sagas) AS all_steps
GROUP BY step
ORDER BY step = 'whole saga', avg(seq);
SQL
}

step_table_sqlite() { # orders database file, since, until
    "$python" - "$1" "$2" "$3" <<'PY'
import sqlite3, sys
path, since, until = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
rows = db.execute(
    "SELECT saga_id, seq, step, outcome, started_at, finished_at FROM checkout_saga_steps"
    " WHERE started_at BETWEEN ? AND ?", (since, until)).fetchall()
def quantile(values, q):
    # Linear interpolation between closest ranks, as PostgreSQL's percentile_cont.
    values = sorted(values)
    if not values:
        return 0.0
    rank = q * (len(values) - 1)
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)
steps, order, sagas = {}, {}, {}
for saga_id, seq, step, outcome, started, finished in rows:
    entry = steps.setdefault(step, {"took": [], "not_ok": 0})
    entry["took"].append(finished - started)
    entry["not_ok"] += outcome != "ok"
    order.setdefault(step, []).append(seq)
    first, last = sagas.get(saga_id, (started, finished))
    sagas[saga_id] = (min(first, started), max(last, finished))
names = sorted(steps, key=lambda s: sum(order[s]) / len(order[s]))
print(f"{'step':<24} {'count':>7} {'not_ok':>7} {'p50_ms':>9} {'p99_ms':>9}")
for name in names:
    took = steps[name]["took"]
    print(f"{name:<24} {len(took):>7} {steps[name]['not_ok']:>7} {quantile(took, 0.5) / 1000:>9.2f} {quantile(took, 0.99) / 1000:>9.2f}")
whole = [last - first for first, last in sagas.values()]
print(f"{'whole saga':<24} {len(whole):>7} {'':>7} {quantile(whole, 0.5) / 1000:>9.2f} {quantile(whole, 0.99) / 1000:>9.2f}")
PY
}

# One loadgen run in the background (so that CPU can be sampled while it
# runs); its summary goes to stdout once it is done.
loadgen() { # name, mix, extra loadgen arguments...
    local name="$1" mix="$2"
    shift 2
    "$agora" loadgen --mix "$mix" --concurrency "$concurrency" --duration "$duration" \
        --json "$work/$name.json" --admin-email "$admin_email" --data-dir "$data" \
        "${addresses[@]}" "$@" > "$work/$name.out" 2> "$work/$name.err" &
    loadgen_pid=$!
    # Measure from when the virtual users are signed in and running.
    until grep -q "running mix" "$work/$name.err" 2>/dev/null; do
        if ! kill -0 "$loadgen_pid" 2>/dev/null; then
            cat "$work/$name.err" >&2
            echo "loadgen $name failed before its run" >&2
            exit 1
        fi
        sleep 0.1
    done
    run_started="$(now_micros)"
    cpu_sample > "$work/$name.cpu0"
    [ "$backend" != postgres ] || pg_writes > "$work/$name.writes0"
    # The last sample a little before the end, while loadgen still runs.
    local window=$((duration > 4 ? duration - 2 : 1)) sampler=
    if [ "$backend" = postgres ]; then
        pg_wait_samples "$window" > "$work/$name.waits" &
        sampler=$!
    fi
    sleep "$window"
    cpu_sample > "$work/$name.cpu1"
    [ -z "$sampler" ] || wait "$sampler" || true
    local code=0
    wait "$loadgen_pid" || code=$?
    loadgen_pid=
    run_finished="$(now_micros)"
    cat "$work/$name.out"
    cpu_report "$work/$name.cpu0" "$work/$name.cpu1" | tee "$work/$name.cpuline"
    if [ "$backend" = postgres ] && [ -e "$work/$name.json" ]; then
        # Backends report their statistics within a second or so.
        sleep 1.5
        pg_writes > "$work/$name.writes1"
        pg_writes_report "$work/$name.writes0" "$work/$name.writes1" "$work/$name.json"
        pg_wait_report "$work/$name.waits"
    fi
    if [ "$code" != 0 ]; then
        tail -n 5 "$work/$name.err" >&2
        echo "loadgen $name exited with status $code" >&2
    fi
}

bench_backend() { # postgres | sqlite
    local backend="$1" name upper port
    data="$work/$backend"
    mkdir -p "$data"
    echo
    echo "=== $backend: agora serve all, $concurrency virtual users, $duration s per run ==="
    start_nats "$data/nats"
    "$agora" keygen --dir "$data/keys" > /dev/null
    local env=(
        "AGORA_DATA_DIR=$data"
        "AGORA_NATS_URL=$nats_url"
        "AGORA_AUTH__ADMIN_EMAILS=[\"$admin_email\"]"
        # Logs at warn: a benchmark measures the services, not their logging.
        "RUST_LOG=warn"
    )
    addresses=()
    health=()
    # One database per service, named after the run: the services create
    # them on first start (scripts/up.sh does the same).
    db_prefix="bench_$(basename "$work" | tr -dc 'a-zA-Z0-9' | tr '[:upper:]' '[:lower:]')"
    local pg_base="${AGORA_TEST_POSTGRES_URL:-}"
    pg_base="${pg_base%%\?*}"
    pg_base="${pg_base%/*}"
    for name in "${services[@]}"; do
        upper="$(echo "$name" | tr '[:lower:]' '[:upper:]')"
        port="$(free_port)"
        env+=("AGORA_${upper}__LISTEN_ADDR=127.0.0.1:$port")
        if [ "$backend" = postgres ]; then
            env+=("AGORA_${upper}__DATABASE_URL=$pg_base/${db_prefix}_$name")
        fi
        health+=("$name=127.0.0.1:$port")
        case "$name" in
            users | catalog | inventory | orders) addresses+=("--$name" "http://127.0.0.1:$port") ;;
        esac
    done
    env -u DATABASE_URL -u NATS_URL "${env[@]}" "$agora" serve all > "$data/agora.log" 2>&1 &
    agora_pid=$!
    if ! "$agora" health --wait 60 "${health[@]}" > "$data/health.txt"; then
        cat "$data/health.txt" >&2
        tail -n 20 "$data/agora.log" >&2
        echo "$backend: agora serve all did not become healthy" >&2
        exit 1
    fi
    "$agora" seed --admin-email "$admin_email" --data-dir "$data" \
        --users "http://${health[0]#*=}" --catalog "http://${health[1]#*=}" \
        --inventory "http://${health[2]#*=}" > "$data/seed.txt"
    # Sanity first: one checkout must go through before measuring anything.
    if ! "$agora" loadgen --checkouts 1 --concurrency 1 --mix checkout --admin-email "$admin_email" \
        --data-dir "$data" "${addresses[@]}" > "$data/sanity.txt" 2>&1; then
        cat "$data/sanity.txt" >&2
        echo "$backend: a single checkout failed; not measuring" >&2
        exit 1
    fi

    echo
    echo "--- $backend: checkout mix ---"
    loadgen "$backend-checkout" checkout
    local since="$run_started" until="$run_finished"
    echo
    echo "--- $backend: browse mix ---"
    loadgen "$backend-browse" browse

    echo
    echo "--- $backend: checkout saga steps during the checkout run (ms) ---"
    if [ "$backend" = postgres ]; then
        step_table_postgres "$pg_base/${db_prefix}_orders" "$since" "$until"
    else
        step_table_sqlite "$data/orders.db" "$since" "$until"
    fi

    stop_process "$agora_pid"
    agora_pid=
    stop_process "$nats_pid"
    nats_pid=
}

pg_data_dir=
for backend in $backends; do
    case "$backend" in
        postgres)
            [ -n "${AGORA_TEST_POSTGRES_URL:-}" ] \
                || { echo "postgres needs AGORA_TEST_POSTGRES_URL (run through \`just bench checkout\`)" >&2; exit 2; }
            # Where the server keeps its data, for its processes' CPU time
            # (empty when the server is elsewhere).
            pg_data_dir="$("$(scripts/pg.sh bin)/psql" -X -A -t -q "$AGORA_TEST_POSTGRES_URL" \
                -c "SELECT setting FROM pg_settings WHERE name = 'data_directory'" 2>/dev/null || true)"
            [ -d "$pg_data_dir" ] || pg_data_dir=
            ;;
        sqlite) pg_data_dir= ;;
        *) echo "unknown backend '$backend' (postgres or sqlite)" >&2; exit 2 ;;
    esac
    bench_backend "$backend"
done

echo
echo "=== summary: $concurrency virtual users, $duration s per run, $(nproc) cores ==="
"$python" - "$work" $backends <<'PY'
import json, os, sys
work, backends = sys.argv[1], sys.argv[2:]
print(f"{'backend':<9} {'mix':<9} {'req/s':>8} {'checkouts/s':>12} {'PlaceOrder p50':>15} {'p99':>8} {'errors':>7}")
for backend in backends:
    for mix in ["checkout", "browse"]:
        path = os.path.join(work, f"{backend}-{mix}.json")
        if not os.path.exists(path):
            continue
        run = json.load(open(path))
        place = run["operations"]["PlaceOrder"]
        print(f"{backend:<9} {mix:<9} {run['all']['calls_per_sec']:>8.1f} {run['checkouts_per_sec']:>12.1f}"
              f" {place['latency_ms']['p50']:>12.2f} ms {place['latency_ms']['p99']:>5.2f} ms {run['all']['errors']:>7}")
PY
for backend in $backends; do
    for mix in checkout browse; do
        [ -e "$work/$backend-$mix.cpuline" ] && echo "$backend $mix: $(cat "$work/$backend-$mix.cpuline")"
    done
done
