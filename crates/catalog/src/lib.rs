//! The catalog service: products, their prices and categories.
//!
//! Admins create products and change them field by field (`UpdateProduct`
//! with a field mask); anyone may read one product or page through the
//! catalog, newest first, filtered by text and category. Pages are addressed
//! by an opaque cursor on `(created_at, id)`, so products added while a
//! client pages never shift or repeat what it sees.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`Sku`, `ProductName`, `Description`,
//!   `Category`, `Categories`, `SearchQuery`), the price check, and the
//!   product records (`Product`, `NewProduct`, `ProductChanges`,
//!   `UpdatedProduct` with its `PriceChange`).
//! - [`store`]: the [`store::CatalogStore`] trait and its SQL implementation
//!   (PostgreSQL and SQLite), with categories in a child table.
//! - [`grpc`]: the `agora.catalog.v1.CatalogService` adapter: validation,
//!   authorization, mapping to protobuf.

#![forbid(unsafe_code)]

pub mod domain;
pub mod grpc;
pub mod store;

use agora_platform::auth::TokenVerifier;
use agora_platform::config::Config;
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_platform_events::ServiceEvents;
use agora_proto::catalog::v1::SERVICE_NAME;
use agora_proto::catalog::v1::catalog_service_server::CatalogServiceServer;

/// The catalog service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the catalog database (migrating it), loads the token
/// verification key and returns the service ready to host, with its database
/// as health check and the outbox relay publishing `ProductPriceChanged`.
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    let db = Db::connect_and_migrate(&config.database_url("catalog"), MIGRATIONS).await?;
    let events = ServiceEvents::start(config, &db, "catalog").await?;
    let verifier = TokenVerifier::for_service(&config.auth, "catalog")?;
    let api = grpc::CatalogApi::new(
        store::SqlCatalogStore::new(events.outbox.clone()),
        verifier.clone(),
    );
    // Response (and request) message size limits of `config.server`.
    let server = agora_platform::message_limits!(CatalogServiceServer::new(api), &config.server);
    let hosted = HostedService::new(SERVICE_NAME, server)
        .with_token_verifier(verifier)
        .with_check(db);
    Ok(events.attach(hosted))
}
