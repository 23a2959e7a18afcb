//! [`EventConsumer`]: durable pull consumers that apply each event once.
//!
//! Per delivery: open a unit of work, insert `(consumer, event id)` into the
//! inbox (a duplicate means it was applied before: ack and skip), let the
//! handler apply the event in the same transaction, commit, and only then
//! ack. A crash before the commit leaves nothing applied (redelivered after
//! `ack_wait`); a crash after the commit and before the ack is redelivered
//! and skipped by the inbox. A failing event is retried with `Nak(delay)` (a
//! growing delay; JetStream's own `backoff` applies to ack timeouts only).
//! How long depends on the error: an event that cannot be applied as it is
//! (it does not decode, it is invalid: a *permanent* error) goes to the
//! dead-letter stream after [`ConsumerSettings::dead_letter_after`]
//! deliveries; one that failed because something it needs is unavailable
//! right now (a database, an SMTP server, an event it depends on: a
//! *transient* error) keeps being retried for
//! [`ConsumerSettings::retry_transient_for`] before it is dead-lettered. A
//! dead letter is a copy with the event's headers, stream and sequence; the
//! event is then terminated, so the events behind it keep flowing.

use std::sync::Arc;
use std::time::Duration;

use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::time::now_micros;
use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use std::panic::AssertUnwindSafe;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::backoff::Backoff;
use crate::bus::EventBus;
use crate::dead_letters::dead_letter_subject;
use crate::envelope::{DomainEvent, header, header_text};
use crate::outbox::{Outbox, UnitOfWork};
use crate::streams::{DEAD_LETTERS, stream_of_subject};

/// Applies events. [`EventHandler::handle`] runs inside the unit of work
/// that commits with the inbox row, so its effects are kept once per event
/// id and consumer (the inbox sees to that). It may run more than once for
/// an event whose transaction was rolled back (a batch-mate failed): it must
/// only touch the database, through the unit of work.
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
        let get = |name: &str| header_text(&headers, name);
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
    /// Deliveries after which an event failing with a permanent error
    /// (invalid, undecodable, a bug) goes to the dead-letter stream.
    pub dead_letter_after: i64,
    /// How long an event failing with a transient error (UNAVAILABLE, a
    /// conflict: something that heals by itself) is retried, counted in the
    /// retry delays from its first failure, before it goes to the
    /// dead-letter stream.
    pub retry_transient_for: Duration,
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
            retry_transient_for: Duration::from_secs(24 * 3600),
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
        let attempt = u32::try_from((delivered - 1).max(0)).unwrap_or(u32::MAX);
        crate::backoff::exponential(attempt, self.retry_base, self.retry_max)
    }

    /// Whether an event that failed with `err` at delivery `delivered` has
    /// had its chances. Counted in deliveries, so from the event's first
    /// failure: an old event replayed from the stream gets the same chances.
    fn gives_up(&self, err: &Error, delivered: i64) -> bool {
        if is_transient(err) {
            delivered >= self.transient_deliveries()
        } else {
            delivered >= self.dead_letter_after
        }
    }

    /// The deliveries whose retry delays add up to `retry_transient_for`.
    fn transient_deliveries(&self) -> i64 {
        let mut waited = Duration::ZERO;
        let mut delivered = 1;
        while waited < self.retry_transient_for && delivered < 1_000_000 {
            waited += self.retry_delay(delivered);
            delivered += 1;
        }
        delivered.max(self.dead_letter_after)
    }
}

/// Errors that heal by themselves: worth retrying for a long time.
fn is_transient(err: &Error) -> bool {
    matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Conflict)
}

/// Header naming the one consumer a replayed dead letter is for; the other
/// consumers of its subject acknowledge and skip it.
pub const REPLAY_FOR_HEADER: &str = "agora-replay-for";

/// How many messages a pull brings at once. Each waits for those before it,
/// so the batch must be processed well within `ack_wait`.
const PULL_BATCH: usize = 16;
/// ... and at most this many bytes of them.
const PULL_BATCH_BYTES: usize = 4 << 20;

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

/// A dead-letter copy that can never be published: too large for the server.
#[derive(Debug)]
struct TooLargeToDeadLetter {
    size: usize,
    max_payload: usize,
}

impl std::fmt::Display for TooLargeToDeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the dead-letter copy needs {} bytes, the server takes {}",
            self.size, self.max_payload
        )
    }
}

impl std::error::Error for TooLargeToDeadLetter {}

/// The error of a handler that panicked.
fn panicked(panic: &(dyn std::any::Any + Send)) -> Error {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    Error::new(ErrorKind::Internal, format!("the handler panicked: {what}"))
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

    /// Consumes until `stop` is cancelled: one task per stream, each
    /// restarted if it ever ends early (a panic outside a handler, say).
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
            let stop = stop.clone();
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let run = Arc::clone(&inner).consume_stream(stream, subjects.clone(), stop.clone());
                    if let Err(panic) = tokio::spawn(run).await {
                        tracing::error!(consumer = inner.name, stream, error = %panic, "consumer task died; restarting it");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                }
            });
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
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !stop.is_cancelled() {
            tokio::select! {
                () = self.bus.wait_ready() => {}
                () = stop.cancelled() => return,
            }
            let messages = match self.open(stream, &durable, &subjects).await {
                Ok(messages) => messages,
                Err(err) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(consumer = %durable, error = %err, retry_in = ?wait, "cannot open the consumer");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            backoff.reset();
            tracing::info!(consumer = %durable, stream, "consuming");
            let mut messages = std::pin::pin!(messages);
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    () = stop.cancelled() => return,
                };
                let mut batch = match next {
                    Some(Ok(message)) => vec![message],
                    Some(Err(err)) => {
                        tracing::warn!(consumer = %durable, error = %err, "consumer stream failed; recreating it");
                        break;
                    }
                    None => break,
                };
                // Whatever else has already arrived joins the batch; nothing
                // waits for more.
                let mut failed = None;
                while batch.len() < PULL_BATCH {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(message))) => batch.push(message),
                        Some(Some(Err(err))) => {
                            failed = Some(err);
                            break;
                        }
                        Some(None) | None => break,
                    }
                }
                self.process_batch(&durable, batch).await;
                if let Some(err) = failed {
                    tracing::warn!(consumer = %durable, error = %err, "consumer stream failed; recreating it");
                    break;
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
        let stream = self.bus.jetstream().get_stream(stream).await?;
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(durable, config.clone())
            .await?;
        // An existing durable keeps the configuration it was created with:
        // bring it up to date (a subject added to `SUBJECTS`, a new ack wait).
        let current = consumer.info().await?.config.clone();
        if current.filter_subjects != config.filter_subjects
            || current.ack_wait != config.ack_wait
            || current.max_ack_pending != config.max_ack_pending
            || current.max_deliver != config.max_deliver
        {
            tracing::info!(consumer = durable, "updating the consumer's configuration");
            consumer = stream.update_consumer(config).await?;
        }
        Ok(consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .max_bytes_per_batch(PULL_BATCH_BYTES)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?)
    }

    /// Applies a pulled batch: the deliveries ready now go through one unit
    /// of work (one commit for all of them: a consumer's cost is its
    /// transactions), then each gets its follow-up and its ack. If anything in
    /// the batch fails, none of it is kept and each delivery is processed on
    /// its own, so that a failing event stays isolated and the others apply.
    async fn process_batch(&self, durable: &str, messages: Vec<Message>) {
        let mut batch = Vec::with_capacity(messages.len());
        if messages.len() > 1 && !self.settings.crash_before_ack {
            for message in &messages {
                match Delivery::from_message(message) {
                    Ok(delivery)
                        if !delivery.event_id.is_empty()
                            && delivery.headers.get(REPLAY_FOR_HEADER).is_none() =>
                    {
                        let span = self.span_for(durable, &delivery);
                        batch.push((delivery, span));
                    }
                    _ => {
                        batch.clear();
                        break;
                    }
                }
            }
        }
        if batch.is_empty() {
            for message in messages {
                self.process(durable, message).await;
            }
            return;
        }
        let applied = AssertUnwindSafe(self.apply_many(&batch))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
        let outcomes = match applied {
            Ok(outcomes) => outcomes,
            Err(err) => {
                tracing::debug!(consumer = durable, error = %err, size = messages.len(), "batch failed; applying its events one by one");
                for message in messages {
                    self.process(durable, message).await;
                }
                return;
            }
        };
        // The follow-ups run one after the other and may be slow (SMTP): tell
        // JetStream that every delivery of the batch is being worked on.
        for message in &messages {
            let _ = message.ack_with(AckKind::Progress).await;
        }
        for ((message, (delivery, span)), outcome) in messages.into_iter().zip(&batch).zip(outcomes)
        {
            async {
                let followed = AssertUnwindSafe(self.follow_up(&message, delivery))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| Err(panicked(panic.as_ref())))
                    .map(|()| outcome);
                self.settle(durable, &message, delivery, followed).await;
            }
            .instrument(span.clone())
            .await;
        }
    }

    /// Applies one delivery on its own: inbox row, handler, commit, follow-up,
    /// ack (or retry, or dead letter).
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
        // A replayed dead letter is for the consumer that gave up on it only.
        if let Some(target) = delivery.headers.get(REPLAY_FOR_HEADER)
            && target.as_str() != self.name
        {
            let _ = message.ack().await;
            return;
        }
        let span = self.span_for(durable, &delivery);
        async {
            let applied = if delivery.event_id.is_empty() {
                Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "the event has no ce-id header",
                ))
            } else {
                // A panicking handler fails this event (and, after a few
                // deliveries, dead-letters it) instead of the whole consumer.
                AssertUnwindSafe(async {
                    let outcome = self.apply(&delivery).await?;
                    self.follow_up(&message, &delivery).await?;
                    Ok(outcome)
                })
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(panicked(panic.as_ref())))
            };
            self.settle(durable, &message, &delivery, applied).await;
        }
        .instrument(span)
        .await;
    }

    /// The span of one delivery, continuing the trace of the change that
    /// published it.
    fn span_for(&self, durable: &str, delivery: &Delivery) -> tracing::Span {
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
        span
    }

    /// Acknowledges what was applied, retries or dead-letters what failed.
    async fn settle(
        &self,
        durable: &str,
        message: &Message,
        delivery: &Delivery,
        applied: Result<Outcome>,
    ) {
        let acked = match applied {
            Ok(Outcome::Applied) if self.settings.crash_before_ack => Ok(()),
            Ok(Outcome::Applied) => message.ack().await,
            Ok(Outcome::Duplicate) => {
                tracing::debug!(event_id = %delivery.event_id, "already applied; skipped");
                message.ack().await
            }
            Err(err) => {
                tracing::Span::current().record("otel.status_code", "ERROR");
                self.failed(durable, message, delivery, &err).await
            }
        };
        if let Err(err) = acked {
            // The event is redelivered after ack_wait; the inbox skips it.
            tracing::warn!(error = %err, "could not acknowledge a delivery");
        }
    }

    /// The handler's side effect outside the database, after the commit: at
    /// every delivery, not only the first, since it may not have happened
    /// yet. It may be slow (SMTP): JetStream is told the delivery is still
    /// being worked on.
    async fn follow_up(&self, message: &Message, delivery: &Delivery) -> Result<()> {
        let _ = message.ack_with(AckKind::Progress).await;
        self.handler.after_commit(delivery).await
    }

    /// Inbox rows and side effects of several deliveries in one unit of work:
    /// all or nothing.
    async fn apply_many(&self, batch: &[(Delivery, tracing::Span)]) -> Result<Vec<Outcome>> {
        let mut work = self.outbox.begin().await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for (delivery, span) in batch {
            let outcome = self
                .apply_in(&mut work, delivery)
                .instrument(span.clone())
                .await?;
            outcomes.push(outcome);
        }
        work.commit().await?;
        Ok(outcomes)
    }

    /// Inbox row, side effect, commit: all or nothing.
    async fn apply(&self, delivery: &Delivery) -> Result<Outcome> {
        let mut work = self.outbox.begin().await?;
        let outcome = self.apply_in(&mut work, delivery).await?;
        if outcome == Outcome::Applied {
            work.commit().await?;
        }
        Ok(outcome)
    }

    /// The inbox row and, unless it was there already, the handler's work.
    async fn apply_in(&self, work: &mut UnitOfWork, delivery: &Delivery) -> Result<Outcome> {
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
        self.handler.handle(delivery, work).await?;
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
        if !self.settings.gives_up(err, delivery.delivered) {
            let delay = self.settings.retry_delay(delivery.delivered);
            tracing::warn!(
                event_id = %delivery.event_id,
                delivered = delivery.delivered,
                transient = is_transient(err),
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
            // The copy can never fit in a message (the event plus the
            // dead-letter headers exceed the server's max_payload): stop
            // redelivering it for ever. It stays in its own stream, where
            // this log line finds it. Any other failure is retried.
            Err(dlq) if dlq.is::<TooLargeToDeadLetter>() => {
                tracing::error!(
                    event_id = %delivery.event_id,
                    stream = %delivery.stream,
                    stream_sequence = delivery.stream_sequence,
                    error = %dlq,
                    last_failure = %err,
                    "cannot dead-letter an event; giving up on it (it stays in its stream)"
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
        headers.insert(crate::dead_letters::header::DURABLE, durable);
        headers.insert(crate::dead_letters::header::CONSUMER, self.name);
        headers.insert(
            crate::dead_letters::header::DELIVERIES,
            delivery.delivered.to_string().as_str(),
        );
        let reason: String = err.to_string().chars().take(500).collect();
        headers.insert(
            crate::dead_letters::header::REASON,
            reason.replace(['\r', '\n'], " ").as_str(),
        );
        let size = message.payload.len()
            + headers
                .iter()
                .flat_map(|(name, values)| {
                    let name: &str = name.as_ref();
                    values
                        .iter()
                        .map(move |v| name.len() + v.as_str().len() + 4)
                })
                .sum::<usize>()
            + 64;
        // 0 until the server said (never the case while a message is here).
        let max_payload = self.bus.client().server_info().max_payload;
        if max_payload > 0 && size > max_payload {
            return Err(Box::new(TooLargeToDeadLetter { size, max_payload }));
        }
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
            // Bounded batches, so that no write transaction holds SQLite's
            // one write lock for long.
            let pruned = async {
                loop {
                    let mut work = self.outbox.begin().await?;
                    let deleted = sqlx::query(
                        "DELETE FROM event_inbox WHERE consumer = $1 AND event_id IN \
                         (SELECT event_id FROM event_inbox WHERE consumer = $1 \
                         AND received_at < $2 LIMIT 1000)",
                    )
                    .bind(self.name)
                    .bind(cutoff)
                    .execute(work.tx())
                    .await?
                    .rows_affected();
                    work.commit().await?;
                    if deleted < 1000 || stop.is_cancelled() {
                        return Ok::<_, Error>(());
                    }
                }
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
    fn permanent_errors_give_up_after_a_few_deliveries_transient_ones_after_a_day() {
        let settings = ConsumerSettings::default();
        let invalid = Error::new(ErrorKind::InvalidArgument, "does not decode");
        let down = Error::new(ErrorKind::Unavailable, "smtp down");
        assert!(!settings.gives_up(&invalid, 4));
        assert!(settings.gives_up(&invalid, 5));
        // 1, 2, 4 ... 32 s, then a minute each: a day is 1446 deliveries.
        let day = settings.transient_deliveries();
        assert_eq!(day, 1446);
        assert!(!settings.gives_up(&down, 500));
        assert!(!settings.gives_up(&down, day - 1));
        assert!(settings.gives_up(&down, day));
        let panicked = panicked(&"boom");
        assert_eq!(panicked.kind(), ErrorKind::Internal);
        assert!(settings.gives_up(&panicked, 5));
    }

    #[test]
    fn retry_delays_double_up_to_the_maximum() {
        let settings = ConsumerSettings::default();
        assert_eq!(settings.retry_delay(1), Duration::from_secs(1));
        assert_eq!(settings.retry_delay(2), Duration::from_secs(2));
        assert_eq!(settings.retry_delay(4), Duration::from_secs(8));
        assert_eq!(settings.retry_delay(100), Duration::from_secs(60));
    }
}
