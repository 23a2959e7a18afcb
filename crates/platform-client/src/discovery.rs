//! Where the instances of a service are: fixed addresses from configuration,
//! or the NATS registry, where instances come and go.
//!
//! Either way a channel sees a [`Targets`] value it re-reads before each
//! call; an instance is called only while [`Target::is_live`]: healthy, and
//! heard of within `clients.instance_ttl_secs` (registry instances).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agora_platform::config::Config;
use agora_platform::error::{Error, ErrorKind};
use tokio::sync::watch;

use crate::ClientSettings;

/// How a [`crate::Clients`] finds instances.
#[derive(Clone)]
pub enum Discovery {
    /// `<service>.addresses` of the configuration, else `http://<listen_addr>`
    /// of that service: one process, Compose, Kubernetes Service DNS.
    Static,
    /// The instances registered in the `agora_services` key-value bucket of
    /// this NATS connection ([`crate::registry`]), followed as they change.
    Nats(async_nats::Client),
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static => f.write_str("Static"),
            Self::Nats(client) => f
                .debug_tuple("Nats")
                .field(&client.connection_state())
                .finish(),
        }
    }
}

/// One instance a channel may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// What to dial: `http://host:port`.
    pub address: String,
    /// Whether the instance says it serves.
    pub serving: bool,
    /// Its last heartbeat, in microseconds since the Unix epoch; `None` for
    /// static addresses, which never go stale.
    pub last_seen_micros: Option<i64>,
}

impl Target {
    /// A configured address: always serving, never stale.
    pub fn fixed(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            serving: true,
            last_seen_micros: None,
        }
    }

    /// Whether calls may go to it at `now_micros`: it serves, and its last
    /// heartbeat is no older than `ttl`.
    pub fn is_live(&self, now_micros: i64, ttl: Duration) -> bool {
        let ttl_micros = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        self.serving
            && self
                .last_seen_micros
                .is_none_or(|seen| now_micros.saturating_sub(seen) <= ttl_micros)
    }
}

/// The current instances of one service, updated by discovery.
pub type Targets = watch::Receiver<Arc<[Target]>>;

/// Resolves service names to [`Targets`], sharing one registry watch per
/// service between all channels to it.
pub(crate) struct Resolver {
    discovery: Discovery,
    watched: Mutex<HashMap<String, Targets>>,
}

impl Resolver {
    pub(crate) fn new(discovery: Discovery) -> Self {
        Self {
            discovery,
            watched: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// The instances of `service`.
    pub(crate) fn targets(
        &self,
        service: &str,
        config: &Config,
        settings: &ClientSettings,
    ) -> Result<Targets, Error> {
        match &self.discovery {
            Discovery::Static => {
                let addresses = config
                    .service(service)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::InvalidArgument,
                            format!("unknown service {service:?}"),
                        )
                    })?
                    .dial_addresses();
                let mut targets = Vec::with_capacity(addresses.len());
                for address in addresses {
                    check_address(service, &address)?;
                    targets.push(Target::fixed(address));
                }
                // The sender may go: the value stays, and never changes.
                let (_fixed, targets) = watch::channel(Arc::from(targets));
                Ok(targets)
            }
            Discovery::Nats(client) => {
                crate::registry::check_service_name(service)?;
                let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
                // A watch whose task ended (its runtime is gone) is replaced.
                if let Some(targets) = watched.get(service)
                    && targets.has_changed().is_ok()
                {
                    return Ok(targets.clone());
                }
                let targets = crate::registry::watch_service(client.clone(), service, settings)?;
                watched.insert(service.to_owned(), targets.clone());
                Ok(targets)
            }
        }
    }
}

/// Refuses an address a channel could not dial.
fn check_address(service: &str, address: &str) -> Result<(), Error> {
    let valid = address
        .parse::<http::Uri>()
        .is_ok_and(|uri| uri.scheme().is_some() && uri.authority().is_some());
    if valid {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "bad address {address:?} for {service}: expected a URI such as http://{service}:50051"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_live_while_serving_and_recently_seen() {
        let ttl = Duration::from_secs(10);
        let now = 100_000_000;
        assert!(Target::fixed("http://a:1").is_live(now, ttl));
        let seen = |ago_secs: i64, serving: bool| Target {
            address: "http://a:1".into(),
            serving,
            last_seen_micros: Some(now - ago_secs * 1_000_000),
        };
        assert!(seen(9, true).is_live(now, ttl));
        assert!(seen(10, true).is_live(now, ttl));
        assert!(!seen(11, true).is_live(now, ttl));
        assert!(!seen(1, false).is_live(now, ttl));
    }

    #[test]
    fn static_addresses_must_be_uris() {
        assert!(check_address("payments", "http://payments:50054").is_ok());
        assert!(check_address("payments", "payments:50054").is_err());
        assert!(check_address("payments", "").is_err());
    }
}
