//! Domain events throughput and latency against private nats-servers and real
//! PostgreSQL and SQLite, all in one run (the machine is shared and noisy:
//! compare the ratios within a run, not absolute numbers across runs).
//!
//! Measured, each repetition interleaving every measurement:
//! - raw JetStream publish: batches of the relay's batch size sent with
//!   `send_publish` (the acks collected), then every ack awaited, as the
//!   relay pipelines a batch of distinct aggregates; real `UserCreated`
//!   payloads with the relay's headers and unique message ids;
//! - the whole pipeline: an outbox pre-filled with the events (many
//!   aggregates), then an [`OutboxRelay`] and an [`EventConsumer`] (whose
//!   handler inserts a row in its unit of work) started together, timed
//!   until the consumer has applied (committed) every event; then, to see
//!   where the time goes, a second consumer alone over the full stream, and
//!   the consumer's database transactions alone (no NATS);
//! - end-to-end latency at light load: one event committed every 20 ms with
//!   relay and consumer running, from just after the commit to just after
//!   the consumer's commit.
//!
//! On a nats-server with `sync_interval: always` (what the tests and
//! production use) and, for comparison, on one with the default fsync
//! policy. `just bench events` runs it (release build) and prints a Markdown
//! table for BENCHMARKS.md. `AGORA_BENCH_EVENTS` sets the events per
//! throughput measurement. Under `cargo test` (no `--bench` argument) it runs
//! as a quick smoke test with a few hundred events, so the benchmark cannot
//! rot unnoticed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_platform::config::Secret;
use agora_platform::db::Db;
use agora_platform::time::{micros_to_rfc3339, now_micros};
use agora_platform_events::envelope::header;
use agora_platform_events::relay::RelaySettings;
use agora_platform_events::streams::ensure_streams;
use agora_platform_events::{
    Delivery, DomainEvent, EventBus, EventConsumer, EventHandler, Outbox, OutboxRelay,
    StreamSettings, UnitOfWork,
};
use agora_proto::users::v1::UserCreated;
use agora_testkit::{Backend, NatsServer, TestDatabase};
use anyhow::{Context as _, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use futures::future::BoxFuture;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

const SUBJECTS: &[&str] = &[UserCreated::SUBJECT];

/// Distinct aggregates the pre-filled outbox cycles through: more than a
/// batch, so that every batch is pipelined across aggregates.
const AGGREGATES: usize = 1000;

/// How much to measure.
struct Plan {
    /// Events per throughput measurement.
    events: usize,
    /// Events per latency measurement.
    latency_events: usize,
    /// Gap between two events of the latency measurement.
    latency_gap: Duration,
    /// Repetitions of everything; the table gives medians.
    repetitions: usize,
}

fn event(i: usize) -> UserCreated {
    let aggregate = format!("user-{:04}", i % AGGREGATES);
    UserCreated {
        email: format!("{aggregate}@example.com"),
        user_id: aggregate,
        name: format!("Bench user {i}"),
        roles: vec!["customer".to_owned()],
        version: i64::try_from(i / AGGREGATES + 1).unwrap_or(i64::MAX),
    }
}

/// The message the relay would publish for `event`.
fn message(event: &UserCreated) -> PublishMessage {
    let id = uuid::Uuid::now_v7().to_string();
    let mut headers = HeaderMap::new();
    headers.insert(header::CE_SPECVERSION, "1.0");
    headers.insert(header::CE_ID, id.as_str());
    headers.insert(header::CE_TYPE, UserCreated::TYPE);
    headers.insert(header::CE_SOURCE, "bench");
    headers.insert(header::CE_TIME, micros_to_rfc3339(now_micros()).as_str());
    headers.insert(header::AGGREGATE_ID, event.user_id.as_str());
    headers.insert(
        header::AGGREGATE_VERSION,
        event.version.to_string().as_str(),
    );
    PublishMessage::build()
        .payload(prost::Message::encode_to_vec(event).into())
        .headers(headers)
        .message_id(id)
}

async fn connect(nats: &NatsServer) -> anyhow::Result<EventBus> {
    let bus = EventBus::connect(nats.url(), "agora-bench", StreamSettings::default()).await?;
    tokio::time::timeout(Duration::from_secs(10), bus.wait_ready())
        .await
        .context("the JetStream streams are not ready")?;
    Ok(bus)
}

/// Starts every measurement from an empty USERS stream (and no consumer on
/// it): the stream is deleted and created again.
async fn reset_streams(bus: &EventBus) -> anyhow::Result<()> {
    bus.jetstream().delete_stream("USERS").await?;
    ensure_streams(bus.jetstream(), &StreamSettings::default())
        .await
        .map_err(|err| anyhow::anyhow!(err))
}

/// Events per second of raw pipelined publishing.
async fn raw_publish(bus: &EventBus, events: usize) -> anyhow::Result<f64> {
    reset_streams(bus).await?;
    let batch = usize::try_from(RelaySettings::default().batch_size)?.max(1);
    let started = Instant::now();
    let mut sent = 0;
    while sent < events {
        let n = batch.min(events - sent);
        let mut acks = Vec::with_capacity(n);
        for i in sent..sent + n {
            let ack = bus
                .jetstream()
                .send_publish(UserCreated::SUBJECT, message(&event(i)))
                .await?;
            acks.push(std::future::IntoFuture::into_future(ack));
        }
        for ack in futures::future::try_join_all(acks).await? {
            if ack.duplicate {
                bail!("a unique message id was taken for a duplicate");
            }
        }
        sent += n;
    }
    let elapsed = started.elapsed();
    let stored = bus
        .jetstream()
        .get_stream("USERS")
        .await?
        .info()
        .await?
        .state
        .messages;
    if usize::try_from(stored)? != events {
        bail!("{stored} messages in the stream, {events} published");
    }
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// A database with the events tables and the handler's table.
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

/// Applies every event by inserting a row (like the tests' recorder), and
/// notes when each event's transaction has committed.
#[derive(Clone)]
struct Recorder {
    /// The consumer's name, also written in its rows.
    consumer: &'static str,
    /// When each event's handler ran (delivered, inbox row written).
    handled: Arc<Mutex<HashMap<String, Instant>>>,
    /// When each event's transaction had committed.
    committed: Arc<Mutex<HashMap<String, Instant>>>,
    count: Arc<AtomicUsize>,
}

impl Recorder {
    fn new(consumer: &'static str) -> Self {
        Self {
            consumer,
            handled: Arc::default(),
            committed: Arc::default(),
            count: Arc::default(),
        }
    }

    /// An [`EventConsumer`] applying with this recorder.
    fn consumer(&self, outbox: &Outbox, bus: &EventBus) -> EventConsumer {
        EventConsumer::new(
            self.consumer,
            SUBJECTS,
            outbox.clone(),
            bus.clone(),
            self.clone(),
        )
    }

    fn applied(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn committed_at(&self, event_id: &str) -> Option<Instant> {
        self.committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(event_id)
            .copied()
    }

    fn handled_at(&self, event_id: &str) -> Option<Instant> {
        self.handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(event_id)
            .copied()
    }

    /// Waits until `n` events are applied.
    async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.applied() < n {
            if Instant::now() > deadline {
                bail!("{} of {n} events applied after {timeout:?}", self.applied());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

impl EventHandler for Recorder {
    fn handle<'a>(
        &'a self,
        event: &'a Delivery,
        work: &'a mut UnitOfWork,
    ) -> BoxFuture<'a, agora_platform::error::Result<()>> {
        let now = Instant::now();
        self.handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(event.event_id.clone())
            .or_insert(now);
        Box::pin(async move {
            let created: UserCreated = event.decode()?;
            sqlx::query(
                "INSERT INTO applied (consumer, event_id, aggregate_id, version) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(self.consumer)
            .bind(&event.event_id)
            .bind(created.aggregate_id())
            .bind(created.aggregate_version())
            .execute(work.tx())
            .await?;
            Ok(())
        })
    }

    /// Runs after the consumer's commit (and before its ack).
    fn after_commit<'a>(
        &'a self,
        event: &'a Delivery,
    ) -> BoxFuture<'a, agora_platform::error::Result<()>> {
        let now = Instant::now();
        Box::pin(async move {
            let mut committed = self
                .committed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !committed.contains_key(&event.event_id) {
                committed.insert(event.event_id.clone(), now);
                self.count.fetch_add(1, Ordering::AcqRel);
            }
            Ok(())
        })
    }
}

/// A relay and a consumer running on `outbox`, until stopped.
struct Running {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(outbox: &Outbox, bus: &EventBus, recorder: &Recorder) -> (Self, OutboxRelay) {
        let stop = CancellationToken::new();
        let relay = OutboxRelay::new(outbox.clone(), bus.clone(), "bench");
        let tasks = vec![
            tokio::spawn(relay.clone().run(stop.clone())),
            tokio::spawn(recorder.consumer(outbox, bus).run(stop.clone())),
        ];
        (Self { stop, tasks }, relay)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for task in self.tasks {
            task.await?;
        }
        Ok(())
    }
}

/// Checks the database holds each of `n` events applied once by `consumer`.
async fn check_applied(db: &Db, consumer: &str, n: usize) -> anyhow::Result<()> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT event_id) AS d FROM applied WHERE consumer = $1",
    )
    .bind(consumer)
    .fetch_one(db.pool())
    .await?;
    let (rows, distinct): (i64, i64) = (row.try_get("n")?, row.try_get("d")?);
    let n = i64::try_from(n)?;
    if rows != n || distinct != n {
        bail!("{rows} rows applied ({distinct} distinct events), expected {n}");
    }
    Ok(())
}

/// One run of the whole pipeline.
struct Pipeline {
    /// Events per second until the consumer had applied them all.
    applied: f64,
    /// Events per second until the relay had published them all.
    published: f64,
    /// Events per second of a second consumer alone, the stream full.
    consumer_alone: f64,
    /// The consumer's database transactions per second, without NATS (0
    /// when not measured).
    transactions_alone: f64,
}

/// Also measures the consumer's transactions alone when `transactions` (they
/// do not depend on the nats-server).
async fn pipeline(
    bus: &EventBus,
    backend: Backend,
    events: usize,
    transactions: bool,
) -> anyhow::Result<Pipeline> {
    reset_streams(bus).await?;
    let (database, db) = self::database(backend).await?;
    let outbox = Outbox::new(db.clone());
    // Pre-fill in a few large transactions: the writes are not measured.
    for chunk in (0..events).collect::<Vec<_>>().chunks(500) {
        let mut work = outbox.begin().await?;
        for &i in chunk {
            work.record(&event(i)).await?;
        }
        work.commit().await?;
    }
    let recorder = Recorder::new("bench");
    let timeout = Duration::from_secs(60) + Duration::from_millis(20) * u32::try_from(events)?;
    let started = Instant::now();
    let (running, relay) = Running::start(&outbox, bus, &recorder);
    let metrics = relay.metrics();
    let mut published_after = None;
    while recorder.applied() < events {
        if published_after.is_none()
            && usize::try_from(metrics.published.load(Ordering::Relaxed))? >= events
        {
            published_after = Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "{} of {events} events applied after {timeout:?}",
                recorder.applied()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let applied_after = started.elapsed();
    let published_after = published_after.unwrap_or(applied_after);
    running.stop().await?;
    check_applied(&db, recorder.consumer, events).await?;

    // Where the time goes: another consumer alone, every event in the stream.
    let drain = Recorder::new("bench-drain");
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(drain.consumer(&outbox, bus).run(stop.clone()));
    drain.wait_for(events, timeout).await?;
    let drained_after = started.elapsed();
    stop.cancel();
    task.await?;
    check_applied(&db, drain.consumer, events).await?;

    // And the consumer's transactions alone, without NATS: inbox row, the
    // handler's row, commit, one event at a time.
    let started = Instant::now();
    let transactions = if transactions { events } else { 0 };
    for i in 0..transactions {
        let event_id = uuid::Uuid::now_v7().to_string();
        let mut work = outbox.begin().await?;
        sqlx::query(
            "INSERT INTO event_inbox (consumer, event_id, subject, received_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, event_id) DO NOTHING",
        )
        .bind("bench-db")
        .bind(&event_id)
        .bind(UserCreated::SUBJECT)
        .bind(now_micros())
        .execute(work.tx())
        .await?;
        let created = event(i);
        sqlx::query(
            "INSERT INTO applied (consumer, event_id, aggregate_id, version) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind("bench-db")
        .bind(&event_id)
        .bind(created.aggregate_id())
        .bind(created.aggregate_version())
        .execute(work.tx())
        .await?;
        work.commit().await?;
    }
    let transactions_after = started.elapsed();
    check_applied(&db, "bench-db", transactions).await?;
    db.close().await;
    drop(database);
    Ok(Pipeline {
        applied: events as f64 / applied_after.as_secs_f64(),
        published: events as f64 / published_after.as_secs_f64(),
        consumer_alone: events as f64 / drained_after.as_secs_f64(),
        transactions_alone: transactions as f64 / transactions_after.as_secs_f64(),
    })
}

/// Latencies in milliseconds, sorted.
struct Samples(Vec<f64>);

impl Samples {
    fn percentile(&self, p: f64) -> f64 {
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0.get(index).copied().unwrap_or(f64::NAN)
    }
}

async fn latency(bus: &EventBus, backend: Backend, plan: &Plan) -> anyhow::Result<Samples> {
    reset_streams(bus).await?;
    let (database, db) = self::database(backend).await?;
    let outbox = Outbox::new(db.clone());
    let recorder = Recorder::new("bench");
    let (running, _relay) = Running::start(&outbox, bus, &recorder);
    let record = |i: usize| {
        let outbox = outbox.clone();
        async move {
            let mut work = outbox.begin().await?;
            let id = work.record(&event(i)).await?;
            work.commit().await?;
            anyhow::Ok((id, Instant::now()))
        }
    };
    // Warm up: the consumer is created, connections and statements cached.
    const WARM_UP: usize = 5;
    for i in 0..WARM_UP {
        record(i).await?;
    }
    recorder.wait_for(WARM_UP, Duration::from_secs(30)).await?;

    let mut commits = Vec::with_capacity(plan.latency_events);
    let mut tick = tokio::time::interval(plan.latency_gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..plan.latency_events {
        tick.tick().await;
        commits.push(record(WARM_UP + i).await?);
    }
    recorder
        .wait_for(WARM_UP + plan.latency_events, Duration::from_secs(30))
        .await?;
    running.stop().await?;
    check_applied(&db, recorder.consumer, WARM_UP + plan.latency_events).await?;
    db.close().await;
    drop(database);
    // (total, to the handler, the handler's insert and commit) in ms.
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut split = commits
        .iter()
        .map(|(id, committed)| {
            let applied = recorder
                .committed_at(id)
                .with_context(|| format!("event {id} was not applied"))?;
            let handled = recorder.handled_at(id).unwrap_or(applied);
            Ok((
                ms(applied.saturating_duration_since(*committed)),
                ms(handled.saturating_duration_since(*committed)),
                ms(applied.saturating_duration_since(handled)),
            ))
        })
        .collect::<anyhow::Result<Vec<(f64, f64, f64)>>>()?;
    split.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slowest: Vec<String> = split
        .iter()
        .take(3)
        .map(|(total, delivered, applied)| {
            format!(
                "{total:.1} ms ({delivered:.1} to the handler + {applied:.1} insert and commit)"
            )
        })
        .collect();
    eprintln!("  latency {backend:?}: slowest {}", slowest.join(", "));
    let mut samples: Vec<f64> = split.iter().map(|s| s.0).collect();
    samples.sort_by(f64::total_cmp);
    Ok(Samples(samples))
}

/// The repetitions of one measurement.
#[derive(Default)]
struct Runs(Vec<f64>);

impl Runs {
    fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn list(&self, decimals: usize) -> String {
        self.0
            .iter()
            .map(|v| format!("{v:.decimals$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

/// The repetitions of [`pipeline`] on one backend and server.
#[derive(Default)]
struct PipelineRuns {
    applied: Runs,
    published: Runs,
    consumer_alone: Runs,
    transactions_alone: Runs,
}

impl PipelineRuns {
    fn push(&mut self, run: &Pipeline) {
        self.applied.0.push(run.applied);
        self.published.0.push(run.published);
        self.consumer_alone.0.push(run.consumer_alone);
        if run.transactions_alone > 0.0 {
            self.transactions_alone.0.push(run.transactions_alone);
        }
    }
}

/// The repetitions of [`latency`] on one backend, in ms.
#[derive(Default)]
struct LatencyRuns {
    p50: Runs,
    p99: Runs,
    max: Runs,
}

impl LatencyRuns {
    fn push(&mut self, samples: &Samples) {
        self.p50.0.push(samples.percentile(0.5));
        self.p99.0.push(samples.percentile(0.99));
        self.max.0.push(samples.percentile(1.0));
    }
}

#[derive(Default)]
struct Results {
    raw_always: Runs,
    raw_default: Runs,
    pg_always: PipelineRuns,
    sqlite_always: PipelineRuns,
    pg_default: PipelineRuns,
    sqlite_default: PipelineRuns,
    pg_latency: LatencyRuns,
    sqlite_latency: LatencyRuns,
}

async fn measure(plan: &Plan) -> anyhow::Result<Results> {
    let always = NatsServer::start().await?;
    let default_sync = NatsServer::start_with_default_sync().await?;
    let always_bus = connect(&always).await?;
    let default_bus = connect(&default_sync).await?;
    // Warm up both servers, the clients and the allocator.
    raw_publish(&always_bus, plan.events / 10 + 1).await?;
    raw_publish(&default_bus, plan.events / 10 + 1).await?;

    // Every measurement once per repetition, interleaved, so that a noisy
    // spell of the machine hits one run of each rather than all runs of one.
    let mut results = Results::default();
    for repetition in 1..=plan.repetitions {
        let started = Instant::now();
        results
            .raw_always
            .0
            .push(raw_publish(&always_bus, plan.events).await?);
        results
            .raw_default
            .0
            .push(raw_publish(&default_bus, plan.events).await?);
        for (bus, backend, runs, transactions) in [
            (&always_bus, Backend::Postgres, &mut results.pg_always, true),
            (
                &always_bus,
                Backend::Sqlite,
                &mut results.sqlite_always,
                true,
            ),
            (
                &default_bus,
                Backend::Postgres,
                &mut results.pg_default,
                false,
            ),
            (
                &default_bus,
                Backend::Sqlite,
                &mut results.sqlite_default,
                false,
            ),
        ] {
            runs.push(&pipeline(bus, backend, plan.events, transactions).await?);
        }
        for (backend, runs) in [
            (Backend::Postgres, &mut results.pg_latency),
            (Backend::Sqlite, &mut results.sqlite_latency),
        ] {
            runs.push(&latency(&always_bus, backend, plan).await?);
        }
        eprintln!(
            "repetition {repetition} of {} done in {:.1?}",
            plan.repetitions,
            started.elapsed()
        );
    }
    Ok(results)
}

fn print(plan: &Plan, results: &Results) {
    const ALWAYS: &str = "`sync_interval: always`";
    const DEFAULT: &str = "default";
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let raw_always = results.raw_always.median();
    let raw_default = results.raw_default.median();
    println!(
        "{} events per throughput run ({AGGREGATES} aggregates), latency over {} events one \
         every {} ms; medians of {} repetitions (runs listed in order). {cores} cores, shared \
         with nats-server and PostgreSQL; on a shared, noisy VM compare ratios within a run.",
        plan.events,
        plan.latency_events,
        plan.latency_gap.as_millis(),
        plan.repetitions,
    );
    println!();
    println!(
        "| throughput | nats-server fsync | events/s (median) | runs | / raw publish, same server |"
    );
    println!("|---|---|---:|---|---:|");
    let pipelines = [
        ("PostgreSQL", ALWAYS, &results.pg_always, raw_always),
        ("SQLite", ALWAYS, &results.sqlite_always, raw_always),
        ("PostgreSQL", DEFAULT, &results.pg_default, raw_default),
        ("SQLite", DEFAULT, &results.sqlite_default, raw_default),
    ];
    for (fsync, raw, runs) in [
        (ALWAYS, raw_always, &results.raw_always),
        (DEFAULT, raw_default, &results.raw_default),
    ] {
        println!(
            "| raw JetStream publish, batches of {} (the relay's) | {fsync} | {raw:.0} | {} | 1.00 |",
            agora_platform_events::RelaySettings::default().batch_size,
            runs.list(0)
        );
        for (backend, _, runs, raw) in pipelines.iter().filter(|p| p.1 == fsync) {
            println!(
                "| outbox -> JetStream -> consumer, {backend} | {fsync} | {:.0} | {} | {:.2} |",
                runs.applied.median(),
                runs.applied.list(0),
                runs.applied.median() / raw,
            );
        }
    }
    println!();
    println!(
        "| where the time goes (events/s, medians) | nats-server fsync | whole pipeline | \
         relay, running with the consumer | consumer alone, stream full | \
         its transactions alone, no NATS |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (backend, fsync, runs, _) in pipelines {
        let transactions = if runs.transactions_alone.0.is_empty() {
            "(as above)".to_owned()
        } else {
            format!("{:.0}", runs.transactions_alone.median())
        };
        println!(
            "| {backend} | {fsync} | {:.0} | {:.0} | {:.0} | {transactions} |",
            runs.applied.median(),
            runs.published.median(),
            runs.consumer_alone.median(),
        );
    }
    println!();
    println!(
        "| latency, commit to the consumer's commit, 1 event / {} ms, {ALWAYS} | p50 | p99 | max | p50 runs | p99 runs |",
        plan.latency_gap.as_millis()
    );
    println!("|---|---:|---:|---:|---|---|");
    for (backend, runs) in [
        ("PostgreSQL", &results.pg_latency),
        ("SQLite", &results.sqlite_latency),
    ] {
        println!(
            "| {backend} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} |",
            runs.p50.median(),
            runs.p99.median(),
            runs.max.median(),
            runs.p50.list(1),
            runs.p99.list(1),
        );
    }
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for (backend, runs, latency) in [
        ("PostgreSQL", &results.pg_always, &results.pg_latency),
        ("SQLite", &results.sqlite_always, &results.sqlite_latency),
    ] {
        let ratio = runs.applied.median() / raw_always;
        let p99 = latency.p99.median();
        println!(
            "- {backend}: pipeline {ratio:.2}x raw publish with {ALWAYS} (target >= 0.5x: {}); \
             p99 {p99:.1} ms (target <= 50 ms: {})",
            verdict(ratio >= 0.5),
            verdict(p99 <= 50.0),
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let plan = if benchmarking {
        Plan {
            events: std::env::var("AGORA_BENCH_EVENTS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(4000),
            latency_events: 200,
            latency_gap: Duration::from_millis(20),
            repetitions: 3,
        }
    } else {
        Plan {
            events: 300,
            latency_events: 10,
            latency_gap: Duration::from_millis(20),
            repetitions: 1,
        }
    };
    eprintln!(
        "measuring events: {} per throughput run, {} for latency, {} repetitions ...",
        plan.events, plan.latency_events, plan.repetitions
    );
    let started = Instant::now();
    let results = measure(&plan).await?;
    print(&plan, &results);
    eprintln!("done in {:.1?}", started.elapsed());
    Ok(())
}
