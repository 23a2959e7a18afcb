//! The users service: accounts, password login and JWT issuance, event-sourced.
//!
//! Every change to a user is an event (`UserCreated`, `UserEmailUpdated`,
//! `UserActivated`) appended to the user's history with the next version
//! number; the current state is what replaying that history gives. A write
//! that expected an older version fails with ABORTED.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`Email`, `UserName`, `Password`) and the
//!   password hashing.
//! - [`passwords`]: every hash and verification bounded (`config.passwords`:
//!   so many at once, a bounded wait, RESOURCE_EXHAUSTED beyond) and off the
//!   async runtime; the longest password accepted.
//! - [`events`]: the stored events, the state they fold into, and the decisions
//!   that turn commands into new events.
//! - [`store`]: the [`store::UserStore`] trait and its SQL implementation
//!   (PostgreSQL and SQLite), with a projection table kept in the same
//!   transaction as each event.
//! - [`grpc`]: the `agora.users.v1.UserService` adapter: validation,
//!   authorization, mapping to protobuf.

#![forbid(unsafe_code)]

pub mod domain;
pub mod events;
pub mod grpc;
pub mod passwords;
pub mod store;

use agora_platform::auth::{TokenIssuer, TokenVerifier};
use agora_platform::config::Config;
use agora_platform::db::{Db, Migrations};
use agora_platform::server::HostedService;
use agora_platform_events::ServiceEvents;
use agora_proto::users::v1::SERVICE_NAME;
use agora_proto::users::v1::user_service_server::UserServiceServer;

/// The users service's migrations, per backend.
pub const MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("migrations/postgres"),
    sqlite: &sqlx::migrate!("migrations/sqlite"),
};

/// Connects to the users database (migrating it), loads the signing key and
/// returns the service ready to host, with its database as health check,
/// NATS as a degraded-only dependency and the outbox relay publishing
/// `UserCreated`, `UserEmailUpdated` and `UserActivated`.
pub async fn hosted(config: &Config) -> anyhow::Result<HostedService> {
    // First: a configuration no password fits fails before any connection.
    let passwords = passwords::Passwords::from_config(&config.passwords)?;
    // The dummy hash unknown emails are verified against, before any login.
    passwords.prepare().await?;
    let db = Db::connect_and_migrate(&config.database_url("users"), MIGRATIONS).await?;
    let events = ServiceEvents::start(config, &db, "users").await?;
    let issuer = TokenIssuer::from_config(&config.auth)?;
    let verifier = TokenVerifier::for_service(&config.auth, "users")?;
    let api = grpc::UserApi::new(
        store::SqlUserStore::new(events.outbox.clone()),
        issuer,
        verifier.clone(),
        passwords,
    )
    .with_admin_emails(&config.auth.admin_emails);
    // Response (and request) message size limits of `config.server`.
    let server = agora_platform::message_limits!(UserServiceServer::new(api), &config.server);
    let hosted = HostedService::new(SERVICE_NAME, server)
        .with_token_verifier(verifier)
        .with_check(db);
    Ok(events.attach(hosted))
}
