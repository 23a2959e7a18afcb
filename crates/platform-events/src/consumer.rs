//! [`EventConsumer`]: durable pull consumers that apply each event once.
//!
//! Per delivery: open a unit of work, insert `(consumer, event id)` into the
//! inbox (a duplicate means it was applied before: ack and skip), let the
//! handler apply the event in the same transaction, commit, and only then
//! ack. A crash before the commit leaves nothing applied (redelivered after
//! `ack_wait`); a crash after the commit and before the ack is redelivered
//! and skipped by the inbox. A failing event is retried with
//! `Nak(delay)` (a growing delay; JetStream's own `backoff` applies to ack
//! timeouts only); after [`ConsumerSettings::dead_letter_after`] deliveries
//! it is copied to the dead-letter stream with its headers, stream and
//! sequence, then terminated, so the events behind it keep flowing.

use std::sync::Arc;
use std::time::Duration;

use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::time::now_micros;
use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::bus::EventBus;
use crate::dead_letters::dead_letter_subject;
use crate::envelope::{DomainEvent, header};
use crate::outbox::{Outbox, UnitOfWork};
use crate::streams::{DEAD_LETTERS, stream_of_subject};

/// Applies events. [`EventHandler::handle`] is called once per event id and
/// consumer (the inbox sees to that), inside the unit of work that commits
/// with the inbox row.
pub trait EventHandler: Send + Sync + 'static {
    /// Applies `event`. An error rolls everything back and the event is
    /// delivered again later (or, after too many deliveries, dead-lettered).
    fn handle<'a>(
        &'a self,
        event: &'a Delivery,
        work: &'a mut UnitOfWork,
    ) -> BoxFuture<'a, Result<()>>;

    /// A side effect outside the database (sending an email), run after the
    /// transaction of `handle` committed: at every delivery of the event,
    /// the first and any redelivery, so it must be idempotent itself. An
    /// error means "retry": the event is delivered again (and skips
    /// `handle`, already applied), or is dead-lettered after too many tries.
    fn after_commit<'a>(&'a self, event: &'a Delivery) -> BoxFuture<'a, Result<()>> {
        let _ = event;
        Box::pin(async { Ok(()) })
    }
}

/// One delivered event: its envelope and the still-encoded payload.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The subject it was published on.
    pub subject: String,
    /// `ce-id`.
    pub event_id: String,
    /// `ce-type`, the full protobuf name.
    pub event_type: String,
    /// `ce-source`, the publishing service.
    pub source: String,
    /// The aggregate it is about.
    pub aggregate_id: String,
    /// The aggregate's version after it.
    pub aggregate_version: i64,
    /// The encoded protobuf message.
    pub payload: Bytes,
    /// The stream and its sequence number of this message.
    pub stream: String,
    /// See [`Delivery::stream`].
    pub stream_sequence: u64,
    /// How often it has been delivered to this consumer, this time included.
    pub delivered: i64,
    /// All headers as published.
    pub headers: HeaderMap,
}

impl Delivery {
    fn from_message(message: &Message) -> Result<Self> {
        let info = message
            .info()
            .map_err(|err| Error::internal("reading JetStream delivery info", err))?;
        let headers = message.headers.clone().unwrap_or_default();
        let get = |name: &str| {
            headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let delivery = Self {
            subject: message.subject.to_string(),
            event_id: get(header::CE_ID),
            event_type: get(header::CE_TYPE),
            source: get(header::CE_SOURCE),
            aggregate_id: get(header::AGGREGATE_ID),
            aggregate_version: get(header::AGGREGATE_VERSION).parse().unwrap_or(0),
            payload: message.payload.clone(),
            stream: info.stream.to_owned(),
            stream_sequence: info.stream_sequence,
            delivered: info.delivered,
            headers,
        };
        Ok(delivery)
    }

    /// The payload as `E`. INVALID_ARGUMENT when the event is of another
    /// type or does not decode.
    pub fn decode<E: DomainEvent>(&self) -> Result<E> {
        if self.event_type != E::TYPE {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("expected a {}, got a {:?}", E::TYPE, self.event_type),
            ));
        }
        E::decode(self.payload.clone()).map_err(|err| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("cannot decode {}", E::TYPE),
            )
            .with_source(err)
        })
    }
}

/// How a consumer retries and when it gives up on an event.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// Deliveries after which a failing event goes to the dead-letter stream.
    pub dead_letter_after: i64,
    /// The delay before the second delivery of a failed event; it doubles
    /// with each further delivery, up to `retry_max`.
    pub retry_base: Duration,
    /// The longest delay between deliveries of a failing event.
    pub retry_max: Duration,
    /// How long a delivery may stay unacknowledged before JetStream sends it
    /// again (a consumer that died mid-way).
    pub ack_wait: Duration,
    /// Deliveries in flight at most (JetStream's `max_ack_pending`).
    pub max_ack_pending: i64,
    /// How long inbox rows are kept: longer than any message can be
    /// redelivered (the streams keep messages for 7 days).
    pub inbox_retention: Duration,
    /// Fault tests only: commit but never acknowledge, which is what a
    /// consumer killed between its commit and its ack leaves behind.
    pub crash_before_ack: bool,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            dead_letter_after: 5,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 256,
            inbox_retention: Duration::from_secs(8 * 24 * 3600),
            crash_before_ack: false,
        }
    }
}

impl ConsumerSettings {
    /// The delay before delivery number `delivered + 1`.
    fn retry_delay(&self, delivered: i64) -> Duration {
        let exponent = u32::try_from((delivered - 1).clamp(0, 16)).unwrap_or(16);
        self.retry_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.retry_max)
    }
}

/// A named consumer of some subjects: one durable JetStream consumer per
/// stream those subjects live in, all applying through one handler.
pub struct EventConsumer {
    inner: Arc<Inner>,
}

struct Inner {
    name: &'static str,
    subjects: Vec<&'static str>,
    outbox: Outbox,
    bus: EventBus,
    handler: Box<dyn EventHandler>,
    settings: ConsumerSettings,
}

/// What became of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Applied,
    Duplicate,
}

impl EventConsumer {
    /// A consumer called `name` (the durable name prefix and the inbox key)
    /// of `subjects`, applying events in `outbox`'s database.
    pub fn new(
        name: &'static str,
        subjects: &[&'static str],
        outbox: Outbox,
        bus: EventBus,
        handler: impl EventHandler,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                subjects: subjects.to_vec(),
                outbox,
                bus,
                handler: Box::new(handler),
                settings: ConsumerSettings::default(),
            }),
        }
    }

    /// Replaces the retry settings.
    pub fn with_settings(mut self, settings: ConsumerSettings) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.settings = settings;
        }
        self
    }

    /// Consumes until `stop` is cancelled: one task per stream.
    pub async fn run(self, stop: CancellationToken) {
        let mut by_stream: Vec<(&'static str, Vec<String>)> = Vec::new();
        for subject in &self.inner.subjects {
            let Some(stream) = stream_of_subject(subject) else {
                tracing::error!(subject, "no stream captures this subject; not consuming it");
                continue;
            };
            match by_stream.iter_mut().find(|(name, _)| *name == stream.name) {
                Some((_, subjects)) => subjects.push((*subject).to_owned()),
                None => by_stream.push((stream.name, vec![(*subject).to_owned()])),
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (stream, subjects) in by_stream {
            let inner = Arc::clone(&self.inner);
            tasks.spawn(inner.consume_stream(stream, subjects, stop.clone()));
        }
        let housekeeping = Arc::clone(&self.inner);
        tasks.spawn(async move { housekeeping.prune_inbox_until(stop).await });
        while tasks.join_next().await.is_some() {}
    }
}

impl Inner {
    fn durable(&self, stream: &str) -> String {
        format!("{}-{}", self.name, stream.to_lowercase())
    }

    /// Keeps a durable consumer on `stream` and applies what it delivers,
    /// recreating it whenever its message stream fails (a deleted consumer,
    /// missed heartbeats after a broker restart).
    async fn consume_stream(
        self: Arc<Self>,
        stream: &'static str,
        subjects: Vec<String>,
        stop: CancellationToken,
    ) {
        let durable = self.durable(stream);
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            tokio::select! {
                () = self.bus.wait_ready() => {}
                () = stop.cancelled() => return,
            }
            let messages = match self.open(stream, &durable, &subjects).await {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(consumer = %durable, error = %err, retry_in = ?backoff, "cannot open the consumer");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            tracing::info!(consumer = %durable, stream, "consuming");
            let mut messages = std::pin::pin!(messages);
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    () = stop.cancelled() => return,
                };
                match next {
                    Some(Ok(message)) => self.process(&durable, message).await,
                    Some(Err(err)) => {
                        tracing::warn!(consumer = %durable, error = %err, "consumer stream failed; recreating it");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    async fn open(
        &self,
        stream: &str,
        durable: &str,
        subjects: &[String],
    ) -> std::result::Result<pull::Stream, async_nats::Error> {
        let config = pull::Config {
            durable_name: Some(durable.to_owned()),
            description: Some(format!("{} ({})", self.name, subjects.join(", "))),
            filter_subjects: subjects.to_vec(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.settings.ack_wait,
            // We count deliveries ourselves and dead-letter; the server must
            // keep redelivering until we do.
            max_deliver: -1,
            max_ack_pending: self.settings.max_ack_pending,
            ..Default::default()
        };
        let consumer: PullConsumer = self
            .bus
            .jetstream()
            .get_stream(stream)
            .await?
            .get_or_create_consumer(durable, config)
            .await?;
        Ok(consumer
            .stream()
            .max_messages_per_batch(64)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?)
    }

    async fn process(&self, durable: &str, message: Message) {
        let delivery = match Delivery::from_message(&message) {
            Ok(delivery) => delivery,
            Err(err) => {
                tracing::error!(consumer = durable, error = %err, "undeliverable message");
                let _ = message
                    .ack_with(AckKind::Nak(Some(self.settings.retry_max)))
                    .await;
                return;
            }
        };
        let parent = agora_platform::telemetry::context_from_trace_headers(
            delivery
                .headers
                .get(header::TRACEPARENT)
                .map(|v| v.as_str()),
            delivery.headers.get(header::TRACESTATE).map(|v| v.as_str()),
        );
        let span = tracing::info_span!(
            "consume",
            otel.name = format!("{} process", delivery.subject),
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %delivery.subject,
            messaging.consumer.group.name = %durable,
            messaging.message.id = %delivery.event_id,
            delivered = delivery.delivered,
        );
        let _ = span.set_parent(parent);
        async {
            let applied = if delivery.event_id.is_empty() {
                Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "the event has no ce-id header",
                ))
            } else {
                match self.apply(&delivery).await {
                    // At every delivery, not only the first: the side effect
                    // outside the database may not have happened yet.
                    Ok(outcome) => self.handler.after_commit(&delivery).await.map(|()| outcome),
                    Err(err) => Err(err),
                }
            };
            let acked = match applied {
                Ok(Outcome::Applied) if self.settings.crash_before_ack => Ok(()),
                Ok(Outcome::Applied) => message.ack().await,
                Ok(Outcome::Duplicate) => {
                    tracing::debug!(event_id = %delivery.event_id, "already applied; skipped");
                    message.ack().await
                }
                Err(err) => {
                    tracing::Span::current().record("otel.status_code", "ERROR");
                    self.failed(durable, &message, &delivery, &err).await
                }
            };
            if let Err(err) = acked {
                // The event is redelivered after ack_wait; the inbox skips it.
                tracing::warn!(error = %err, "could not acknowledge a delivery");
            }
        }
        .instrument(span)
        .await;
    }

    /// Inbox row, side effect, commit: all or nothing.
    async fn apply(&self, delivery: &Delivery) -> Result<Outcome> {
        let mut work = self.outbox.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO event_inbox (consumer, event_id, subject, received_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, event_id) DO NOTHING",
        )
        .bind(self.name)
        .bind(&delivery.event_id)
        .bind(&delivery.subject)
        .bind(now_micros())
        .execute(work.tx())
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(Outcome::Duplicate);
        }
        self.handler.handle(delivery, &mut work).await?;
        work.commit().await?;
        Ok(Outcome::Applied)
    }

    /// Retries later, or after too many deliveries, dead-letters.
    async fn failed(
        &self,
        durable: &str,
        message: &Message,
        delivery: &Delivery,
        err: &Error,
    ) -> std::result::Result<(), async_nats::Error> {
        if delivery.delivered < self.settings.dead_letter_after {
            let delay = self.settings.retry_delay(delivery.delivered);
            tracing::warn!(
                event_id = %delivery.event_id,
                delivered = delivery.delivered,
                retry_in = ?delay,
                error = %err,
                "event failed; will retry"
            );
            return message.ack_with(AckKind::Nak(Some(delay))).await;
        }
        match self.dead_letter(durable, message, delivery, err).await {
            Ok(()) => {
                tracing::error!(
                    event_id = %delivery.event_id,
                    delivered = delivery.delivered,
                    error = %err,
                    dead_letters = DEAD_LETTERS.name,
                    "event failed too often; moved to the dead-letter stream"
                );
                message.ack_with(AckKind::Term).await
            }
            Err(dlq) => {
                tracing::error!(error = %dlq, "cannot dead-letter an event; will retry it");
                message
                    .ack_with(AckKind::Nak(Some(self.settings.retry_max)))
                    .await
            }
        }
    }

    async fn dead_letter(
        &self,
        durable: &str,
        message: &Message,
        delivery: &Delivery,
        err: &Error,
    ) -> std::result::Result<(), async_nats::Error> {
        let mut headers = message.headers.clone().unwrap_or_default();
        headers.insert(
            crate::dead_letters::header::SUBJECT,
            delivery.subject.as_str(),
        );
        headers.insert(
            crate::dead_letters::header::STREAM,
            delivery.stream.as_str(),
        );
        headers.insert(
            crate::dead_letters::header::SEQUENCE,
            delivery.stream_sequence.to_string().as_str(),
        );
        headers.insert(crate::dead_letters::header::CONSUMER, durable);
        headers.insert(crate::dead_letters::header::CONSUMER_NAME, self.name);
        headers.insert(
            crate::dead_letters::header::DELIVERIES,
            delivery.delivered.to_string().as_str(),
        );
        let reason: String = err.to_string().chars().take(500).collect();
        headers.insert(
            crate::dead_letters::header::REASON,
            reason.replace(['\r', '\n'], " ").as_str(),
        );
        self.bus
            .jetstream()
            .send_publish(
                dead_letter_subject(self.name),
                Publish::build()
                    .payload(message.payload.clone())
                    .headers(headers)
                    .message_id(format!(
                        "dlq:{durable}:{}:{}",
                        delivery.stream, delivery.stream_sequence
                    )),
            )
            .await?
            .await?;
        Ok(())
    }

    async fn prune_inbox_until(&self, stop: CancellationToken) {
        loop {
            let cutoff = now_micros().saturating_sub(
                i64::try_from(self.settings.inbox_retention.as_micros()).unwrap_or(i64::MAX),
            );
            let pruned = async {
                let mut work = self.outbox.begin().await?;
                let deleted =
                    sqlx::query("DELETE FROM event_inbox WHERE consumer = $1 AND received_at < $2")
                        .bind(self.name)
                        .bind(cutoff)
                        .execute(work.tx())
                        .await?
                        .rows_affected();
                work.commit().await?;
                Ok::<_, Error>(deleted)
            }
            .await;
            if let Err(err) = pruned {
                tracing::warn!(error = %err, "cannot prune the inbox");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(3600)) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_maximum() {
        let settings = ConsumerSettings::default();
        assert_eq!(settings.retry_delay(1), Duration::from_secs(1));
        assert_eq!(settings.retry_delay(2), Duration::from_secs(2));
        assert_eq!(settings.retry_delay(4), Duration::from_secs(8));
        assert_eq!(settings.retry_delay(100), Duration::from_secs(60));
    }
}
