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
//! on a delete, purge or expiry, and skipped while it is not SERVING or its
//! last heartbeat is older than the TTL (the check that holds even if an
//! expiry went unnoticed). NATS may be down when either side starts, or
//! restart under them: registrations keep writing every heartbeat until it
//! works (creating the bucket if it is missing), and a watch that fails or
//! outlives its connection is opened again, with the current values.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agora_platform::error::{Error, ErrorKind};
use agora_platform::time::now_micros;
use async_nats::connection::State;
use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ClientSettings;
use crate::discovery::{Target, Targets};

/// The key-value bucket of the registry.
pub const BUCKET: &str = "agora_services";

/// How long one registry request (a put, opening the bucket) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for the instance's key to be deleted.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Pauses between attempts to watch the bucket again.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a watch checks whether its connection came back (a broker
/// restart loses the watch's consumer: it is opened again at once).
const RECONNECT_CHECK: Duration = Duration::from_millis(250);

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

    fn target(&self) -> Target {
        Target {
            address: self.address.clone(),
            serving: self.health == Health::Serving,
            last_seen_micros: Some(self.last_seen),
        }
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
    let mut instances: BTreeMap<String, Instance> = BTreeMap::new();
    let mut pause = WATCH_RETRY_MIN;
    let mut failing = false;
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
                    () = tokio::time::sleep(pause) => {}
                    () = sender.closed() => return,
                }
                pause = (pause * 2).min(WATCH_RETRY_MAX);
                continue;
            }
        };
        if failing {
            tracing::info!(service, "following the service registry again");
        }
        failing = false;
        pause = WATCH_RETRY_MIN;

        // The values replayed first are the registry as it is now: entries
        // kept from before (this may be a new watch after an outage) and not
        // among them are dropped once the replay is over.
        let mut replayed: Option<HashSet<String>> = Some(HashSet::new());
        let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
        let mut was_connected = true;
        loop {
            tokio::select! {
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => {
                        apply(&mut instances, &entry);
                        if let Some(seen) = replayed.as_mut() {
                            seen.insert(entry.key.clone());
                            if entry.seen_current {
                                instances.retain(|key, _| seen.contains(key));
                                replayed = None;
                            }
                        }
                        let targets: Vec<Target> = instances.values().map(Instance::target).collect();
                        sender.send_replace(Arc::from(targets));
                    }
                    Some(Err(err)) => {
                        tracing::warn!(service, error = %err, "service registry watch failed; watching again");
                        break;
                    }
                    None => {
                        tracing::warn!(service, "service registry watch ended; watching again");
                        break;
                    }
                },
                _ = reconnect_check.tick() => {
                    let connected = client.connection_state() == State::Connected;
                    if connected && !was_connected {
                        tracing::debug!(service, "reconnected to NATS; watching the registry again");
                        break;
                    }
                    was_connected = connected;
                }
                () = sender.closed() => return,
            }
        }
    }
}

/// Applies one change of the bucket to `instances`.
fn apply(instances: &mut BTreeMap<String, Instance>, entry: &kv::Entry) {
    match entry.operation {
        kv::Operation::Put => match serde_json::from_slice::<Instance>(&entry.value) {
            Ok(instance) => {
                instances.insert(entry.key.clone(), instance);
            }
            Err(err) => {
                tracing::warn!(key = %entry.key, error = %err, "ignoring a malformed registry entry");
                instances.remove(&entry.key);
            }
        },
        // Deleted on shutdown, purged, or expired (a marker the server
        // writes when an entry's age runs out).
        kv::Operation::Delete | kv::Operation::Purge => {
            instances.remove(&entry.key);
        }
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
