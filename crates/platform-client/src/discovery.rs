//! Where the instances of a service are: fixed addresses from configuration,
//! or the NATS registry, where instances come and go.
//!
//! Either way a channel sees a [`Targets`] value it re-reads before each
//! call; an instance is called only while [`Target::is_live`] (it says it
//! serves). Registry instances not heard of within
//! `clients.instance_ttl_secs` are dropped from [`Targets`] by the watch
//! itself, which alone knows whether anything could be heard
//! ([`crate::registry`]).

use agora_platform::config::Config;
use agora_platform::error::{Error, ErrorKind};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;
use tokio::time::Instant;

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
    /// When this process last received its registry entry, by its own
    /// monotonic clock (the registering host's clock plays no part, so
    /// skew between hosts does not matter); `None` for configured
    /// addresses.
    pub received: Option<Instant>,
}

impl Target {
    /// A configured address: always serving, never stale.
    pub fn fixed(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            serving: true,
            received: None,
        }
    }

    /// Whether calls may go to it: it says it serves. (Staleness is not
    /// judged here: the registry watch drops instances it has not heard of
    /// for the TTL while it could hear them, and keeps them while NATS is
    /// unreachable, leaving dead ones to the breakers.)
    pub fn is_live(&self) -> bool {
        self.serving
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
    fn instances_are_live_while_serving() {
        assert!(Target::fixed("http://a:1").is_live());
        let received = |serving: bool| Target {
            address: "http://a:1".into(),
            serving,
            received: Some(Instant::now()),
        };
        assert!(received(true).is_live());
        assert!(!received(false).is_live());
    }

    #[test]
    fn static_addresses_must_be_uris() {
        assert!(check_address("payments", "http://payments:50054").is_ok());
        assert!(check_address("payments", "payments:50054").is_err());
        assert!(check_address("payments", "").is_err());
    }
}
