//! The notifications service: emails sent in reaction to domain events
//! (`UserCreated`, `OrderCompleted`, `OrderCancelled`, `OrderFailed`), over
//! SMTP when `smtp_url` is configured or written as `.eml` files under
//! `<data_dir>/mail/` otherwise, and the `ListNotifications` query.
//!
//! The event consumer ([`events`]) keeps a directory of users' addresses
//! from the users service's events and calls [`Notifier::notify`] for each
//! event that asks for an email; the event id is the idempotency key, so a
//! redelivered event sends no second email. [`build`] returns the gRPC
//! service (with the consumer attached) and the notifier sharing one
//! database.
//!
//! # Layout
//! - [`directory`]: each user's current address, from their events.
//! - [`events`]: the event consumer's handler.
//! - [`domain`]: validated values (`Email`, `UserId`, event ids and types)
//!   and the stored [`domain::Notification`], owned by a user id.
//! - [`templates`]: the welcome, order completed and order cancelled emails,
//!   plain text plus an HTML alternative with every user value escaped.
//! - [`mailer`]: the [`mailer::Mailer`] trait, SMTP (lettre) and `.eml` file
//!   implementations, and composing the MIME message.
//! - [`store`]: the [`store::NotificationStore`] trait and its SQL
//!   implementation (PostgreSQL and SQLite): claim, record outcome, list.
//! - [`notifier`]: [`Notifier`], the library entry point: validate, render,
//!   claim, send, record.
//! - [`grpc`]: the `agora.notifications.v1.NotificationService` adapter:
//!   validation, authorization (users list their own notifications by user
//!   id, never by the unverified email in their token), mapping to protobuf.

#![forbid(unsafe_code)]

pub mod directory;
pub mod domain;
pub mod events;
pub mod grpc;
pub mod mailer;
pub mod notifier;
pub mod store;
pub mod templates;

use agora_platform::auth::TokenVerifier;
use agora_platform::config::Config;
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_platform_events::ServiceEvents;
use agora_proto::notifications::v1::SERVICE_NAME;
use agora_proto::notifications::v1::notification_service_server::NotificationServiceServer;
use anyhow::Context as _;
use lettre::message::Mailbox;

pub use notifier::{NotificationRequest, Notifier};
pub use templates::TemplateData;

/// The notifications service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the notifications database (migrating it), sets up the mailer
/// the configuration asks for, and returns the gRPC service ready to host
/// (with its database as health check) and the [`Notifier`] the event
/// consumer sends through.
pub async fn build(config: &Config) -> anyhow::Result<(HostedService, Notifier)> {
    let from: Mailbox = config
        .mail_from
        .parse()
        .with_context(|| format!("mail_from {:?} is not an email address", config.mail_from))?;
    let mailer = mailer::mailer_from_config(config)?;
    let db = Db::connect_and_migrate(&config.database_url("notifications"), MIGRATIONS).await?;
    let events = ServiceEvents::start(config, &db, "notifications").await?;
    let verifier = TokenVerifier::for_service(&config.auth, "notifications")?;
    let store = store::SqlNotificationStore::new(db.clone());
    let notifier = Notifier::new(store.clone(), mailer, from);
    let api = grpc::NotificationApi::new(store, verifier.clone());
    let consumer = events.consumer(
        events::CONSUMER,
        events::SUBJECTS,
        events::NotificationEvents::new(notifier.clone(), db.clone()),
    );
    // Response (and request) message size limits of `config.server`.
    let server =
        agora_platform::message_limits!(NotificationServiceServer::new(api), &config.server);
    let hosted = HostedService::new(SERVICE_NAME, server)
        .with_token_verifier(verifier)
        .with_check(db);
    Ok((events.attach_consumer(hosted, consumer), notifier))
}

/// The service ready to host: the gRPC service and its event consumer.
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    Ok(build(config).await?.0)
}
