//! The connection to NATS JetStream every publisher and consumer shares.
//!
//! A service starts and answers RPCs while NATS is unreachable: the client
//! connects in the background and reconnects forever; the streams are
//! ensured once connected and again after every reconnect (a broker that
//! lost its state gets them back). Meanwhile the outbox keeps the events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agora_platform::error::{Error, ErrorKind};
use agora_platform::server::HealthCheck;
use async_nats::connection::State;
use async_nats::jetstream;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backoff::{Backoff, exponential};
use crate::streams::{StreamSettings, ensure_streams};

/// A NATS client, its JetStream context, and whether the streams are ready.
/// Cheap to clone; the background upkeep stops when the last clone drops.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    streams_ready: Arc<AtomicBool>,
    ready_changed: Arc<Notify>,
    _upkeep: DropGuard,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("state", &self.inner.client.connection_state())
            .field("streams_ready", &self.streams_ready())
            .finish()
    }
}

/// How long a JetStream request (a publish ack, a stream lookup) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl EventBus {
    /// Connects to `url` in the background (this returns at once, even when
    /// NATS is down) as `name` (shown by the server, e.g. `agora-users`), and
    /// creates or updates the streams to `settings` whenever it connects:
    /// for the services, which own the streams.
    pub async fn connect(url: &str, name: &str, settings: StreamSettings) -> Result<Self, Error> {
        Self::connect_with(url, name, Some(settings)).await
    }

    /// Connects like [`Self::connect`] but never creates or changes a
    /// stream: for tools (`agora events`), which must not resize production
    /// streams or create them on someone else's server.
    pub async fn connect_as_tool(url: &str, name: &str) -> Result<Self, Error> {
        Self::connect_with(url, name, None).await
    }

    async fn connect_with(
        url: &str,
        name: &str,
        settings: Option<StreamSettings>,
    ) -> Result<Self, Error> {
        let reconnected = Arc::new(Notify::new());
        let on_event = Arc::clone(&reconnected);
        let (address, credentials) = split_credentials(url);
        let mut options = async_nats::ConnectOptions::new();
        options = match credentials {
            Some(Credentials::UserPassword(user, password)) => {
                options.user_and_password(user, password)
            }
            Some(Credentials::Token(token)) => options.token(token),
            None => options,
        };
        let client = options
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            // Come back quickly after a broker restart, but do not hammer a
            // broker that stays down.
            .reconnect_delay_callback(|attempts| {
                let attempt = u32::try_from(attempts).unwrap_or(u32::MAX);
                exponential(attempt, Duration::from_millis(100), Duration::from_secs(2))
            })
            .event_callback(move |event| {
                let on_event = Arc::clone(&on_event);
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            on_event.notify_one();
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; events wait in the outbox");
                        }
                        other => tracing::debug!(event = %other, "NATS client event"),
                    }
                }
            })
            .connect(address.as_str())
            .await
            .map_err(|err| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("bad NATS url {:?}", redact_url(url)),
                )
                .with_source(err)
            })?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        // A tool does not look after streams: connected is ready.
        let streams_ready = Arc::new(AtomicBool::new(settings.is_none()));
        let ready_changed = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        if let Some(settings) = settings {
            tokio::spawn(keep_streams(
                client.clone(),
                jetstream.clone(),
                settings,
                Arc::clone(&streams_ready),
                Arc::clone(&ready_changed),
                reconnected,
                stop.clone(),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                jetstream,
                streams_ready,
                ready_changed,
                _upkeep: stop.drop_guard(),
            }),
        })
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }

    /// The plain NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Connected now, and the streams exist.
    pub fn streams_ready(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
            && self.inner.streams_ready.load(Ordering::Acquire)
    }

    /// Waits until [`Self::streams_ready`].
    pub async fn wait_ready(&self) {
        loop {
            let changed = self.inner.ready_changed.notified();
            if self.streams_ready() {
                return;
            }
            // Also re-check now and then: the connection state has no signal here.
            let _ = tokio::time::timeout(Duration::from_millis(250), changed).await;
        }
    }
}

/// Ensures the streams whenever the client (re)connects, retrying with a
/// backoff until it succeeds.
async fn keep_streams(
    client: async_nats::Client,
    jetstream: jetstream::Context,
    settings: StreamSettings,
    ready: Arc<AtomicBool>,
    ready_changed: Arc<Notify>,
    reconnected: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if client.connection_state() == State::Connected {
            match ensure_streams(&jetstream, &settings).await {
                Ok(()) => {
                    ready.store(true, Ordering::Release);
                    ready_changed.notify_waiters();
                    backoff.reset();
                    tokio::select! {
                        () = reconnected.notified() => {}
                        () = stop.cancelled() => return,
                    }
                    // After a reconnect: ensure again before saying ready.
                    ready.store(false, Ordering::Release);
                    continue;
                }
                Err(err) => tracing::warn!(error = %err, "cannot set up the JetStream streams yet"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = reconnected.notified() => {}
            () = stop.cancelled() => return,
        }
    }
}

/// NATS as a dependency: a failure means "degraded" (events are delayed in
/// the outbox), not "cannot serve"; see [`agora_platform::server::HostedService::with_degraded_check`].
impl HealthCheck for EventBus {
    fn name(&self) -> &str {
        "nats"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            match self.inner.client.connection_state() {
                State::Connected if self.inner.streams_ready.load(Ordering::Acquire) => Ok(()),
                State::Connected => Err(Error::new(
                    ErrorKind::Unavailable,
                    "connected to NATS, JetStream streams not ready",
                )),
                _ => Err(Error::new(ErrorKind::Unavailable, "NATS is unreachable")),
            }
        })
    }
}

/// `url` split into the address and its credentials: async-nats does not
/// read `user:password@` or `token@` from a URL, so they are passed as
/// options.
fn split_credentials(url: &str) -> (String, Option<Credentials>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some((userinfo, host)) = rest[..authority_end].rsplit_once('@') else {
        return (url.to_owned(), None);
    };
    let address = format!("{scheme}://{host}{}", &rest[authority_end..]);
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => Credentials::UserPassword(user.to_owned(), password.to_owned()),
        None => Credentials::Token(userinfo.to_owned()),
    };
    (address, Some(credentials))
}

/// What a NATS URL may carry to log in with.
enum Credentials {
    UserPassword(String, String),
    Token(String),
}

/// `url` without its secret (`nats://user:pass@host` becomes
/// `nats://user:***@host`, `nats://token@host` becomes `nats://***@host`),
/// for messages and logs.
pub fn redact_url(url: &str) -> String {
    match split_credentials(url) {
        (address, Some(credentials)) => {
            let shown = match credentials {
                Credentials::UserPassword(user, _) => format!("{user}:***@"),
                Credentials::Token(_) => "***@".to_owned(),
            };
            address.replacen("://", &format!("://{shown}"), 1)
        }
        (address, None) => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact_url("nats://app:s3cret@nats:4222"),
            "nats://app:***@nats:4222"
        );
        assert_eq!(
            redact_url("nats://s3cr3t-token@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(redact_url("tls://a:b@h:1/x"), "tls://a:***@h:1/x");
    }
}
