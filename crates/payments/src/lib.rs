//! The payments service: idempotent card charges and refunds against a
//! simulated provider.
//!
//! Other services (the orders service's checkout saga) charge and refund
//! with a service token; each charge is keyed by a caller-chosen payment id,
//! so a retry, however often and however concurrent, returns the first
//! outcome and never charges the card twice. The provider is called with no
//! database transaction open, under the payment id as idempotency key; a
//! crash in between is settled by a retry, a refund or the sweeper. A refund
//! needs no card: it settles what it finds first, and an id never charged
//! becomes VOIDED, so that a late charge with it is refused. Paying users and
//! admins may read a payment. A card number is kept only for the one provider
//! call: the database holds its last four digits and nothing else derived
//! from it.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`PaymentId`; `UserId` and `CardNumber`,
//!   with the Luhn check, from the platform, shared with orders), the amount
//!   check, the records (`ChargeAttempt`, `Payment`) and the error reasons.
//! - [`processor`]: the [`processor::CardProvider`] trait (async, idempotent
//!   on a key) and the simulated provider with its test cards, whose ledger
//!   proves every card was charged at most once.
//! - [`store`]: the [`store::PaymentStore`] trait and its SQL implementation
//!   (PostgreSQL and SQLite): claim, settle, tombstones.
//! - [`flow`]: charge and refund around the provider, with no database
//!   transaction open while it works, and the sweeper settling what a crash
//!   left `processing`.
//! - [`grpc`]: the `agora.payments.v1.PaymentService` adapter: validation,
//!   authorization, mapping to protobuf.

#![forbid(unsafe_code)]

pub mod domain;
pub mod flow;
pub mod grpc;
pub mod processor;
pub mod store;

use std::time::Duration;

use agora_platform::auth::TokenVerifier;
use agora_platform::config::Config;
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_platform_events::ServiceEvents;
use agora_proto::payments::v1::SERVICE_NAME;
use agora_proto::payments::v1::payment_service_server::PaymentServiceServer;

use crate::flow::SweepSettings;
use crate::processor::CardProvider;

/// The payments service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the payments database (migrating it), loads the token
/// verification key and returns the service ready to host, charging through
/// the simulated provider (test cards; its books in the same database), with
/// its database as health check, the outbox relay publishing
/// `PaymentCaptured` and `PaymentRefunded`, and the sweeper settling
/// interrupted charges.
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    let db = Db::connect_and_migrate(&config.database_url("payments"), MIGRATIONS).await?;
    let provider = processor::SimulatedProvider::new(db.clone());
    assemble(config, db, provider).await
}

/// [`hosted`] charging through `provider` instead of the simulated one.
pub async fn hosted_with_provider<P: CardProvider>(
    config: &Config,
    provider: P,
) -> anyhow::Result<HostedService> {
    let db = Db::connect_and_migrate(&config.database_url("payments"), MIGRATIONS).await?;
    assemble(config, db, provider).await
}

async fn assemble<P: CardProvider>(
    config: &Config,
    db: Db,
    provider: P,
) -> anyhow::Result<HostedService> {
    let events = ServiceEvents::start(config, &db, "payments").await?;
    let verifier = TokenVerifier::for_service(&config.auth, "payments")?;
    let flow = flow::PaymentFlow::new(store::SqlPaymentStore::new(events.outbox.clone()), provider);
    let sweep = SweepSettings {
        interval: Duration::from_millis(config.checkout.sweep_interval_ms.max(1)),
        settle_after: Duration::from_millis(config.checkout.payment_settle_after_ms),
        batch_size: SWEEP_BATCH_SIZE,
    };
    let sweeper = flow.clone();
    let api = grpc::PaymentApi::new(flow, verifier.clone());
    // Response (and request) message size limits of `config.server`.
    let server = agora_platform::message_limits!(PaymentServiceServer::new(api), &config.server);
    let hosted = HostedService::new(SERVICE_NAME, server)
        .with_token_verifier(verifier)
        .with_check(db)
        .with_worker("payment-sweeper", move |stop| {
            sweeper.run_sweeper(sweep, stop)
        });
    Ok(events.attach(hosted))
}

/// Unsettled payments the sweeper takes on per pass: bounds one pass's
/// provider calls; a full batch is followed by another at once.
const SWEEP_BATCH_SIZE: i64 = 100;
