//! [`OutboxRelay`]: publishes the outbox's rows to JetStream and marks them.
//!
//! One pass: claim the relay lease (PostgreSQL: a transaction-scoped advisory
//! lock, so of several replicas one publishes at a time and per-aggregate
//! order holds; SQLite has one writer process), read the oldest unpublished
//! rows (`published_at IS NULL`, never an `id > cursor` scan that would skip
//! a row whose transaction took a lower id but committed later), publish them
//! (in order per aggregate, pipelined across aggregates), await every ack (a
//! duplicate ack is success: the first publish got through), then mark them.
//! A relay that dies between the acks and the mark publishes the same rows
//! again with the same `Nats-Msg-Id`, and JetStream drops the copies.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use agora_platform::db::Backend;
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::time::{micros_to_rfc3339, now_micros};
use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage as Publish;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::backoff::Backoff;
use crate::bus::EventBus;
use crate::envelope::header;
use crate::outbox::Outbox;
use crate::streams::stream_of_subject;

/// How the relay paces itself.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// Rows per pass; a full pass is followed by another at once.
    pub batch_size: i64,
    /// How often to look for rows without a wake-up signal (rows written by
    /// another replica, or a signal lost in a crash).
    pub poll_interval: Duration,
    /// The longest wait between retries while NATS is down. Must stay well
    /// under the streams' duplicate window, so that a retried publish of a
    /// row whose first ack was lost is still recognised as a duplicate.
    pub max_backoff: Duration,
    /// How long published rows are kept (for inspection) before pruning.
    pub retention: Duration,
    /// How often the backlog is measured (and exported as metrics).
    pub lag_interval: Duration,
    /// How often a backlog is logged while there is one.
    pub lag_log_interval: Duration,
    /// How often published rows past the retention are pruned.
    pub prune_interval: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 256,
            poll_interval: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 3600),
            lag_interval: Duration::from_secs(1),
            lag_log_interval: Duration::from_secs(10),
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// What the relay has done and how far behind it is, for logs, health and
/// metrics. Shared with whoever holds [`OutboxRelay::metrics`].
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Unpublished rows at the last measurement.
    pub backlog: AtomicI64,
    /// Age in milliseconds of the oldest unpublished row at the last
    /// measurement; 0 when there is none.
    pub oldest_unpublished_ms: AtomicI64,
    /// Events published (acked by JetStream) since start.
    pub published: AtomicU64,
    /// Publish attempts that failed since start.
    pub failures: AtomicU64,
}

/// Whether a pass marks what it published. Only fault tests skip it: it is
/// what a relay that dies between the acks and its commit leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marking {
    /// Mark published rows (always, in production).
    Mark,
    /// Publish and leave the rows unpublished.
    SkipForFaultTest,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Rows published and acked.
    pub published: usize,
    /// Rows whose publish failed (they stay for the next pass).
    pub failed: usize,
    /// Whether the batch was full (more rows are probably waiting).
    pub full: bool,
}

/// Publishes a service's outbox to JetStream.
#[derive(Clone)]
pub struct OutboxRelay {
    outbox: Outbox,
    bus: EventBus,
    /// `ce-source` of every event: the publishing service.
    source: &'static str,
    settings: RelaySettings,
    metrics: Arc<RelayMetrics>,
}

/// The longest the last pass at shutdown may take.
const FINAL_PASS_TIMEOUT: Duration = Duration::from_secs(5);

/// Key of the PostgreSQL advisory lock that makes one relay per database
/// the publisher at a time ("agora-ob" in ASCII).
const LEASE_KEY: i64 = 0x6167_6f72_612d_6f62;

struct OutboxRow {
    id: i64,
    event_id: String,
    subject: String,
    event_type: String,
    aggregate_id: String,
    aggregate_version: i64,
    payload: Vec<u8>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    occurred_at: i64,
}

impl OutboxRow {
    fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            event_id: row.try_get("event_id")?,
            subject: row.try_get("subject")?,
            event_type: row.try_get("event_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            aggregate_version: row.try_get("aggregate_version")?,
            payload: row.try_get("payload")?,
            traceparent: row.try_get("traceparent")?,
            tracestate: row.try_get("tracestate")?,
            occurred_at: row.try_get("occurred_at")?,
        })
    }
}

impl OutboxRelay {
    /// A relay for `outbox`, publishing through `bus` as `source`.
    pub fn new(outbox: Outbox, bus: EventBus, source: &'static str) -> Self {
        Self {
            outbox,
            bus,
            source,
            settings: RelaySettings::default(),
            metrics: Arc::default(),
        }
    }

    /// Replaces the pacing settings.
    pub fn with_settings(mut self, settings: RelaySettings) -> Self {
        self.settings = settings;
        self
    }

    /// Counters and lag, updated as the relay runs.
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Publishes until `stop` is cancelled: at once when a commit signals
    /// new rows, every poll interval otherwise, with a growing backoff while
    /// NATS is unreachable.
    pub async fn run(self, stop: CancellationToken) {
        let committed = self.outbox.committed_signal();
        // Grows while passes fail (NATS down, or JetStream refusing rows: a
        // full stream, a cluster without quorum) and resets on a clean pass.
        let mut backoff = Backoff::new(Duration::from_millis(100), self.settings.max_backoff);
        // The callbacks read `self.metrics` until the meter provider shuts
        // down (at process exit).
        self.register_metrics();
        // Housekeeping runs on its own clock, however busy the relay is.
        let housekeeping = {
            let relay = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(relay.settings.lag_interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let (mut last_log, mut last_prune) =
                    (None::<tokio::time::Instant>, None::<tokio::time::Instant>);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = stop.cancelled() => return,
                    }
                    let due = |last: Option<tokio::time::Instant>, every: Duration| {
                        last.is_none_or(|at| at.elapsed() >= every)
                    };
                    let log = due(last_log, relay.settings.lag_log_interval);
                    if relay.measure_lag(log).await && log {
                        last_log = Some(tokio::time::Instant::now());
                    }
                    if due(last_prune, relay.settings.prune_interval) {
                        last_prune = Some(tokio::time::Instant::now());
                        if let Err(err) = relay.prune().await {
                            tracing::warn!(error = %err, "cannot prune the outbox");
                        }
                    }
                }
            })
        };
        tracing::info!(source = self.source, "outbox relay started");
        while !stop.is_cancelled() {
            let failure = match self.publish_pending(Marking::Mark).await {
                // Progress, even if some rows failed (one too large, say):
                // the others must not wait behind a backoff.
                Ok(pass) if pass.failed == 0 || pass.published > 0 => {
                    if backoff.is_failing() {
                        tracing::info!(source = self.source, "outbox relay publishing again");
                    }
                    backoff.reset();
                    if pass.full {
                        continue;
                    }
                    None
                }
                Ok(pass) => Some(format!(
                    "{} of {} events refused by JetStream",
                    pass.failed,
                    pass.failed + pass.published
                )),
                Err(err) => Some(err.to_string()),
            };
            let wait = failure.map(|reason| {
                // An outage is logged when it starts, not at every retry.
                let first = !backoff.is_failing();
                let wait = backoff.next_delay();
                if first {
                    tracing::warn!(
                        source = self.source,
                        reason,
                        "outbox relay cannot publish now; events wait in the outbox"
                    );
                } else {
                    tracing::debug!(source = self.source, reason, retry_in = ?wait, "outbox relay still cannot publish");
                }
                wait
            });
            match wait {
                // Healthy: sleep until a commit signals or the poll interval.
                None => tokio::select! {
                    () = committed.notified() => {}
                    () = tokio::time::sleep(self.settings.poll_interval) => {}
                    () = stop.cancelled() => {}
                },
                // Backing off: a commit does not help, NATS coming back does.
                Some(wait) => tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = self.bus.wait_ready(), if !self.bus.streams_ready() => {}
                    () = stop.cancelled() => {}
                },
            }
        }
        housekeeping.abort();
        // One last pass, bounded: events committed by the calls the server
        // drained before stopping us go out now rather than at the next start.
        match tokio::time::timeout(FINAL_PASS_TIMEOUT, self.publish_pending(Marking::Mark)).await {
            Ok(Ok(pass)) if pass.published > 0 => tracing::info!(
                source = self.source,
                published = pass.published,
                "published the last events before stopping"
            ),
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "no last pass: events stay in the outbox");
            }
            _ => {}
        }
        tracing::info!(source = self.source, "outbox relay stopped");
    }

    /// One pass: publishes up to a batch of unpublished rows and (with
    /// [`Marking::Mark`]) marks those JetStream acknowledged.
    pub async fn publish_pending(&self, marking: Marking) -> Result<Pass> {
        if !self.bus.streams_ready() {
            return Err(Error::new(ErrorKind::Unavailable, "NATS is not ready"));
        }
        let db = self.outbox.db();
        let mut tx = db.pool().begin().await?;
        if db.backend() == Backend::Postgres {
            let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(LEASE_KEY)
                .fetch_one(&mut *tx)
                .await?;
            if !leader {
                return Ok(Pass::default());
            }
        }
        let rows = sqlx::query(
            "SELECT id, event_id, subject, event_type, aggregate_id, aggregate_version, payload, \
             traceparent, tracestate, occurred_at FROM event_outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(self.settings.batch_size)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(OutboxRow::from_row)
        .collect::<Result<Vec<_>>>()?;
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= self.settings.batch_size;
        if rows.is_empty() {
            return Ok(Pass::default());
        }
        // SQLite: publishing must not hold the one write lock; the read
        // transaction is only a snapshot, end it. (PostgreSQL keeps its
        // transaction: it holds the lease.)
        let mut tx = if db.backend() == Backend::Sqlite {
            tx.commit().await?;
            None
        } else {
            Some(tx)
        };

        let (published, failed) = self.publish_rows(rows).await;
        self.metrics
            .published
            .fetch_add(published.len() as u64, Ordering::Relaxed);
        self.metrics
            .failures
            .fetch_add(failed.len() as u64, Ordering::Relaxed);
        if marking == Marking::Mark {
            match tx.as_mut() {
                Some(tx) => mark(tx, &published, &failed).await?,
                None => {
                    let mut write = db.begin_write().await?;
                    mark(&mut write, &published, &failed).await?;
                    write.commit().await?;
                }
            }
        }
        if let Some(tx) = tx {
            tx.commit().await?;
        }
        Ok(Pass {
            published: published.len(),
            failed: failed.len(),
            full,
        })
    }

    /// Publishes rows: each aggregate's rows one after the other (the next
    /// only once the previous one is acked, and none after a failure), all
    /// aggregates at once so that their publishes share the round trips.
    async fn publish_rows(&self, rows: Vec<OutboxRow>) -> (Vec<i64>, Vec<(i64, String)>) {
        let mut order: Vec<(String, Vec<OutboxRow>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for row in rows {
            let stream = stream_of_subject(&row.subject).map_or("", |s| s.name);
            let key = format!("{stream}/{}", row.aggregate_id);
            match index.get(&key) {
                Some(&i) => order[i].1.push(row),
                None => {
                    index.insert(key.clone(), order.len());
                    order.push((key, vec![row]));
                }
            }
        }
        let chains = order.into_iter().map(|(_, rows)| async move {
            let mut published = Vec::with_capacity(rows.len());
            for row in rows {
                match self.publish_one(&row).await {
                    Ok(()) => published.push(row.id),
                    Err(err) => return (published, Some((row.id, err))),
                }
            }
            (published, None)
        });
        let mut published = Vec::new();
        let mut failed = Vec::new();
        for (ok, failure) in futures::future::join_all(chains).await {
            published.extend(ok);
            failed.extend(failure);
        }
        if let Some((id, err)) = failed.first() {
            tracing::debug!(source = self.source, failed = failed.len(), first_outbox_id = id, error = %err, "publishes failed; will retry");
        }
        (published, failed)
    }

    async fn publish_one(&self, row: &OutboxRow) -> std::result::Result<(), String> {
        let parent = agora_platform::telemetry::context_from_trace_headers(
            row.traceparent.as_deref(),
            row.tracestate.as_deref(),
        );
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("{} publish", row.subject),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "publish",
            messaging.destination.name = %row.subject,
            messaging.message.id = %row.event_id,
        );
        let _ = span.set_parent(parent);
        async {
            let mut headers = HeaderMap::new();
            headers.insert(header::CE_SPECVERSION, "1.0");
            headers.insert(header::CE_ID, row.event_id.as_str());
            headers.insert(header::CE_TYPE, row.event_type.as_str());
            headers.insert(header::CE_SOURCE, self.source);
            headers.insert(header::CE_TIME, micros_to_rfc3339(row.occurred_at).as_str());
            headers.insert(header::AGGREGATE_ID, row.aggregate_id.as_str());
            headers.insert(
                header::AGGREGATE_VERSION,
                row.aggregate_version.to_string().as_str(),
            );
            // The publish span's context, whose parent is the original
            // request's: the consumer continues the same trace.
            for (key, value) in agora_platform::telemetry::current_trace_headers() {
                headers.insert(key.as_str(), value.as_str());
            }
            let ack = self
                .bus
                .jetstream()
                .send_publish(
                    row.subject.clone(),
                    Publish::build()
                        .payload(row.payload.clone().into())
                        .headers(headers)
                        .message_id(&row.event_id),
                )
                .await
                .map_err(|err| err.to_string())?
                .await
                .map_err(|err| err.to_string())?;
            if ack.duplicate {
                tracing::debug!(event_id = %row.event_id, "already in the stream (duplicate ack)");
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Measures the backlog into the metrics; with `log`, logs it when there
    /// is one. Returns whether it logged.
    async fn measure_lag(&self, log: bool) -> bool {
        let (backlog, oldest) = match self.lag().await {
            Ok(lag) => lag,
            Err(err) => {
                tracing::debug!(error = %err, "cannot measure the outbox backlog");
                return false;
            }
        };
        self.metrics.backlog.store(backlog, Ordering::Relaxed);
        let age_ms = oldest.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        self.metrics
            .oldest_unpublished_ms
            .store(age_ms, Ordering::Relaxed);
        if !log || backlog == 0 {
            return false;
        }
        let published = self.metrics.published.load(Ordering::Relaxed);
        let failures = self.metrics.failures.load(Ordering::Relaxed);
        if age_ms > 60_000 {
            tracing::warn!(
                source = self.source,
                backlog,
                oldest_unpublished_ms = age_ms,
                published,
                failures,
                "outbox lagging"
            );
        } else {
            tracing::info!(
                source = self.source,
                backlog,
                oldest_unpublished_ms = age_ms,
                published,
                failures,
                "outbox backlog"
            );
        }
        true
    }

    /// OpenTelemetry instruments reading [`RelayMetrics`], labelled with the
    /// service (`agora.source`): exported when the process exports metrics.
    fn register_metrics(&self) {
        let meter = opentelemetry::global::meter("agora.events");
        let source = [opentelemetry::KeyValue::new("agora.source", self.source)];
        let gauge = |name: &'static str,
                     description: &'static str,
                     unit: &'static str,
                     read: fn(&RelayMetrics) -> i64| {
            let metrics = Arc::clone(&self.metrics);
            let attributes = source.clone();
            meter
                .i64_observable_gauge(name)
                .with_description(description)
                .with_unit(unit)
                .with_callback(move |observer| observer.observe(read(&metrics), &attributes))
                .build()
        };
        let counter =
            |name: &'static str, description: &'static str, read: fn(&RelayMetrics) -> u64| {
                let metrics = Arc::clone(&self.metrics);
                let attributes = source.clone();
                meter
                    .u64_observable_counter(name)
                    .with_description(description)
                    .with_unit("{event}")
                    .with_callback(move |observer| observer.observe(read(&metrics), &attributes))
                    .build()
            };
        let _instruments = (
            gauge(
                "agora.outbox.backlog",
                "events recorded and not yet published",
                "{event}",
                |m| m.backlog.load(Ordering::Relaxed),
            ),
            gauge(
                "agora.outbox.oldest_unpublished_age",
                "age of the oldest unpublished event",
                "ms",
                |m| m.oldest_unpublished_ms.load(Ordering::Relaxed),
            ),
            counter(
                "agora.outbox.published",
                "events published since start",
                |m| m.published.load(Ordering::Relaxed),
            ),
            counter(
                "agora.outbox.publish_failures",
                "failed publish attempts since start",
                |m| m.failures.load(Ordering::Relaxed),
            ),
        );
    }

    /// Unpublished rows and the age of the oldest.
    pub async fn lag(&self) -> Result<(i64, Option<Duration>)> {
        // Both read the partial index of unpublished rows; the count stops
        // at a million, so a long outage does not make it a full scan a second.
        let backlog: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM event_outbox \
             WHERE published_at IS NULL LIMIT 1000000) unpublished",
        )
        .fetch_one(self.outbox.db().pool())
        .await?;
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT occurred_at FROM event_outbox WHERE published_at IS NULL ORDER BY id LIMIT 1",
        )
        .fetch_optional(self.outbox.db().pool())
        .await?;
        let age = oldest.map(|at| {
            Duration::from_micros(u64::try_from(now_micros().saturating_sub(at)).unwrap_or(0))
        });
        Ok((backlog, age))
    }

    /// Deletes published rows older than the retention, a bounded batch at a time.
    async fn prune(&self) -> Result<u64> {
        let cutoff = now_micros()
            .saturating_sub(i64::try_from(self.settings.retention.as_micros()).unwrap_or(i64::MAX));
        // Bounded batches (a short write transaction each, SQLite has one
        // writer), until the backlog of prunable rows is gone.
        let mut total = 0;
        loop {
            let mut tx = self.outbox.db().begin_write().await?;
            let deleted = sqlx::query(
                "DELETE FROM event_outbox WHERE id IN (SELECT id FROM event_outbox \
                 WHERE published_at IS NOT NULL AND published_at < $1 ORDER BY published_at LIMIT 5000)",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            total += deleted;
            if deleted < 5000 {
                return Ok(total);
            }
        }
    }
}

async fn mark(tx: &mut AnyConnection, published: &[i64], failed: &[(i64, String)]) -> Result<()> {
    update_rows(tx, "published_at = $1", now_micros(), published).await?;
    // One statement for the failures of a pass, with the first error: they
    // share their cause (NATS, the stream) nearly always.
    if let Some((_, error)) = failed.first() {
        let ids: Vec<i64> = failed.iter().map(|(id, _)| *id).collect();
        let error: String = error.chars().take(500).collect();
        update_rows(tx, "attempts = attempts + 1, last_error = $1", error, &ids).await?;
    }
    Ok(())
}

/// `UPDATE event_outbox SET <set> WHERE id IN (<ids>)`, with `value` bound
/// to `$1`, in statements of at most 500 ids.
async fn update_rows<V>(tx: &mut AnyConnection, set: &str, value: V, ids: &[i64]) -> Result<()>
where
    V: for<'q> sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any> + Clone + Send + 'static,
{
    for chunk in ids.chunks(500) {
        let placeholders = (2..chunk.len() + 2)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("UPDATE event_outbox SET {set} WHERE id IN ({placeholders})");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(value.clone());
        for id in chunk {
            query = query.bind(*id);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}
