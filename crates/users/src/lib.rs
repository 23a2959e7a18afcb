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
    let db = Db::connect_and_migrate(&config.database_url("users"), MIGRATIONS).await?;
    let events = ServiceEvents::start(config, &db, "users").await?;
    let issuer = TokenIssuer::from_config(&config.auth)?;
    let verifier = TokenVerifier::for_service(&config.auth, "users")?;
    let api = grpc::UserApi::new(
        store::SqlUserStore::new(events.outbox.clone()),
        issuer,
        verifier.clone(),
    )
    .with_admin_emails(&config.auth.admin_emails);
    let hosted = HostedService::new(SERVICE_NAME, UserServiceServer::new(api))
        .with_token_verifier(verifier)
        .with_check(db);
    Ok(events.attach(hosted))
}
