//! The dead-letter stream: what consumers gave up on, listed and replayed.
//!
//! A dead letter is the original message (payload and headers) published to
//! `agora.dlq.<consumer>` with `agora-dlq-*` headers saying where it came
//! from and why it failed. Replaying publishes it again on its original
//! subject (with a new `Nats-Msg-Id`, so JetStream's duplicate window does
//! not drop it) with an `agora-replay-for` header naming the consumer that
//! gave up: the other consumers of the subject acknowledge and skip it. Then
//! it is deleted from the dead-letter stream.

use agora_platform::error::{Error, ErrorKind, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::stream::DirectGetErrorKind;

use crate::bus::EventBus;
use crate::envelope::{header as event_header, header_text};
use crate::streams::DEAD_LETTERS;

/// Headers added to a dead letter.
pub mod header {
    /// The subject it was published on.
    pub const SUBJECT: &str = "agora-dlq-subject";
    /// The stream it lives in.
    pub const STREAM: &str = "agora-dlq-stream";
    /// Its sequence number in that stream.
    pub const SEQUENCE: &str = "agora-dlq-sequence";
    /// The durable JetStream consumer that gave up (`<consumer>-<stream>`).
    pub const DURABLE: &str = "agora-dlq-durable";
    /// The consumer's name (its inbox key): a replay goes to it alone.
    pub const CONSUMER: &str = "agora-dlq-consumer";
    /// How often it was delivered.
    pub const DELIVERIES: &str = "agora-dlq-deliveries";
    /// The last error.
    pub const REASON: &str = "agora-dlq-reason";
}

/// `agora.dlq.<consumer>`.
pub fn dead_letter_subject(consumer: &str) -> String {
    format!("agora.dlq.{consumer}")
}

/// One dead letter.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream: the id to replay it by.
    pub sequence: u64,
    /// The original subject.
    pub subject: String,
    /// The original event's `ce-id`.
    pub event_id: String,
    /// The original event's `ce-type`.
    pub event_type: String,
    /// The consumer that gave up on it (its name, the inbox key).
    pub consumer: String,
    /// The durable JetStream consumer that gave up on it.
    pub durable: String,
    /// Deliveries before it gave up.
    pub deliveries: String,
    /// The last error.
    pub reason: String,
    /// The original stream and sequence.
    pub origin: String,
    /// All headers (the original's and the `agora-dlq-*` ones).
    pub headers: HeaderMap,
    /// The encoded event.
    pub payload: bytes::Bytes,
}

/// The dead letters, oldest first, at most `limit`.
pub async fn list(bus: &EventBus, limit: usize) -> Result<Vec<DeadLetter>> {
    let stream = bus
        .jetstream()
        .get_stream(DEAD_LETTERS.name)
        .await
        .map_err(unavailable)?;
    let mut letters = Vec::new();
    let mut next = 1;
    while letters.len() < limit {
        let message = match stream
            .direct_get_next_for_subject(DEAD_LETTERS.subjects, Some(next))
            .await
        {
            Ok(message) => message,
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => break,
            Err(err) => return Err(unavailable(err)),
        };
        next = message.sequence + 1;
        letters.push(DeadLetter::from_message(&message));
    }
    Ok(letters)
}

/// The dead letter with sequence `sequence`, if there is one.
pub async fn get(bus: &EventBus, sequence: u64) -> Result<Option<DeadLetter>> {
    let stream = bus
        .jetstream()
        .get_stream(DEAD_LETTERS.name)
        .await
        .map_err(unavailable)?;
    match stream.direct_get(sequence).await {
        Ok(message) => Ok(Some(DeadLetter::from_message(&message))),
        Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(err) => Err(unavailable(err)),
    }
}

impl DeadLetter {
    fn from_message(message: &async_nats::jetstream::message::StreamMessage) -> Self {
        let headers = message.headers.clone();
        Self {
            sequence: message.sequence,
            subject: header_text(&headers, header::SUBJECT),
            event_id: header_text(&headers, event_header::CE_ID),
            event_type: header_text(&headers, event_header::CE_TYPE),
            consumer: header_text(&headers, header::CONSUMER),
            durable: header_text(&headers, header::DURABLE),
            deliveries: header_text(&headers, header::DELIVERIES),
            reason: header_text(&headers, header::REASON),
            origin: format!(
                "{}#{}",
                header_text(&headers, header::STREAM),
                header_text(&headers, header::SEQUENCE)
            ),
            headers,
            payload: message.payload.clone(),
        }
    }
}

/// Publishes dead letter `letter` again on its original subject and removes
/// it from the dead-letter stream.
pub async fn replay(bus: &EventBus, letter: &DeadLetter) -> Result<()> {
    if letter.subject.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("dead letter {} names no original subject", letter.sequence),
        ));
    }
    let mut headers = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name: &str = name.as_ref();
        if name.starts_with("agora-dlq-")
            || name.eq_ignore_ascii_case("Nats-Msg-Id")
            || name == crate::consumer::REPLAY_FOR_HEADER
        {
            continue;
        }
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    if !letter.consumer.is_empty() {
        headers.insert(crate::consumer::REPLAY_FOR_HEADER, letter.consumer.as_str());
    }
    bus.jetstream()
        .send_publish(
            letter.subject.clone(),
            Publish::build()
                .payload(letter.payload.clone())
                .headers(headers)
                .message_id(format!("{}.replay.{}", letter.event_id, letter.sequence)),
        )
        .await
        .map_err(unavailable)?
        .await
        .map_err(unavailable)?;
    bus.jetstream()
        .get_stream(DEAD_LETTERS.name)
        .await
        .map_err(unavailable)?
        .delete_message(letter.sequence)
        .await
        .map_err(unavailable)?;
    Ok(())
}

fn unavailable(err: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::Unavailable, format!("JetStream: {err}")).with_source(err)
}
