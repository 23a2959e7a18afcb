//! The service registry: instances of each service in a NATS key-value
//! bucket, for `clients.discovery = "nats"`.
//!
//! The bucket `agora_services` (file storage, one revision per key, entries
//! expiring `clients.instance_ttl_secs` after their last write) holds one key
//! per instance, `<service>.<instance_id>`, whose value is an [`Instance`] as
//! JSON. A running instance ([`Registration::run`]) writes it again every
//! `clients.heartbeat_secs` with its current health and time, and deletes it
//! on shutdown; a killed one stops writing and its key expires by itself.
//!
//! Clients follow the keys `<service>.*` ([`watch_service`]): the current
//! values first, then every change. An instance is added on a put, removed
//! at once on a delete (it deregistered), skipped while it is not SERVING,
//! and dropped once no put of it has been received for the TTL. That age is
//! measured on the client's own monotonic clock from when the put arrived,
//! not from `last_seen` (another host's clock), and only while the watch
//! works: while NATS is unreachable no heartbeat can arrive, which says
//! nothing about the instances, so the known set is kept and dead
//! instances are left to the breakers. (An expiry marker or purge removes
//! nothing by itself: the entry goes when it is stale by that clock. So
//! entries NATS expired while it was down, and which the watch opened after
//! the outage no longer shows, do not empty the set before their instances
//! can write again.) At most [`MAX_INSTANCES_PER_SERVICE`] instances of a
//! service are followed.
//!
//! NATS may be down when either side starts, or restart under them:
//! registrations keep writing every heartbeat until it works (creating the
//! bucket if it is missing), and a watch that fails or outlives its
//! connection is opened again, with the current values, after a pause that
//! grows while it keeps failing.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agora_platform::backoff::Backoff;
use agora_platform::error::{Error, ErrorKind};
use agora_platform::time::now_micros;
use async_nats::connection::State;
use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ClientSettings;
use crate::discovery::{Target, Targets};

/// The key-value bucket of the registry.
pub const BUCKET: &str = "agora_services";

/// The most instances of one service a client follows. Every entry costs
/// each client of the service a channel, a circuit breaker and a series of
/// the breaker gauge, so a flood of bogus registrations (a bug, a
/// misconfigured fleet, a hostile writer) must not grow them without bound.
/// Far above the replicas an Agora service runs; entries beyond it are
/// ignored, with a warning, until known instances leave.
pub const MAX_INSTANCES_PER_SERVICE: usize = 64;

/// How long one registry request (a put, opening the bucket) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for the instance's key to be deleted.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Pauses between attempts to watch the bucket again.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);
/// A watch that worked this long before it broke starts the pauses over.
const WATCH_STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often a watch checks its connection (a broker restart loses the
/// watch's consumer: it is opened again at once when the connection comes
/// back) and drops the instances not heard of within the TTL.
const HEALTH_CHECK: Duration = Duration::from_millis(250);
/// At most one warning per this long about entries over the cap.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Whether an instance says it can take calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// Its health checks pass.
    Serving,
    /// It is starting, failing a dependency, or shutting down.
    NotServing,
}

impl Health {
    /// `SERVING` or `NOT_SERVING`, as in `grpc.health.v1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "SERVING",
            Self::NotServing => "NOT_SERVING",
        }
    }
}

/// One registered instance: the value of its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The service it runs (`payments`).
    pub service: String,
    /// Unique per running instance.
    pub instance_id: String,
    /// What clients dial (`http://10.1.2.3:50054`).
    pub address: String,
    /// Its health at the last heartbeat.
    pub health: Health,
    /// Its last heartbeat, in microseconds since the Unix epoch.
    pub last_seen: i64,
}

impl Instance {
    /// Its key in the bucket.
    pub fn key(&self) -> String {
        format!("{}.{}", self.service, self.instance_id)
    }
}

/// Refuses a service name that cannot be one token of a key (letters,
/// digits, `-` and `_`).
pub fn check_service_name(service: &str) -> Result<(), Error> {
    if is_token(service) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("bad service name {service:?}: use letters, digits, '-' and '_'"),
        ))
    }
}

fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One instance of a service to keep registered while it runs.
#[derive(Clone, Debug)]
pub struct Registration {
    service: String,
    instance_id: String,
    address: String,
}

impl Registration {
    /// Instance of `service` dialled at `address`, with a fresh instance id
    /// (the host name, as Kubernetes sets it to the pod's, plus a random
    /// suffix).
    pub fn new(service: &str, address: impl Into<String>) -> Result<Self, Error> {
        check_service_name(service)?;
        let host: String = std::env::var("HOSTNAME")
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let host = if host.is_empty() {
            "agora".to_owned()
        } else {
            host
        };
        Ok(Self {
            service: service.to_owned(),
            instance_id: format!("{host}-{:08x}", rand::random::<u32>()),
            address: address.into(),
        })
    }

    /// Replaces the instance id (letters, digits, `-` and `_`).
    pub fn with_instance_id(mut self, instance_id: &str) -> Result<Self, Error> {
        if !is_token(instance_id) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("bad instance id {instance_id:?}: use letters, digits, '-' and '_'"),
            ));
        }
        self.instance_id = instance_id.to_owned();
        Ok(self)
    }

    /// The instance id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The address registered.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn record(&self, health: Health) -> Instance {
        Instance {
            service: self.service.clone(),
            instance_id: self.instance_id.clone(),
            address: self.address.clone(),
            health,
            last_seen: now_micros(),
        }
    }

    /// Registers the instance and heartbeats every `settings.heartbeat`
    /// with the health `health` reports, until `stop` is cancelled; then
    /// deletes the key (waiting up to 2 s) and returns. NATS being
    /// unreachable is logged and retried at every heartbeat.
    pub async fn run<H, F>(
        self,
        client: async_nats::Client,
        settings: ClientSettings,
        mut health: H,
        stop: CancellationToken,
    ) where
        H: FnMut() -> F,
        F: Future<Output = Health>,
    {
        let jetstream = context(client);
        let key = self.record(Health::NotServing).key();
        let mut bucket: Option<kv::Store> = None;
        let mut registered: Option<Health> = None;
        let mut failing = false;
        let mut ticker = tokio::time::interval(settings.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.cancelled() => break,
            }
            // A health check that hangs says what it needs to.
            let current = tokio::select! {
                current = tokio::time::timeout(settings.heartbeat, health()) => {
                    current.unwrap_or(Health::NotServing)
                }
                () = stop.cancelled() => break,
            };
            let record = self.record(current);
            let put = async {
                let store = match bucket.take() {
                    Some(store) => store,
                    None => open_bucket(&jetstream, settings.instance_ttl).await?,
                };
                let value = serde_json::to_vec(&record)
                    .map_err(|err| Error::internal("encoding an instance", err))?;
                store
                    .put(&key, value.into())
                    .await
                    .map_err(|err| unavailable("cannot write to the service registry", err))?;
                Ok::<_, Error>(store)
            };
            let put = tokio::select! {
                put = tokio::time::timeout(REQUEST_TIMEOUT, put) => put,
                () = stop.cancelled() => break,
            };
            match put {
                Ok(Ok(store)) => {
                    bucket = Some(store);
                    failing = false;
                    if registered != Some(current) {
                        tracing::info!(
                            service = %self.service, instance = %self.instance_id,
                            address = %self.address, health = current.as_str(),
                            "registered in the service registry"
                        );
                        registered = Some(current);
                    }
                }
                Ok(Err(err)) => {
                    if !failing {
                        tracing::warn!(
                            service = %self.service, instance = %self.instance_id, error = %err,
                            "cannot register in the service registry yet; retrying every heartbeat"
                        );
                    }
                    failing = true;
                }
                Err(_elapsed) => {
                    if !failing {
                        tracing::warn!(
                            service = %self.service, instance = %self.instance_id,
                            "the service registry does not answer; retrying every heartbeat"
                        );
                    }
                    failing = true;
                }
            }
        }
        let deregister = async {
            let store = match bucket {
                Some(store) => store,
                None => open_bucket(&jetstream, settings.instance_ttl).await?,
            };
            store
                .delete(&key)
                .await
                .map_err(|err| unavailable("cannot delete from the service registry", err))
        };
        match tokio::time::timeout(DEREGISTER_TIMEOUT, deregister).await {
            Ok(Ok(())) => tracing::info!(
                service = %self.service, instance = %self.instance_id,
                "deregistered from the service registry"
            ),
            Ok(Err(err)) => tracing::warn!(
                service = %self.service, instance = %self.instance_id, error = %err,
                "cannot deregister; the entry expires by itself"
            ),
            Err(_elapsed) => tracing::warn!(
                service = %self.service, instance = %self.instance_id,
                "deregistration timed out; the entry expires by itself"
            ),
        }
    }
}

/// Follows the instances of `service` in the background, for as long as the
/// returned value (or a clone) is held.
pub fn watch_service(
    client: async_nats::Client,
    service: &str,
    settings: &ClientSettings,
) -> Result<Targets, Error> {
    check_service_name(service)?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|err| {
        Error::new(
            ErrorKind::Internal,
            "following the service registry needs a Tokio runtime",
        )
        .with_source(err)
    })?;
    let (sender, targets) = watch::channel(Arc::from(Vec::new()));
    runtime.spawn(follow(
        client,
        service.to_owned(),
        settings.instance_ttl,
        sender,
    ));
    Ok(targets)
}

async fn follow(
    client: async_nats::Client,
    service: String,
    instance_ttl: Duration,
    sender: watch::Sender<Arc<[Target]>>,
) {
    let jetstream = context(client.clone());
    let filter = format!("{service}.*");
    let mut followed = Followed::new(&service, instance_ttl);
    // The pause before opening the watch again: doubling while opening
    // fails or the watch keeps breaking, back to the minimum once a watch
    // has worked for WATCH_STABLE_AFTER.
    let mut backoff = Backoff::new(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
    let mut failing = false;
    // Since when nothing could be heard (no watch, or no connection); the
    // TTL does not run meanwhile.
    let mut deaf_since: Option<Instant> = Some(Instant::now());
    loop {
        let opened = async {
            let store = open_bucket(&jetstream, instance_ttl).await?;
            store
                .watch_with_history(&filter)
                .await
                .map_err(|err| unavailable("cannot watch the service registry", err))
        };
        let opened = tokio::select! {
            opened = tokio::time::timeout(REQUEST_TIMEOUT, opened) => opened,
            () = sender.closed() => return,
        };
        let mut entries = match opened {
            Ok(Ok(entries)) => entries,
            failed => {
                if !failing {
                    let error = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "the service registry does not answer".to_owned(),
                    };
                    tracing::warn!(
                        service,
                        error,
                        "cannot follow the service registry yet; retrying"
                    );
                }
                failing = true;
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = sender.closed() => return,
                }
                continue;
            }
        };
        if failing {
            tracing::info!(service, "following the service registry again");
        }
        failing = false;
        let opened_at = Instant::now();
        if let Some(since) = deaf_since.take() {
            followed.forgive(since, opened_at);
        }

        // The values replayed first are the registry as it is now; entries
        // known from before and not replayed (NATS lost them, or they were
        // deleted while nobody watched) go when they are stale.
        let mut health_check = tokio::time::interval(HEALTH_CHECK);
        let mut was_connected = true;
        let broke = loop {
            tokio::select! {
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => {
                        if followed.apply(&entry.key, entry.operation, &entry.value, Instant::now()) {
                            sender.send_replace(followed.targets());
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(service, error = %err, "service registry watch failed; watching again");
                        break Broke::Failed;
                    }
                    None => {
                        tracing::warn!(service, "service registry watch ended; watching again");
                        break Broke::Failed;
                    }
                },
                _ = health_check.tick() => {
                    let connected = client.connection_state() == State::Connected;
                    if connected && !was_connected {
                        tracing::debug!(service, "reconnected to NATS; watching the registry again");
                        break Broke::Reconnected;
                    }
                    was_connected = connected;
                    if !connected {
                        // Nothing can arrive: keep what is known.
                        deaf_since.get_or_insert_with(Instant::now);
                    } else if followed.drop_stale(Instant::now()) {
                        sender.send_replace(followed.targets());
                    }
                }
                () = sender.closed() => return,
            }
        };
        deaf_since.get_or_insert_with(Instant::now);
        if opened_at.elapsed() >= WATCH_STABLE_AFTER {
            backoff.reset();
        }
        if broke == Broke::Failed {
            // A watch that breaks as soon as it is opened must not be
            // reopened in a tight loop: the same pause as a failed open.
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = sender.closed() => return,
            }
        }
    }
}

/// Why a watch was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broke {
    /// It failed or ended: watched again after a pause.
    Failed,
    /// The connection came back (its consumer is lost): watched again at once.
    Reconnected,
}

/// An instance as a watch knows it.
#[derive(Debug)]
struct Known {
    instance: Instance,
    /// When its last put arrived, on this process's clock (moved on by the
    /// time nothing could be heard).
    received: Instant,
}

/// The instances of one service, as its watch learns of them.
struct Followed {
    service: String,
    ttl: Duration,
    known: BTreeMap<String, Known>,
    /// Entries ignored over the cap since the last warning, and when that was.
    over_cap: u64,
    warned_over_cap: Option<Instant>,
}

impl Followed {
    fn new(service: &str, ttl: Duration) -> Self {
        Self {
            service: service.to_owned(),
            ttl,
            known: BTreeMap::new(),
            over_cap: 0,
            warned_over_cap: None,
        }
    }

    /// Applies one change of the bucket, received at `now`; whether the
    /// instances changed.
    fn apply(&mut self, key: &str, operation: kv::Operation, value: &[u8], now: Instant) -> bool {
        match operation {
            kv::Operation::Put => match serde_json::from_slice::<Instance>(value) {
                Ok(instance) => {
                    if !self.known.contains_key(key)
                        && self.known.len() >= MAX_INSTANCES_PER_SERVICE
                    {
                        self.ignore_over_cap(key, now);
                        return false;
                    }
                    self.known.insert(
                        key.to_owned(),
                        Known {
                            instance,
                            received: now,
                        },
                    );
                    true
                }
                Err(err) => {
                    tracing::warn!(key, error = %err, "ignoring a malformed registry entry");
                    self.known.remove(key).is_some()
                }
            },
            // Deleted on shutdown: the instance is leaving.
            kv::Operation::Delete => self.known.remove(key).is_some(),
            // Expired (the marker NATS writes when an entry's age runs out,
            // also for entries it expired while it was down) or purged: the
            // entry is no longer written, and goes when it is stale here.
            kv::Operation::Purge => false,
        }
    }

    fn ignore_over_cap(&mut self, key: &str, now: Instant) {
        self.over_cap += 1;
        let due = self
            .warned_over_cap
            .is_none_or(|warned| now.saturating_duration_since(warned) >= CAP_WARNING_INTERVAL);
        if due {
            tracing::warn!(
                service = %self.service, key, ignored = self.over_cap,
                limit = MAX_INSTANCES_PER_SERVICE,
                "too many instances registered for one service; ignoring the extra entries"
            );
            self.warned_over_cap = Some(now);
            self.over_cap = 0;
        }
    }

    /// Drops the instances not heard of for the TTL by `now` (called only
    /// while the watch works); whether any was.
    fn drop_stale(&mut self, now: Instant) -> bool {
        let before = self.known.len();
        let ttl = self.ttl;
        self.known
            .retain(|_, known| now.saturating_duration_since(known.received) <= ttl);
        self.known.len() != before
    }

    /// The watch could hear nothing from `since` to `now`: that time does
    /// not count towards any instance's TTL (an instance NATS lost meanwhile
    /// has what was left of its TTL to write itself in again).
    fn forgive(&mut self, since: Instant, now: Instant) {
        let deaf_for = now.saturating_duration_since(since);
        for known in self.known.values_mut() {
            known.received = known
                .received
                .checked_add(deaf_for)
                .map_or(now, |received| received.min(now));
        }
    }

    fn targets(&self) -> Arc<[Target]> {
        self.known
            .values()
            .map(|known| Target {
                address: known.instance.address.clone(),
                serving: known.instance.health == Health::Serving,
                received: Some(known.received),
            })
            .collect()
    }
}

/// Every registered instance (expired ones excepted), sorted by key; empty
/// when the bucket does not exist yet. Never creates the bucket: for tools.
pub async fn list(client: async_nats::Client) -> Result<Vec<Instance>, Error> {
    let jetstream = context(client);
    match jetstream.get_stream(format!("KV_{BUCKET}")).await {
        Ok(_) => {}
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            return Ok(Vec::new());
        }
        Err(err) => return Err(unavailable("cannot read the service registry", err)),
    }
    let store = jetstream
        .get_key_value(BUCKET)
        .await
        .map_err(|err| unavailable("cannot read the service registry", err))?;
    let mut keys = store
        .keys()
        .await
        .map_err(|err| unavailable("cannot list the service registry", err))?;
    let mut instances = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|err| unavailable("cannot list the service registry", err))?;
        let Some(value) = store
            .get(&key)
            .await
            .map_err(|err| unavailable("cannot read the service registry", err))?
        else {
            continue;
        };
        match serde_json::from_slice::<Instance>(&value) {
            Ok(instance) => instances.push(instance),
            Err(err) => tracing::warn!(key, error = %err, "ignoring a malformed registry entry"),
        }
    }
    instances.sort_by_key(Instance::key);
    Ok(instances)
}

fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client)
}

/// The bucket, created or brought to these settings if needed.
async fn open_bucket(
    jetstream: &jetstream::Context,
    instance_ttl: Duration,
) -> Result<kv::Store, Error> {
    let config = kv::Config {
        bucket: BUCKET.to_owned(),
        description: "Agora service instances: <service>.<instance_id> -> address and health"
            .to_owned(),
        history: 1,
        max_age: instance_ttl,
        storage: jetstream::stream::StorageType::File,
        // An expired entry leaves a marker, so watchers learn of it (NATS
        // 2.11 and later); without, they skip it once it is stale.
        limit_markers: Some(instance_ttl.max(Duration::from_secs(1))),
        ..Default::default()
    };
    match jetstream.create_or_update_key_value(config.clone()).await {
        Ok(store) => Ok(store),
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::CreateKeyValueErrorKind::LimitMarkersNotSupported
            ) =>
        {
            jetstream
                .create_or_update_key_value(kv::Config {
                    limit_markers: None,
                    ..config
                })
                .await
                .map_err(|err| unavailable("cannot open the service registry", err))
        }
        Err(err) => Err(unavailable("cannot open the service registry", err)),
    }
}

fn unavailable(
    context: &str,
    err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> Error {
    let err = err.into();
    Error::new(ErrorKind::Unavailable, format!("{context}: {err}")).with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_json_with_the_documented_fields() {
        let instance = Instance {
            service: "payments".into(),
            instance_id: "pod-1-0000abcd".into(),
            address: "http://10.1.2.3:50054".into(),
            health: Health::NotServing,
            last_seen: 1_764_080_000_000_000,
        };
        let json = serde_json::to_value(&instance).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "service": "payments",
                "instance_id": "pod-1-0000abcd",
                "address": "http://10.1.2.3:50054",
                "health": "NOT_SERVING",
                "last_seen": 1_764_080_000_000_000_i64,
            })
        );
        assert_eq!(instance.key(), "payments.pod-1-0000abcd");
    }

    fn put(followed: &mut Followed, id: &str, health: Health, now: Instant) -> bool {
        let instance = Instance {
            service: "payments".into(),
            instance_id: id.into(),
            address: format!("http://{id}:1"),
            health,
            // Another host's clock: plays no part.
            last_seen: 0,
        };
        let value = serde_json::to_vec(&instance).expect("json");
        followed.apply(&instance.key(), kv::Operation::Put, &value, now)
    }

    fn addresses(followed: &Followed) -> Vec<String> {
        followed
            .targets()
            .iter()
            .map(|target| target.address.clone())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn instances_go_stale_by_local_receipt_and_only_while_heard() {
        let ttl = Duration::from_secs(10);
        let mut followed = Followed::new("payments", ttl);
        let start = Instant::now();
        assert!(put(&mut followed, "a", Health::Serving, start));
        assert!(put(&mut followed, "b", Health::NotServing, start));
        let secs = |n| start + Duration::from_secs(n);
        assert!(put(&mut followed, "a", Health::Serving, secs(6)));
        assert!(!followed.drop_stale(secs(10)));
        // `b` was last received 11 s ago.
        assert!(followed.drop_stale(secs(11)));
        assert_eq!(addresses(&followed), ["http://a:1"]);
        let targets = followed.targets();
        assert!(targets[0].serving);
        assert_eq!(targets[0].received, Some(secs(6)));

        // Deaf from 12 s to 40 s (NATS unreachable): that time does not
        // count, `a` has its remaining 4 s once the watch works again.
        followed.forgive(secs(12), secs(40));
        assert!(!followed.drop_stale(secs(44)));
        assert!(followed.drop_stale(secs(45)));
        assert!(addresses(&followed).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn deletes_remove_at_once_and_expiry_markers_wait_for_staleness() {
        let mut followed = Followed::new("payments", Duration::from_secs(10));
        let now = Instant::now();
        put(&mut followed, "a", Health::Serving, now);
        put(&mut followed, "b", Health::Serving, now);
        assert!(!followed.apply("payments.a", kv::Operation::Purge, &[], now));
        assert_eq!(addresses(&followed), ["http://a:1", "http://b:1"]);
        assert!(followed.apply("payments.b", kv::Operation::Delete, &[], now));
        assert_eq!(addresses(&followed), ["http://a:1"]);
        assert!(followed.apply("payments.a", kv::Operation::Put, b"{", now));
        assert!(
            addresses(&followed).is_empty(),
            "a malformed entry replaces"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn instances_over_the_cap_are_ignored_until_others_leave() {
        let mut followed = Followed::new("payments", Duration::from_secs(10));
        let now = Instant::now();
        for i in 0..MAX_INSTANCES_PER_SERVICE {
            assert!(put(&mut followed, &format!("i{i}"), Health::Serving, now));
        }
        assert!(!put(&mut followed, "extra", Health::Serving, now));
        assert!(!put(&mut followed, "extra2", Health::Serving, now));
        assert_eq!(followed.targets().len(), MAX_INSTANCES_PER_SERVICE);
        // Known ones still update.
        assert!(put(&mut followed, "i0", Health::NotServing, now));
        assert!(followed.apply("payments.i1", kv::Operation::Delete, &[], now));
        assert!(put(&mut followed, "extra", Health::Serving, now));
        assert!(addresses(&followed).contains(&"http://extra:1".to_owned()));
        assert_eq!(followed.targets().len(), MAX_INSTANCES_PER_SERVICE);
    }

    #[test]
    fn watch_pauses_grow_until_a_watch_has_worked_a_while() {
        let mut backoff = Backoff::new(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
        let pauses: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert_eq!(pauses[0], WATCH_RETRY_MIN);
        assert_eq!(pauses[1], WATCH_RETRY_MIN * 2);
        assert!(pauses.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(pauses[7], WATCH_RETRY_MAX);
        backoff.reset();
        assert_eq!(backoff.next_delay(), WATCH_RETRY_MIN);
    }

    #[test]
    fn names_must_be_single_key_tokens() {
        assert!(check_service_name("payments").is_ok());
        assert!(check_service_name("pay.ments").is_err());
        assert!(check_service_name("").is_err());
        assert!(check_service_name("a*").is_err());
        let registration = Registration::new("payments", "http://x:1").expect("valid");
        assert!(is_token(registration.instance_id()));
        assert!(registration.clone().with_instance_id("a.b").is_err());
        assert_eq!(
            registration
                .with_instance_id("one")
                .expect("valid")
                .instance_id(),
            "one"
        );
    }
}
