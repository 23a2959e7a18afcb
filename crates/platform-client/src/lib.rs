//! The client stack every Agora service calls another one with.
//!
//! ```ignore
//! let clients = Clients::new(&config, "orders", discovery, credentials)?;
//! let payments = clients.channel(
//!     "payments",
//!     CallPolicy::idempotent_methods(["/agora.payments.v1.PaymentService/GetPayment"]),
//! )?;
//! let mut client = PaymentServiceClient::new(payments);
//! ```
//!
//! A [`ServiceChannel`] is a cloneable tower service that tonic's generated
//! clients accept. Every call through it, outermost first:
//! 1. gets a client span and the W3C `traceparent` of it ([`trace`]);
//! 2. carries the caller's service token ([`credentials`]);
//! 3. gets a deadline: the shortest of `clients.default_timeout_ms`, the
//!    caller's own timeout and what is left of the request being served
//!    ([`deadline`]); a call with no time left is not sent;
//! 4. is retried on UNAVAILABLE, if the caller marked the method
//!    idempotent, within a retry budget and the deadline ([`retry`]);
//! 5. goes to one of the service's healthy instances, the less busy of two
//!    picked at random ([`balance`]), as discovery currently knows them
//!    ([`discovery`], [`registry`]);
//! 6. passes that instance's circuit breaker ([`breaker`]);
//! 7. and leaves on a lazily connected HTTP/2 channel ([`endpoint`]).
//!
//! # Layout
//! - [`Clients`]: the stacks of one calling service, built from configuration.
//! - [`ServiceChannel`], [`CallPolicy`], [`Credentials`]: one target service.
//! - [`discovery`]: [`Discovery`], static addresses or the NATS registry.
//! - [`registry`]: registering an instance in NATS with heartbeats, watching
//!   a service's instances, listing them (`agora registry`).
//! - [`trace`], [`credentials`], [`deadline`], [`retry`], [`balance`],
//!   [`breaker`], [`endpoint`]: the layers, in the order above.
//! - [`call`]: what the layers tell each other about one call.

#![forbid(unsafe_code)]

pub mod balance;
pub mod breaker;
pub mod call;
pub mod credentials;
pub mod deadline;
pub mod discovery;
pub mod endpoint;
pub mod registry;
pub mod retry;
pub mod trace;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agora_platform::config::{ClientsConfig, Config};
use agora_platform::error::{Error, ErrorKind};
use tower::ServiceBuilder;

pub use breaker::{BreakerSettings, BreakerState};
pub use credentials::Credentials;
pub use discovery::Discovery;

/// The response future of every layer.
pub type ResponseFuture =
    futures::future::BoxFuture<'static, Result<http::Response<tonic::body::Body>, tonic::Status>>;

/// What each layer wraps: the rest of the stack below it, a cloneable
/// service from a gRPC request to a response or a status.
pub trait CallService:
    tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = tonic::Status,
        Future = ResponseFuture,
    > + Clone
    + Send
    + 'static
{
}

impl<S> CallService for S where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = tonic::Status,
            Future = ResponseFuture,
        > + Clone
        + Send
        + 'static
{
}

/// The settings of the stack, read from [`ClientsConfig`].
#[derive(Clone, Copy, Debug)]
pub struct ClientSettings {
    /// Deadline of a call unless a shorter one is given.
    pub default_timeout: Duration,
    /// Retries of an idempotent call after UNAVAILABLE.
    pub max_retries: u32,
    /// Retries allowed on top of calls, in percent.
    pub retry_budget_percent: u32,
    /// When an endpoint's breaker opens and how long it stays open.
    pub breaker: BreakerSettings,
    /// Time between heartbeats of a registered instance.
    pub heartbeat: Duration,
    /// A registered instance not heard of for this long, while the registry
    /// can be heard, is gone.
    pub instance_ttl: Duration,
}

impl ClientSettings {
    /// The settings of `config`, checked.
    pub fn from_config(config: &ClientsConfig) -> Result<Self, Error> {
        let invalid = |message: &str| Err(Error::new(ErrorKind::InvalidArgument, message));
        if config.default_timeout_ms == 0 {
            return invalid("clients.default_timeout_ms must be above 0");
        }
        // A breaker opening on no failure at all, or half-opening at once,
        // is not a breaker: refused rather than silently changed.
        if config.breaker_failure_threshold == 0 {
            return invalid("clients.breaker_failure_threshold must be above 0");
        }
        if config.breaker_recovery_ms == 0 {
            return invalid("clients.breaker_recovery_ms must be above 0");
        }
        if config.heartbeat_secs == 0 {
            return invalid("clients.heartbeat_secs must be above 0");
        }
        if config.instance_ttl_secs <= config.heartbeat_secs {
            return invalid("clients.instance_ttl_secs must be longer than clients.heartbeat_secs");
        }
        Ok(Self {
            default_timeout: Duration::from_millis(config.default_timeout_ms),
            max_retries: config.max_retries,
            retry_budget_percent: config.retry_budget_percent,
            breaker: BreakerSettings {
                failure_threshold: config.breaker_failure_threshold,
                recovery: Duration::from_millis(config.breaker_recovery_ms),
            },
            heartbeat: Duration::from_secs(config.heartbeat_secs),
            instance_ttl: Duration::from_secs(config.instance_ttl_secs),
        })
    }
}

/// Which methods of a service may be sent again after UNAVAILABLE: those
/// whose repetition has no further effect (reads, and writes keyed by an
/// idempotency key). Only unary methods belong here: the request body is
/// buffered so that it can be sent again, which a client stream cannot be.
#[derive(Clone, Debug, Default)]
pub struct CallPolicy {
    idempotent: Arc<HashSet<String>>,
}

impl CallPolicy {
    /// No method is retried.
    pub fn no_retries() -> Self {
        Self::default()
    }

    /// These methods, by their full gRPC path
    /// (`/agora.payments.v1.PaymentService/GetPayment`), are retried.
    pub fn idempotent_methods<I, S>(paths: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let idempotent = paths
            .into_iter()
            .map(|path| format!("/{}", path.as_ref().trim_start_matches('/')))
            .collect();
        Self {
            idempotent: Arc::new(idempotent),
        }
    }

    /// Whether the method at `path` may be retried.
    pub fn is_idempotent(&self, path: &str) -> bool {
        self.idempotent.contains(path)
    }
}

/// The client stacks of one calling service: one [`ServiceChannel`] per
/// target service, sharing discovery. Cheap to clone.
#[derive(Clone)]
pub struct Clients {
    caller: Arc<str>,
    config: Arc<Config>,
    settings: ClientSettings,
    resolver: Arc<discovery::Resolver>,
    credentials: Credentials,
}

impl fmt::Debug for Clients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clients")
            .field("caller", &self.caller)
            .field("settings", &self.settings)
            .field("discovery", self.resolver.discovery())
            .finish_non_exhaustive()
    }
}

impl Clients {
    /// The stacks service `caller` calls others with: `config.clients`
    /// settings, instances found by `discovery`, each call authorized with
    /// the token `credentials` returns for its target.
    pub fn new(
        config: &Config,
        caller: &str,
        discovery: Discovery,
        credentials: Credentials,
    ) -> Result<Self, Error> {
        let settings = ClientSettings::from_config(&config.clients)?;
        Ok(Self {
            caller: Arc::from(caller),
            config: Arc::new(config.clone()),
            settings,
            resolver: Arc::new(discovery::Resolver::new(discovery)),
            credentials,
        })
    }

    /// The settings every channel uses.
    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// A channel to service `service` (`payments`, ...), retrying what
    /// `policy` allows. Needs a Tokio runtime (discovery runs in the
    /// background).
    pub fn channel(&self, service: &str, policy: CallPolicy) -> Result<ServiceChannel, Error> {
        let targets = self
            .resolver
            .targets(service, &self.config, &self.settings)?;
        let balancer = Arc::new(balance::Balancer::new(
            service,
            targets,
            self.settings.breaker,
        ));
        let stack = ServiceBuilder::new()
            // Outermost: one client span per call, retries included, so the
            // trace shows the call as the caller saw it and every attempt
            // carries the same parent.
            .layer(trace::TraceLayer::new(service))
            // The token is the same for every attempt: added once, before
            // anything may fail on the caller's behalf.
            .layer(credentials::CredentialsLayer::new(
                service,
                Arc::clone(&self.credentials),
            ))
            // The deadline is fixed before retries, so that all attempts
            // and the waits between them share one budget.
            .layer(deadline::DeadlineLayer::new(
                service,
                self.settings.default_timeout,
            ))
            // Retries sit above balancing, so a retry may go to another
            // instance (the ones tried are avoided).
            .layer(retry::RetryLayer::new(service, policy, &self.settings))
            // Picks an instance; below it, each instance has its own
            // breaker and connection (see `balance`).
            .service(balance::Balance::new(Arc::clone(&balancer)));
        tracing::debug!(caller = %self.caller, service, "client stack ready");
        Ok(ServiceChannel { stack, balancer })
    }
}

type Stack =
    trace::Traced<credentials::Authorized<deadline::Deadlined<retry::Retrying<balance::Balance>>>>;

/// Calls to one service through the whole stack; pass it to a generated
/// client (`PaymentServiceClient::new(channel)`). Cheap to clone: clones
/// share instances, breakers and the retry budget.
#[derive(Clone)]
pub struct ServiceChannel {
    stack: Stack,
    balancer: Arc<balance::Balancer>,
}

impl fmt::Debug for ServiceChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceChannel")
            .field("service", &self.balancer.service())
            .field("breakers", &self.breaker_states())
            .finish()
    }
}

impl ServiceChannel {
    /// The target service.
    pub fn service(&self) -> &str {
        self.balancer.service()
    }

    /// Every instance discovery currently offers (healthy and recently
    /// seen) and the state of its circuit breaker, by address.
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        self.balancer.breaker_states()
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for ServiceChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.stack, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        tower::Service::call(&mut self.stack, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_can_be_shared_between_tasks() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<ServiceChannel>();
        shareable::<Clients>();
    }

    #[test]
    fn idempotent_methods_are_matched_by_full_path() {
        let policy = CallPolicy::idempotent_methods([
            "/agora.payments.v1.PaymentService/GetPayment",
            "agora.payments.v1.PaymentService/Refund",
        ]);
        assert!(policy.is_idempotent("/agora.payments.v1.PaymentService/GetPayment"));
        assert!(policy.is_idempotent("/agora.payments.v1.PaymentService/Refund"));
        assert!(!policy.is_idempotent("/agora.payments.v1.PaymentService/Charge"));
        assert!(
            !CallPolicy::no_retries().is_idempotent("/agora.payments.v1.PaymentService/GetPayment")
        );
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let mut config = ClientsConfig::default();
        assert!(ClientSettings::from_config(&config).is_ok());
        config.instance_ttl_secs = config.heartbeat_secs;
        assert!(ClientSettings::from_config(&config).is_err());
        let refused = |config: ClientsConfig| {
            ClientSettings::from_config(&config)
                .expect_err("refused")
                .to_string()
        };
        assert!(
            refused(ClientsConfig {
                default_timeout_ms: 0,
                ..ClientsConfig::default()
            })
            .contains("clients.default_timeout_ms must be above 0")
        );
        assert!(
            refused(ClientsConfig {
                breaker_failure_threshold: 0,
                ..ClientsConfig::default()
            })
            .contains("clients.breaker_failure_threshold must be above 0")
        );
        assert!(
            refused(ClientsConfig {
                breaker_recovery_ms: 0,
                ..ClientsConfig::default()
            })
            .contains("clients.breaker_recovery_ms must be above 0")
        );
    }
}
