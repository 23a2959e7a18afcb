//! The JetStream streams: one per domain that publishes, plus the dead-letter
//! stream, created or brought up to date at start-up by every service.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// One stream and the subjects it captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    /// The stream name.
    pub name: &'static str,
    /// The subject filter, `agora.<domain>.>`.
    pub subjects: &'static str,
    /// Whether its messages may be deleted (only the dead-letter stream:
    /// a replayed dead letter is removed from it).
    pub deletable: bool,
}

/// The stream of dead letters: copies of events a consumer gave up on, under
/// `agora.dlq.<consumer>`, with their original headers. Kept until replayed
/// (no age limit, unlike the domain streams), bounded by size only.
pub const DEAD_LETTERS: StreamSpec = StreamSpec {
    name: "DEAD_LETTERS",
    subjects: "agora.dlq.>",
    deletable: true,
};

/// Every stream Agora uses.
pub const STREAMS: &[StreamSpec] = &[
    StreamSpec {
        name: "USERS",
        subjects: "agora.users.>",
        deletable: false,
    },
    StreamSpec {
        name: "CATALOG",
        subjects: "agora.catalog.>",
        deletable: false,
    },
    StreamSpec {
        name: "ORDERS",
        subjects: "agora.orders.>",
        deletable: false,
    },
    StreamSpec {
        name: "PAYMENTS",
        subjects: "agora.payments.>",
        deletable: false,
    },
    DEAD_LETTERS,
];

/// The stream that captures `subject`.
pub fn stream_of_subject(subject: &str) -> Option<&'static StreamSpec> {
    STREAMS.iter().find(|s| {
        s.subjects
            .strip_suffix('>')
            .is_some_and(|prefix| subject.starts_with(prefix))
    })
}

/// Limits and durability shared by every stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSettings {
    /// Copies kept by a NATS cluster: 1 on a laptop, 3 in production.
    pub replicas: usize,
    /// Bytes a stream may hold; then new publishes are refused (`discard:
    /// new`), so the outbox keeps them instead of the stream dropping old ones.
    pub max_bytes: i64,
    /// How long a message is kept.
    pub max_age: Duration,
    /// How long JetStream remembers a message id to drop a second publish.
    /// Longer than the relay's longest retry gap (see
    /// [`crate::relay::RelaySettings::max_backoff`]).
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
        }
    }
}

fn config(spec: &StreamSpec, settings: &StreamSettings) -> stream::Config {
    stream::Config {
        name: spec.name.to_owned(),
        subjects: vec![spec.subjects.to_owned()],
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        retention: stream::RetentionPolicy::Limits,
        max_bytes: settings.max_bytes,
        max_messages: -1,
        // A dead letter waits for an operator however long that takes.
        max_age: if spec.deletable {
            Duration::ZERO
        } else {
            settings.max_age
        },
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        // Fixed at creation: the history is append-only. Dead letters can be
        // deleted once replayed.
        deny_delete: !spec.deletable,
        deny_purge: !spec.deletable,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates every stream that is missing and updates the limits of those
/// that exist, so that a changed setting takes effect at the next start.
pub async fn ensure_streams(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), async_nats::Error> {
    for spec in STREAMS {
        let wanted = config(spec, settings);
        match js.get_stream(spec.name).await {
            Ok(mut existing) => {
                let current = existing.info().await?.config.clone();
                let mut update = wanted.clone();
                // Immutable after creation: keep what the stream was made with.
                update.deny_delete = current.deny_delete;
                update.deny_purge = current.deny_purge;
                update.storage = current.storage;
                if !same_limits(&current, &update) {
                    js.update_stream(update).await?;
                    tracing::info!(stream = spec.name, "stream limits updated");
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                        if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                js.create_stream(wanted).await?;
                tracing::info!(stream = spec.name, "stream created");
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

fn same_limits(a: &stream::Config, b: &stream::Config) -> bool {
    a.subjects == b.subjects
        && a.discard == b.discard
        && a.max_bytes == b.max_bytes
        && a.max_age == b.max_age
        && a.duplicate_window == b.duplicate_window
        && a.num_replicas == b.num_replicas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_find_their_stream() {
        assert_eq!(
            stream_of_subject("agora.users.user_created").map(|s| s.name),
            Some("USERS")
        );
        assert_eq!(
            stream_of_subject("agora.dlq.notifications").map(|s| s.name),
            Some("DEAD_LETTERS")
        );
        assert_eq!(stream_of_subject("agora.usersx"), None);
        assert_eq!(stream_of_subject("other.users.x"), None);
    }

    #[test]
    fn history_streams_refuse_deletes_and_new_messages_at_their_limits() {
        let settings = StreamSettings::default();
        for spec in STREAMS {
            let config = config(spec, &settings);
            assert_eq!(config.discard, stream::DiscardPolicy::New);
            assert_eq!(config.storage, stream::StorageType::File);
            assert_eq!(config.deny_delete, spec.name != DEAD_LETTERS.name);
            if spec.name == DEAD_LETTERS.name {
                assert_eq!(config.max_age, Duration::ZERO, "dead letters never expire");
            } else {
                assert!(config.duplicate_window <= config.max_age);
            }
        }
    }
}
