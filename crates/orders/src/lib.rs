//! The orders service: order storage, queries and live order updates.
//!
//! An order is created PENDING by the checkout (idempotently per user and
//! client request id), then moves PENDING -> COMPLETED | FAILED and
//! COMPLETED -> CANCELLED; the store refuses every other move. Users read
//! their own orders (`GetOrder`, `ListOrders`; admins may read any one) and
//! follow one live with `WatchOrder`, which streams each status change and
//! ends once the checkout is over. The checkout saga itself (`PlaceOrder`,
//! `CancelOrder`) is not built yet: both answer UNIMPLEMENTED.
//!
//! # Layout
//! - [`domain`]: the order, its status lifecycle, and the validated
//!   [`domain::NewOrder`] an order is made from.
//! - [`store`]: the [`store::OrderStore`] trait and its SQL implementation
//!   (PostgreSQL and SQLite): create, get, list, status transitions.
//! - [`changes`]: [`changes::OrderChanges`], the in-process broadcast the
//!   store signals after each committed transition.
//! - [`watch`]: the per-stream task behind `WatchOrder`.
//! - [`grpc`]: the `agora.orders.v1.OrderService` adapter: authorization,
//!   validation, mapping to protobuf.

#![forbid(unsafe_code)]

pub mod changes;
pub mod domain;
pub mod grpc;
pub mod store;
pub mod watch;

use agora_platform::auth::TokenVerifier;
use agora_platform::config::Config;
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_platform_events::ServiceEvents;
use agora_proto::orders::v1::SERVICE_NAME;
use agora_proto::orders::v1::order_service_server::OrderServiceServer;

/// The orders service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the orders database (migrating it) and returns the service
/// ready to host, with its database as health check, together with a handle
/// on the very store the service uses: transitions made through it (by the
/// checkout, or by tests) reach the service's watchers at once.
pub async fn build(config: &Config) -> anyhow::Result<(HostedService, store::SqlOrderStore)> {
    let db = Db::connect_and_migrate(&config.database_url("orders"), MIGRATIONS).await?;
    let events = ServiceEvents::start(config, &db, "orders").await?;
    let verifier = TokenVerifier::from_config(&config.auth)?;
    let store = store::SqlOrderStore::new(events.outbox.clone());
    // Open WatchOrder streams end when the server begins to shut down,
    // rather than holding its drain until the timeout.
    let drain = tokio_util::sync::CancellationToken::new();
    let api = grpc::OrderApi::new(store.clone(), verifier).with_drain_signal(drain.clone());
    let hosted = HostedService::new(SERVICE_NAME, OrderServiceServer::new(api))
        .with_check(db)
        .with_drain_signal(drain);
    Ok((events.attach(hosted), store))
}

/// The service ready to host (see [`build`]).
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    Ok(build(config).await?.0)
}
