//! Domain events for Agora services, on NATS JetStream.
//!
//! A state change and the events it causes commit in one database
//! transaction (the outbox); a relay publishes them and marks them; consumers
//! apply each event once (an inbox row in the transaction of the side
//! effect) and give up on a failing one after a few deliveries (the
//! dead-letter stream), from where it can be replayed. Nothing is lost and
//! nothing is applied twice, whichever process dies when.
//!
//! # Layout
//! - [`envelope`]: the [`DomainEvent`] trait, the table of every event of the
//!   contract (its protobuf type and subject) and the header names.
//! - [`streams`]: one stream per domain plus the dead-letter stream, their
//!   limits, and creating or updating them.
//! - [`bus`]: [`EventBus`], the NATS connection that survives the broker
//!   being down, and its health.
//! - [`outbox`]: [`Outbox`] and [`UnitOfWork`], a write transaction that
//!   records events with the state change.
//! - [`relay`]: [`OutboxRelay`], publishing recorded events.
//! - [`consumer`]: [`EventConsumer`] and the [`EventHandler`] a service
//!   implements: durable pull consumers with inbox, retry and dead letters.
//! - [`dead_letters`]: listing and replaying dead letters.
//! - [`backoff`]: the platform's one retry schedule, which all of the above
//!   use (re-exported).
//!
//! Every service that publishes or consumes applies this crate's migrations
//! to its database ([`migrate`]): the outbox and inbox tables, tracked apart
//! from the service's own migrations.

#![forbid(unsafe_code)]

pub use agora_platform::backoff;
pub mod bus;
pub mod consumer;
pub mod dead_letters;
pub mod envelope;
pub mod outbox;
pub mod relay;
pub mod streams;

pub use bus::EventBus;
pub use consumer::{ConsumerSettings, Delivery, EventConsumer, EventHandler};
pub use envelope::{DomainEvent, EVENT_TYPES, EventType};
/// The future type of [`EventHandler`] methods.
pub use futures::future::BoxFuture;
pub use outbox::{Outbox, UnitOfWork};
pub use relay::{OutboxRelay, RelaySettings};
pub use streams::StreamSettings;

use agora_platform::config::Config;
use agora_platform::db::{Backend, Db};
use agora_platform::error::{Error, Result};
use agora_platform::server::HostedService;

/// The table recording which events migrations ran, apart from the
/// service's own `_sqlx_migrations`.
const MIGRATIONS_TABLE: &str = "_agora_events_migrations";

/// Creates or upgrades the outbox and inbox tables in `db`.
pub async fn migrate(db: &Db) -> Result<()> {
    let mut migrator = match db.backend() {
        Backend::Postgres => sqlx::migrate!("migrations/postgres"),
        Backend::Sqlite => sqlx::migrate!("migrations/sqlite"),
    };
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
        .run(db.pool())
        .await
        .map_err(|err| Error::internal("applying the events migrations", err))
}

/// A service's events, wired from its configuration: the bus, its outbox in
/// the service's database (migrated), and the relay that publishes it.
#[derive(Clone, Debug)]
pub struct ServiceEvents {
    /// Where the service's stores record events.
    pub outbox: Outbox,
    /// The NATS connection.
    pub bus: EventBus,
    source: &'static str,
    relay_settings: RelaySettings,
    consumer_settings: ConsumerSettings,
}

impl ServiceEvents {
    /// Connects to NATS (in the background: this does not wait for it) and
    /// prepares the outbox of service `source` in `db`.
    pub async fn start(config: &Config, db: &Db, source: &'static str) -> Result<Self> {
        migrate(db).await?;
        let streams = StreamSettings {
            replicas: config.events.stream_replicas.max(1),
            ..StreamSettings::default()
        };
        let bus = EventBus::connect(&config.nats_url, &format!("agora-{source}"), streams).await?;
        let relay_settings = RelaySettings {
            retention: std::time::Duration::from_secs(
                config.events.outbox_retention_hours.saturating_mul(3600),
            ),
            ..RelaySettings::default()
        };
        let consumer_settings = ConsumerSettings {
            dead_letter_after: config.events.dead_letter_after.max(1),
            ..ConsumerSettings::default()
        };
        Ok(Self {
            outbox: Outbox::new(db.clone()),
            bus,
            source,
            relay_settings,
            consumer_settings,
        })
    }

    /// The relay of this service's outbox.
    pub fn relay(&self) -> OutboxRelay {
        OutboxRelay::new(self.outbox.clone(), self.bus.clone(), self.source)
            .with_settings(self.relay_settings.clone())
    }

    /// A consumer `name` of `subjects`, applying with `handler` in this
    /// service's database.
    pub fn consumer(
        &self,
        name: &'static str,
        subjects: &[&'static str],
        handler: impl EventHandler,
    ) -> EventConsumer {
        EventConsumer::new(
            name,
            subjects,
            self.outbox.clone(),
            self.bus.clone(),
            handler,
        )
        .with_settings(self.consumer_settings.clone())
    }

    /// Adds NATS as a degraded-only dependency and `consumer` as a worker,
    /// for a service that consumes events.
    pub fn attach_consumer(&self, hosted: HostedService, consumer: EventConsumer) -> HostedService {
        hosted
            .with_degraded_check(self.bus.clone())
            .with_worker("event-consumer", move |stop| consumer.run(stop))
    }

    /// Adds NATS as a degraded-only dependency and the relay as a worker,
    /// for a service that publishes events.
    pub fn attach(&self, hosted: HostedService) -> HostedService {
        let relay = self.relay();
        hosted
            .with_degraded_check(self.bus.clone())
            .with_worker("outbox-relay", move |stop| relay.run(stop))
    }
}
