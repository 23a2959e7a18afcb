//! The orders service: the checkout saga, order storage, queries and live
//! order updates.
//!
//! `PlaceOrder` creates a PENDING order (idempotently per user and client
//! request id) and runs its checkout saga across inventory and payments
//! (reserve, charge, confirm, commit; compensation in reverse), which moves
//! the order PENDING -> COMPLETED | FAILED; `CancelOrder` moves COMPLETED ->
//! CANCELLED with a refund and restock. The store refuses every other move.
//! Users read their own orders (`GetOrder`, `ListOrders`; admins may read
//! any one) and follow one live with `WatchOrder`, which streams each status
//! change and ends once the checkout is over.
//!
//! # Layout
//! - [`checkout`]: the saga orchestrator: pricing, driving steps, leases,
//!   resuming dead replicas' sagas, PlaceOrder's wait.
//! - [`saga`]: the saga's steps, the stable failure reasons, how a call's
//!   status is classified.
//! - [`saga_store`]: sagas and their step history, with optimistic versions
//!   and leases.
//! - [`domain`]: the order, its status lifecycle, and the validated
//!   [`domain::NewOrder`] an order is made from.
//! - [`store`]: the [`store::OrderStore`] trait and its SQL implementation
//!   (PostgreSQL and SQLite): create, get, list, status transitions.
//! - [`changes`]: [`changes::OrderChanges`], the in-process broadcast the
//!   store signals after each committed transition.
//! - [`watch`]: the `WatchOrder` hub: caps per user and per replica, the
//!   streams' lifetime, one shared re-read of all watched orders.
//! - [`grpc`]: the `agora.orders.v1.OrderService` adapter: authorization,
//!   validation, mapping to protobuf.

#![forbid(unsafe_code)]

pub mod changes;
pub mod checkout;
pub mod domain;
pub mod grpc;
pub mod saga;
pub mod saga_store;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod watch;

use agora_platform::auth::{ServiceTokenSigner, TokenVerifier};
use agora_platform::config::{Config, DiscoveryMode};
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_platform_client::{CallPolicy, Clients, Credentials, Discovery};
use agora_platform_events::ServiceEvents;
use agora_proto::orders::v1::SERVICE_NAME;
use agora_proto::orders::v1::order_service_server::OrderServiceServer;

/// The orders service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the orders database (migrating it) and returns the service
/// ready to host, with its database as health check, the saga resumer and
/// the outbox relay as workers, together with handles on its store and its
/// checkout orchestrator.
pub async fn build(config: &Config) -> anyhow::Result<Orders> {
    let db = Db::connect_and_migrate(&config.database_url("orders"), MIGRATIONS).await?;
    let events = ServiceEvents::start(config, &db, "orders").await?;
    let verifier = TokenVerifier::for_service(&config.auth, "orders")?;
    let store = store::SqlOrderStore::new(events.outbox.clone());
    let checkout =
        checkout::Checkout::new(store.clone(), backends(config, &events)?, &config.checkout);
    // Open WatchOrder streams end when the server begins to shut down,
    // rather than holding its drain until the timeout.
    let drain = tokio_util::sync::CancellationToken::new();
    let api = grpc::OrderApi::new(store.clone(), checkout.clone(), verifier.clone())
        .with_watch_config(&config.watch)
        .with_drain_signal(drain.clone());
    let watches = api.watches();
    let resume_every = checkout.resume_interval();
    // Response (and request) message size limits of `config.server`.
    let server = agora_platform::message_limits!(OrderServiceServer::new(api), &config.server);
    let hosted = HostedService::new(SERVICE_NAME, server)
        .with_token_verifier(verifier)
        .with_check(db)
        .with_drain_signal(drain)
        .with_worker("saga-resumer", {
            let checkout = checkout.clone();
            move |stop| resume_sagas(checkout, resume_every, stop)
        });
    Ok(Orders {
        hosted: events.attach(hosted),
        store,
        checkout,
        watches,
    })
}

/// The orders service ready to host, with handles on what it runs.
#[allow(missing_debug_implementations)] // HostedService holds boxed services.
pub struct Orders {
    /// The service, its health checks and workers (relay, saga resumer).
    pub hosted: HostedService,
    /// The very store the service uses: transitions made through it reach
    /// the service's watchers at once.
    pub store: store::SqlOrderStore,
    /// The checkout orchestrator the service runs (and its clients).
    pub checkout: checkout::Checkout,
    /// The service's `WatchOrder` hub (open streams, polls).
    pub watches: watch::WatchHub<store::SqlOrderStore>,
}

/// Clients of inventory, payments and catalog through the platform's client
/// stack, authenticated as `orders`. Every call the saga makes is idempotent
/// (keyed by saga id and step), so all of them may be retried.
fn backends(config: &Config, events: &ServiceEvents) -> anyhow::Result<checkout::Backends> {
    let signer = ServiceTokenSigner::from_config(config, "orders")?;
    let credentials: Credentials =
        std::sync::Arc::new(move |audience: &str| signer.token_for(audience).map(Some));
    let discovery = match config.clients.discovery {
        DiscoveryMode::Static => Discovery::Static,
        DiscoveryMode::Nats => Discovery::Nats(events.bus.client().clone()),
    };
    // Every saga call has the step deadline: made the stack's default, a
    // call that runs out of it counts against the instance's breaker (a
    // shorter explicit timeout would not, see agora_platform_client).
    let mut settings = config.clone();
    settings.clients.default_timeout_ms = config
        .clients
        .default_timeout_ms
        .min(config.checkout.step_timeout_ms.max(1));
    let clients = Clients::new(&settings, "orders", discovery, credentials)?;
    let idempotent = |service: &str, methods: &[&str]| {
        CallPolicy::idempotent_methods(methods.iter().map(|method| format!("/{service}/{method}")))
    };
    Ok(checkout::Backends {
        inventory: clients.channel(
            "inventory",
            idempotent(
                agora_proto::inventory::v1::SERVICE_NAME,
                &["ReserveStock", "ReleaseReservation", "CommitReservation"],
            ),
        )?,
        payments: clients.channel(
            "payments",
            idempotent(
                agora_proto::payments::v1::SERVICE_NAME,
                &["Charge", "Refund"],
            ),
        )?,
        catalog: clients.channel(
            "catalog",
            idempotent(agora_proto::catalog::v1::SERVICE_NAME, &["GetProduct"]),
        )?,
    })
}

/// Takes over the sagas of dead replicas (and, after a restart, this one's
/// own) every `every`, until `stop`.
async fn resume_sagas(
    checkout: checkout::Checkout,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(err) = checkout.resume_expired().await {
            tracing::warn!(error = %err, "cannot scan for sagas to resume");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// The service ready to host (see [`build`]).
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    Ok(build(config).await?.hosted)
}
