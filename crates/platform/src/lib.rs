//! The shared runtime every Agora service stands on.
//!
//! # Layout
//! - [`config`]: typed, layered configuration (defaults < TOML file < `AGORA_*`
//!   environment < command-line flags); [`config::Secret`] keeps secrets out of
//!   `Debug` output and logs.
//! - [`telemetry`]: the tracing subscriber (pretty or JSON), OTLP trace export
//!   when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C `traceparent`
//!   propagation through gRPC metadata.
//! - [`server`]: the gRPC server builder every service uses: health driven by
//!   real dependency checks (and degraded-only ones, reported on their own),
//!   reflection v1 and v1alpha, one tracing span per RPC, each RPC's declared
//!   access level checked before its handler, background workers
//!   (an outbox relay, an event consumer) stopped after the drain, graceful
//!   shutdown that drains in-flight calls.
//! - [`deadline`]: the time left for the request being served (from its
//!   `grpc-timeout`), which every outgoing call is bounded by.
//! - [`error`]: the one table from domain error kinds to `tonic::Code`, with
//!   `google.rpc.BadRequest` field violations for invalid input.
//! - [`db`]: a sqlx pool over PostgreSQL or SQLite, chosen by the URL scheme,
//!   with per-backend migrations.
//! - [`auth`]: EdDSA JWTs: user tokens (signed by the users service, their
//!   key named by `kid` so that it can be rotated), service tokens (each
//!   service signs its own, per target service), verification for one
//!   service, and the [`auth::Caller`] a request was made by.
//! - [`access`]: each RPC's access level (public, user, admin, service) and
//!   allowed calling services, read from the contract's method options;
//!   the one authorization rule, enforced by [`server`] before any handler.
//! - [`email`]: the one definition of a valid, normalized email address.
//! - [`card`]: the one definition of a valid card number (Luhn, 12 to 19
//!   digits), redacted in `Debug`, for orders and payments alike.
//! - [`ids`]: identifiers every service agrees on (`UserId`).
//! - [`limits`]: the length limits the contract declares on every string
//!   and list of a request, checked on the encoded message by [`server`]
//!   before any handler runs.
//! - [`pagination`]: page sizes and opaque cursor page tokens for `List*` RPCs.
//! - [`money`]: validated `agora.common.v1.Money` amounts.
//! - [`shutdown`]: the process-wide stop signal (SIGTERM / SIGINT).
//! - [`backoff`]: the one retry schedule (exponential, capped, optionally
//!   jittered) every retry in Agora follows.
//! - [`work`]: bounded expensive work (password hashing and the like): a
//!   semaphore sized from the cores and the memory limit, a bounded waiting
//!   room, RESOURCE_EXHAUSTED with `RetryInfo` beyond it.

#![forbid(unsafe_code)]

pub mod access;
pub mod auth;
pub mod backoff;
pub mod card;
pub mod config;
pub mod db;
pub mod deadline;
pub mod email;
pub mod error;
pub mod ids;
pub mod limits;
pub mod money;
pub mod pagination;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod work;

pub use error::{Error, ErrorKind, Result};
