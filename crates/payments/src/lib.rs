//! The payments service: idempotent card charges and refunds against a
//! simulated provider.
//!
//! Other services (the orders service's checkout saga) charge and refund
//! with a service token; each charge is keyed by a caller-chosen payment id,
//! so a retry, however often and however concurrent, returns the first
//! outcome and never charges the card twice. Paying users and admins may
//! read a payment. A card number is kept only for the one provider call: the
//! database holds its last four digits and nothing else derived from it.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`PaymentId`, `UserId`, `CardNumber` with
//!   the Luhn check), the amount check, and the records (`ChargeAttempt`,
//!   `Payment`).
//! - [`processor`]: the simulated provider, [`processor::CardProcessor`], and
//!   its test cards.
//! - [`store`]: the [`store::PaymentStore`] trait and its SQL implementation
//!   (PostgreSQL and SQLite), with the provider's ledger that proves every
//!   card was charged at most once.
//! - [`grpc`]: the `agora.payments.v1.PaymentService` adapter: validation,
//!   authorization, mapping to protobuf.

#![forbid(unsafe_code)]

pub mod domain;
pub mod grpc;
pub mod processor;
pub mod store;

use agora_platform::auth::TokenVerifier;
use agora_platform::config::Config;
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_platform_events::ServiceEvents;
use agora_proto::payments::v1::SERVICE_NAME;
use agora_proto::payments::v1::payment_service_server::PaymentServiceServer;

/// The payments service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the payments database (migrating it), loads the token
/// verification key and returns the service ready to host, with its database
/// as health check and the outbox relay publishing `PaymentCaptured` and
/// `PaymentRefunded`.
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    let db = Db::connect_and_migrate(&config.database_url("payments"), MIGRATIONS).await?;
    let events = ServiceEvents::start(config, &db, "payments").await?;
    let verifier = TokenVerifier::from_config(&config.auth)?;
    let api = grpc::PaymentApi::new(
        store::SqlPaymentStore::new(events.outbox.clone()),
        processor::CardProcessor,
        verifier,
    );
    let hosted = HostedService::new(SERVICE_NAME, PaymentServiceServer::new(api)).with_check(db);
    Ok(events.attach(hosted))
}
