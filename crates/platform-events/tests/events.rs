//! The event machinery against a private nats-server and real PostgreSQL and
//! SQLite: outbox, relay, consumers, inbox, dead letters, faults.
//!
//! The events are `agora.users.v1.UserCreated` messages (any event of the
//! contract would do); the test handler's side effect is a row in an
//! `applied` table, written in the consumer's transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agora_platform::config::Secret;
use agora_platform::db::{Backend as DbBackend, Db};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform_events::relay::Marking;
use agora_platform_events::streams::DEAD_LETTERS;
use agora_platform_events::{
    ConsumerSettings, Delivery, DomainEvent, EventBus, EventConsumer, EventHandler, Outbox,
    OutboxRelay, StreamSettings, UnitOfWork, dead_letters,
};
use agora_proto::users::v1::UserCreated;
use agora_testkit::{Backend, NatsServer, TestDatabase, backend_tests};
use async_nats::jetstream::message::PublishMessage;
use futures::future::BoxFuture;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

/// A database with the events tables and the test handler's table.
async fn database(backend: Backend) -> anyhow::Result<(TestDatabase, Db)> {
    let database = TestDatabase::create(backend).await?;
    let db = Db::connect(&Secret::new(database.url().to_owned())).await?;
    agora_platform_events::migrate(&db).await?;
    sqlx::query(
        "CREATE TABLE applied (consumer TEXT NOT NULL, event_id TEXT NOT NULL, \
         aggregate_id TEXT NOT NULL, version BIGINT NOT NULL)",
    )
    .execute(db.pool())
    .await?;
    Ok((database, db))
}

/// What most tests start with: a private nats-server, a fresh database with
/// the events tables, a bus on the one and an outbox in the other.
struct Fixture {
    nats: NatsServer,
    database: TestDatabase,
    db: Db,
    bus: EventBus,
    outbox: Outbox,
}

impl Fixture {
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let (database, db) = database(backend).await?;
        let bus = bus(&nats).await?;
        let outbox = Outbox::new(db.clone());
        Ok(Self {
            nats,
            database,
            db,
            bus,
            outbox,
        })
    }
}

async fn bus(nats: &NatsServer) -> anyhow::Result<EventBus> {
    let bus = EventBus::connect(nats.url(), "agora-test", StreamSettings::default()).await?;
    tokio::time::timeout(Duration::from_secs(10), bus.wait_ready()).await?;
    Ok(bus)
}

fn event(aggregate: &str, version: i64, name: &str) -> UserCreated {
    UserCreated {
        user_id: aggregate.to_owned(),
        email: format!("{aggregate}@example.com"),
        name: name.to_owned(),
        roles: Vec::new(),
        version,
    }
}

/// Records `event` in its own unit of work.
async fn record(outbox: &Outbox, event: &UserCreated) -> anyhow::Result<String> {
    let mut work = outbox.begin().await?;
    let id = work.record(event).await?;
    work.commit().await?;
    Ok(id)
}

/// Every message now in `stream`, in stream order, decoded.
async fn stream_contents(bus: &EventBus, stream: &str) -> anyhow::Result<Vec<UserCreated>> {
    let stream = bus.jetstream().get_stream(stream).await?;
    let mut events = Vec::new();
    let mut next = 1;
    loop {
        match stream.direct_get_next_for_subject(">", Some(next)).await {
            Ok(message) => {
                next = message.sequence + 1;
                events.push(prost::Message::decode(message.payload.clone())?);
            }
            Err(err)
                if err.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound =>
            {
                return Ok(events);
            }
            Err(err) => return Err(err.into()),
        }
    }
}

async fn unpublished(db: &Db) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM event_outbox WHERE published_at IS NULL")
            .fetch_one(db.pool())
            .await?,
    )
}

/// Applies every event by inserting a row; fails while `poison` is set for
/// events named "poison".
#[derive(Clone, Default)]
struct Recorder {
    poison: Arc<AtomicBool>,
}

impl EventHandler for Recorder {
    fn handle<'a>(
        &'a self,
        event: &'a Delivery,
        work: &'a mut UnitOfWork,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let created: UserCreated = event.decode()?;
            if created.name == "poison" && self.poison.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "poisoned on purpose",
                ));
            }
            sqlx::query(
                "INSERT INTO applied (consumer, event_id, aggregate_id, version) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind("recorder")
            .bind(&event.event_id)
            .bind(created.aggregate_id())
            .bind(created.aggregate_version())
            .execute(work.tx())
            .await?;
            Ok(())
        })
    }
}

/// (rows in `applied`, distinct event ids among them).
async fn applied(db: &Db) -> anyhow::Result<(i64, i64)> {
    let row = sqlx::query("SELECT COUNT(*) AS n, COUNT(DISTINCT event_id) AS d FROM applied")
        .fetch_one(db.pool())
        .await?;
    Ok((row.try_get("n")?, row.try_get("d")?))
}

async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    for _ in 0..300 {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting until {what}")
}

fn fast_retries() -> ConsumerSettings {
    ConsumerSettings {
        dead_letter_after: 3,
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        ack_wait: Duration::from_secs(1),
        ..ConsumerSettings::default()
    }
}

const SUBJECTS: &[&str] = &[UserCreated::SUBJECT];

async fn the_same_message_id_twice_is_stored_once(_backend: Backend) -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let bus = bus(&nats).await?;
    let payload = prost::Message::encode_to_vec(&event("a", 1, "x"));
    let mut duplicates = Vec::new();
    for _ in 0..2 {
        let ack = bus
            .jetstream()
            .send_publish(
                UserCreated::SUBJECT,
                PublishMessage::build()
                    .payload(payload.clone().into())
                    .message_id("same-id"),
            )
            .await?
            .await?;
        duplicates.push(ack.duplicate);
    }
    assert_eq!(duplicates, [false, true]);
    assert_eq!(stream_contents(&bus, "USERS").await?.len(), 1);
    Ok(())
}

async fn a_relay_killed_after_publishing_and_before_marking_publishes_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let Fixture {
        nats: _nats,
        database: _database,
        db,
        bus,
        outbox,
    } = Fixture::start(backend).await?;
    for version in 1..=3 {
        record(&outbox, &event("agg", version, "x")).await?;
    }
    let relay = OutboxRelay::new(outbox.clone(), bus.clone(), "test");
    // Published and acked, but the process "dies" before its commit.
    let pass = relay.publish_pending(Marking::SkipForFaultTest).await?;
    assert_eq!(pass.published, 3);
    assert_eq!(unpublished(&db).await?, 3);
    // The next relay publishes the same rows again: JetStream drops them.
    let pass = OutboxRelay::new(outbox, bus.clone(), "test")
        .publish_pending(Marking::Mark)
        .await?;
    assert_eq!(pass.published, 3);
    assert_eq!(unpublished(&db).await?, 0);
    let versions: Vec<i64> = stream_contents(&bus, "USERS")
        .await?
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    Ok(())
}

async fn a_consumer_killed_after_commit_and_before_ack_applies_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let Fixture {
        nats: _nats,
        database: _database,
        db,
        bus,
        outbox,
    } = Fixture::start(backend).await?;
    record(&outbox, &event("agg", 1, "x")).await?;
    OutboxRelay::new(outbox.clone(), bus.clone(), "test")
        .publish_pending(Marking::Mark)
        .await?;

    // The first consumer commits and "dies" before acking.
    let crashing = EventConsumer::new(
        "recorder",
        SUBJECTS,
        outbox.clone(),
        bus.clone(),
        Recorder::default(),
    )
    .with_settings(ConsumerSettings {
        crash_before_ack: true,
        ..fast_retries()
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(crashing.run(stop.clone()));
    wait_until("the first delivery is applied", || async {
        Ok(applied(&db).await?.0 == 1)
    })
    .await?;
    stop.cancel();
    task.await?;

    // Its replacement gets the event again after ack_wait, and skips it.
    let consumer = EventConsumer::new(
        "recorder",
        SUBJECTS,
        outbox,
        bus.clone(),
        Recorder::default(),
    )
    .with_settings(fast_retries());
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    let durable = bus
        .jetstream()
        .get_stream("USERS")
        .await?
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("recorder-users")
        .await
        .map_err(|err| anyhow::anyhow!(err))?;
    wait_until("the redelivery is acknowledged", || {
        let mut durable = durable.clone();
        async move {
            let info = durable.info().await?;
            Ok(info.num_ack_pending == 0
                && info.num_pending == 0
                && info.delivered.stream_sequence == 1
                && info.ack_floor.stream_sequence == 1)
        }
    })
    .await?;
    stop.cancel();
    task.await?;
    assert_eq!(applied(&db).await?, (1, 1), "applied exactly once");
    Ok(())
}

async fn a_poison_event_goes_to_the_dead_letters_and_replays(
    backend: Backend,
) -> anyhow::Result<()> {
    let Fixture {
        nats: _nats,
        database: _database,
        db,
        bus,
        outbox,
    } = Fixture::start(backend).await?;
    record(&outbox, &event("poisoned", 1, "poison")).await?;
    for i in 0..5 {
        record(&outbox, &event(&format!("good-{i}"), 1, "fine")).await?;
    }
    OutboxRelay::new(outbox.clone(), bus.clone(), "test")
        .publish_pending(Marking::Mark)
        .await?;

    let recorder = Recorder::default();
    recorder.poison.store(true, Ordering::SeqCst);
    let consumer = EventConsumer::new("recorder", SUBJECTS, outbox, bus.clone(), recorder.clone())
        .with_settings(fast_retries());
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));

    // The others flow past it; it lands in the dead-letter stream.
    wait_until("the good events are applied", || async {
        Ok(applied(&db).await?.0 == 5)
    })
    .await?;
    wait_until("the poison event is dead-lettered", || async {
        Ok(!dead_letters::list(&bus, 10).await?.is_empty())
    })
    .await?;
    let letters = dead_letters::list(&bus, 10).await?;
    let [letter] = letters.as_slice() else {
        anyhow::bail!("expected one dead letter, got {letters:?}");
    };
    assert_eq!(letter.subject, UserCreated::SUBJECT);
    assert_eq!(letter.event_type, UserCreated::TYPE);
    assert_eq!(letter.deliveries, "3");
    assert_eq!(letter.origin, "USERS#1");
    assert!(
        letter.reason.contains("poisoned on purpose"),
        "{}",
        letter.reason
    );
    assert_eq!(applied(&db).await?.0, 5);

    // Fixed: replaying delivers it again, and it is gone from the dead letters.
    recorder.poison.store(false, Ordering::SeqCst);
    dead_letters::replay(&bus, letter).await?;
    wait_until("the replayed event is applied", || async {
        Ok(applied(&db).await?.0 == 6)
    })
    .await?;
    assert!(dead_letters::list(&bus, 10).await?.is_empty());
    let dlq = bus.jetstream().get_stream(DEAD_LETTERS.name).await?;
    assert_eq!(dlq.cached_info().state.messages, 0);
    stop.cancel();
    task.await?;
    assert_eq!(applied(&db).await?, (6, 6));
    Ok(())
}

async fn a_deleted_consumer_is_recreated(backend: Backend) -> anyhow::Result<()> {
    let Fixture {
        nats: _nats,
        database: _database,
        db,
        bus,
        outbox,
    } = Fixture::start(backend).await?;
    let relay = OutboxRelay::new(outbox.clone(), bus.clone(), "test");
    record(&outbox, &event("a", 1, "x")).await?;
    relay.publish_pending(Marking::Mark).await?;
    let consumer = EventConsumer::new(
        "recorder",
        SUBJECTS,
        outbox.clone(),
        bus.clone(),
        Recorder::default(),
    )
    .with_settings(fast_retries());
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    wait_until("the first event is applied", || async {
        Ok(applied(&db).await?.0 == 1)
    })
    .await?;

    bus.jetstream()
        .get_stream("USERS")
        .await?
        .delete_consumer("recorder-users")
        .await?;
    record(&outbox, &event("b", 1, "x")).await?;
    relay.publish_pending(Marking::Mark).await?;
    // The recreated durable starts from the beginning: the inbox skips the
    // first event, the second is applied.
    wait_until("the event after the deletion is applied", || async {
        Ok(applied(&db).await?.0 == 2)
    })
    .await?;
    stop.cancel();
    task.await?;
    assert_eq!(applied(&db).await?, (2, 2));
    Ok(())
}

async fn nothing_is_lost_or_applied_twice_when_nats_is_killed_under_load(
    backend: Backend,
) -> anyhow::Result<()> {
    const EVENTS: i64 = 300;
    let Fixture {
        mut nats,
        database: _database,
        db,
        bus,
        outbox,
    } = Fixture::start(backend).await?;
    let stop = CancellationToken::new();
    let relay = OutboxRelay::new(outbox.clone(), bus.clone(), "test");
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let consumer = EventConsumer::new(
        "recorder",
        SUBJECTS,
        outbox.clone(),
        bus.clone(),
        Recorder::default(),
    )
    .with_settings(fast_retries());
    let consumer_task = tokio::spawn(consumer.run(stop.clone()));

    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for i in 0..EVENTS {
                record(&outbox, &event(&format!("agg-{}", i % 7), i, "x")).await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        })
    };
    wait_until("some events are applied", || async {
        Ok(applied(&db).await?.0 >= 30)
    })
    .await?;
    nats.kill().await?;
    // Writes keep committing while the broker is down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.restart().await?;
    writer.await??;
    wait_until("every event is applied", || async {
        Ok(applied(&db).await?.1 == EVENTS)
    })
    .await?;
    // Give a late duplicate delivery the chance to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    relay_task.await?;
    consumer_task.await?;
    assert_eq!(
        applied(&db).await?,
        (EVENTS, EVENTS),
        "each event applied exactly once"
    );
    assert_eq!(unpublished(&db).await?, 0);
    let mut ids: Vec<String> = sqlx::query("SELECT event_id FROM event_outbox")
        .fetch_all(db.pool())
        .await?
        .iter()
        .map(|row| row.try_get("event_id"))
        .collect::<std::result::Result<_, _>>()?;
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as i64, EVENTS);
    assert_eq!(
        stream_contents(&bus, "USERS").await?.len() as i64,
        EVENTS,
        "one copy each in the stream"
    );
    Ok(())
}

backend_tests!(
    the_same_message_id_twice_is_stored_once,
    a_relay_killed_after_publishing_and_before_marking_publishes_once,
    a_consumer_killed_after_commit_and_before_ack_applies_once,
    a_poison_event_goes_to_the_dead_letters_and_replays,
    a_deleted_consumer_is_recreated,
    nothing_is_lost_or_applied_twice_when_nats_is_killed_under_load,
);

/// PostgreSQL only: on SQLite a writer holds the one write lock from its
/// first statement, so a later transaction cannot commit first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_transaction_commits_late_is_still_published() -> anyhow::Result<()> {
    let Fixture {
        nats: _nats,
        database: _database,
        db,
        bus,
        outbox,
    } = Fixture::start(Backend::Postgres).await?;
    assert_eq!(db.backend(), DbBackend::Postgres);
    let relay = OutboxRelay::new(outbox.clone(), bus.clone(), "test");

    // A takes the lower id, B the higher; B commits first and is published.
    let mut a = outbox.begin().await?;
    a.record(&event("a", 1, "x")).await?;
    record(&outbox, &event("b", 1, "x")).await?;
    assert_eq!(relay.publish_pending(Marking::Mark).await?.published, 1);
    // Then A commits: a cursor past B's id would skip it for ever.
    a.commit().await?;
    assert_eq!(relay.publish_pending(Marking::Mark).await?.published, 1);
    let mut published: Vec<String> = stream_contents(&bus, "USERS")
        .await?
        .into_iter()
        .map(|e| e.user_id)
        .collect();
    published.sort();
    assert_eq!(published, ["a", "b"]);
    Ok(())
}

/// PostgreSQL only: several replicas of a service share its database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_database_publish_everything_in_order_per_aggregate() -> anyhow::Result<()>
{
    const AGGREGATES: i64 = 5;
    const VERSIONS: i64 = 40;
    let Fixture {
        nats,
        database,
        db,
        bus,
        outbox,
    } = Fixture::start(Backend::Postgres).await?;
    // The second replica: its own pool, its own NATS connection.
    let other_db = Db::connect(&Secret::new(database.url().to_owned())).await?;
    let other_bus = self::bus(&nats).await?;

    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for (db, bus) in [(db.clone(), bus.clone()), (other_db, other_bus)] {
        let relay = OutboxRelay::new(Outbox::new(db), bus, "test");
        relays.push(tokio::spawn(relay.run(stop.clone())));
    }
    let mut writers = Vec::new();
    for aggregate in 0..AGGREGATES {
        let outbox = outbox.clone();
        writers.push(tokio::spawn(async move {
            for version in 1..=VERSIONS {
                record(&outbox, &event(&format!("agg-{aggregate}"), version, "x")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    wait_until("everything is published", || async {
        Ok(unpublished(&db).await? == 0)
    })
    .await?;
    stop.cancel();
    for relay in relays {
        relay.await?;
    }
    let events = stream_contents(&bus, "USERS").await?;
    assert_eq!(
        events.len() as i64,
        AGGREGATES * VERSIONS,
        "each event once"
    );
    for aggregate in 0..AGGREGATES {
        let name = format!("agg-{aggregate}");
        let versions: Vec<i64> = events
            .iter()
            .filter(|e| e.user_id == name)
            .map(|e| e.version)
            .collect();
        assert_eq!(
            versions,
            (1..=VERSIONS).collect::<Vec<_>>(),
            "{name} in order"
        );
    }
    Ok(())
}
