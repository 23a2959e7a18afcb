//! The inventory service: stock levels and all-or-nothing reservations.
//!
//! Admins set how many units of a product are available; anyone may read it.
//! The checkout saga (the orders service, with a service token) reserves the
//! units of an order in one step, every item or none, then either commits the
//! reservation (the units are sold) or releases it (they return to available
//! stock). A reservation not committed within `checkout.reservation_ttl_secs`
//! expires: a sweeper returns its units, and a late commit takes them again
//! if they are still there. Every reservation call is idempotent on the
//! caller's reservation id, and stock never goes negative, however many
//! reservations race.
//! Product ids are trusted UUIDs: inventory never calls the catalog.
//!
//! # Layout
//! - [`domain`]: validated values (`ProductId`, `ReservationId`, quantities,
//!   merged `ReservationItems`) and the rules for repeated and out-of-order
//!   calls on a reservation.
//! - [`store`]: the [`store::InventoryStore`] trait and its SQL
//!   implementation (PostgreSQL and SQLite), where every unit moved is guarded
//!   in SQL inside one write transaction.
//! - [`expiry`]: the sweeper releasing expired reservations.
//! - [`grpc`]: the `agora.inventory.v1.InventoryService` adapter: validation,
//!   authorization, mapping to protobuf.

#![forbid(unsafe_code)]

pub mod domain;
pub mod expiry;
pub mod grpc;
pub mod store;

use std::time::Duration;

use agora_platform::auth::TokenVerifier;
use agora_platform::config::Config;
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_proto::inventory::v1::SERVICE_NAME;
use agora_proto::inventory::v1::inventory_service_server::InventoryServiceServer;

/// The inventory service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the inventory database (migrating it), loads the token
/// verification key and returns the service ready to host, with its database
/// as health check and the sweeper releasing expired reservations.
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    let db = Db::connect_and_migrate(&config.database_url("inventory"), MIGRATIONS).await?;
    let verifier = TokenVerifier::for_service(&config.auth, "inventory")?;
    let store = store::SqlInventoryStore::new(
        db.clone(),
        Duration::from_secs(config.checkout.reservation_ttl_secs),
    );
    let expiry = expiry::ExpirySettings {
        interval: Duration::from_millis(config.checkout.sweep_interval_ms.max(1)),
        batch_size: EXPIRY_BATCH_SIZE,
    };
    let sweeper = store.clone();
    let api = grpc::InventoryApi::new(store, verifier.clone());
    // Response (and request) message size limits of `config.server`.
    let server = agora_platform::message_limits!(InventoryServiceServer::new(api), &config.server);
    Ok(HostedService::new(SERVICE_NAME, server)
        .with_token_verifier(verifier)
        .with_check(db)
        .with_worker("reservation-expiry", move |stop| {
            expiry::run_sweeper(sweeper, expiry, stop)
        }))
}

/// Expired reservations the sweeper looks at per query (each released in a
/// short transaction of its own): bounds the work of one pass.
const EXPIRY_BATCH_SIZE: i64 = 100;
