//! The gRPC server every Agora service runs in.
//!
//! ```ignore
//! let users = message_limits!(UserServiceServer::new(api), &config.server);
//! let app = Server::new()
//!     .limits(&config.server)
//!     .host(
//!         HostedService::new(SERVICE_NAME, users)
//!             .with_token_verifier(verifier)
//!             .with_check(db),
//!     )
//!     .bind(config.users.listen_addr)
//!     .await?;
//! app.run_until_stopped(shutdown).await?;
//! ```
//!
//! One server can host several services (monolith mode) on one port. Every
//! server also answers `grpc.health.v1.Health` (per service, from real
//! dependency checks), and reflection v1 and v1alpha listing exactly the
//! services it hosts. Before any handler runs, the caller's token is
//! verified and checked against the access level the contract declares for
//! the RPC ([`AccessLayer`], [`crate::access`]). Each handler runs within
//! the caller's `grpc-timeout` (cut to the server's maximum), or the
//! server's default for a unary call that states none ([`DeadlineLayer`],
//! [`crate::deadline`]), which bounds the calls it makes in turn.
//! [`Application::run_until_stopped`] turns health to NOT_SERVING on
//! shutdown, stops accepting, and lets in-flight calls finish for up to
//! [`Server::drain_timeout`].
//!
//! # Transport limits
//!
//! [`Server::limits`] takes `config.server` ([`ServerConfig`]), so that no
//! caller can take a process down:
//! - connections: at most `max_connections` open at once; the next is
//!   accepted only when one closes and waits in the kernel's backlog until
//!   then ([`ConnectionCap`]);
//! - HTTP/2: at most `max_concurrent_streams` streams per connection (a
//!   client queues the rest), keepalive pings every
//!   `keepalive_interval_secs` and TCP keepalive, so dead peers are dropped;
//! - load shedding ([`LoadShedLayer`]): each hosted service runs at most
//!   `max_in_flight_per_service` calls at once (a stream counts only until
//!   its answer starts, then gives its slot back: open streams are bounded
//!   by their own caps, `watch.*`, and never starve unary calls); one more
//!   is refused at once with RESOURCE_EXHAUSTED, reason `OVERLOADED` and
//!   `google.rpc.RetryInfo`, never queued. Health and reflection are never
//!   shed, so probes answer under load;
//! - deadlines ([`DeadlineLayer`]): a default of `default_timeout_ms` for
//!   unary calls that state none, and no stated deadline longer than
//!   `max_timeout_ms`: past it the handler is dropped and the caller gets
//!   DEADLINE_EXCEEDED. For a stream they bound only its setup; its
//!   lifetime is bounded by its own limits (`watch.*`);
//! - request messages ([`RequestLimitsLayer`]): each read whole, at most
//!   `max_request_bytes`, within `body_read_timeout_ms` of the call's
//!   headers (else DEADLINE_EXCEEDED, whatever the caller's deadline), and
//!   all of them together at most `max_buffered_request_bytes` (else
//!   RESOURCE_EXHAUSTED, `OVERLOADED`, with `RetryInfo`);
//! - message sizes: [`message_limits!`](crate::message_limits) applies
//!   `max_response_bytes` (and `max_request_bytes`) to each generated
//!   server, where the service builds it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::access::{AccessLevel, AccessTable};
use crate::auth::{Caller, TokenVerifier, VerifiedCaller};
use crate::config::ServerConfig;
use crate::db::Db;
use crate::error::{Error, ErrorKind};
use crate::limits::{RequestBudget, RequestLimitsLayer};

/// The name of the standard health service, as listed by reflection.
pub const HEALTH_SERVICE_NAME: &str = "grpc.health.v1.Health";

/// A dependency whose failure makes a service NOT_SERVING.
pub trait HealthCheck: Send + Sync + 'static {
    /// A short name for logs, for example `database`.
    fn name(&self) -> &str;
    /// `Ok` when the dependency works now.
    fn check(&self) -> BoxFuture<'_, Result<(), Error>>;
}

impl HealthCheck for Db {
    fn name(&self) -> &str {
        "database"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.ping(Duration::from_secs(2)))
    }
}

/// A background task of a service (an outbox relay, an event consumer): it
/// runs while the server runs and is told to stop, through the token, once
/// the server has drained.
pub type Worker = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// One gRPC service, the dependencies its health depends on, and the
/// background work it needs.
pub struct HostedService {
    name: &'static str,
    register: Box<dyn FnOnce(&mut RoutesBuilder) + Send>,
    /// Verifies the tokens of calls to this service (its audience).
    verifier: Option<TokenVerifier>,
    /// Whether its calls are checked against their declared access: always,
    /// but for test doubles ([`Self::without_access_checks`]).
    access_checked: bool,
    checks: Vec<Arc<dyn HealthCheck>>,
    degraded_checks: Vec<Arc<dyn HealthCheck>>,
    drain: Vec<CancellationToken>,
    workers: Vec<(&'static str, Worker)>,
}

impl HostedService {
    /// A tonic-generated server (`FooServiceServer::new(api)`) under its full
    /// gRPC name (`agora.foo.v1.FooService`).
    pub fn new<S>(name: &'static str, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self {
            name,
            register: Box::new(move |routes| {
                routes.add_service(service);
            }),
            verifier: None,
            access_checked: true,
            checks: Vec::new(),
            degraded_checks: Vec::new(),
            drain: Vec::new(),
            workers: Vec::new(),
        }
    }

    /// Verifies the tokens of calls to this service (a verifier for it, see
    /// [`TokenVerifier::for_service`]), so that the server can enforce the
    /// access level each of its RPCs declares. Without one, every RPC of the
    /// service that is not public is refused.
    pub fn with_token_verifier(mut self, verifier: TokenVerifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Serves every call without checking it against the access its RPC
    /// declares: for test doubles standing in for a service, which are
    /// called with made-up tokens. Never for a real service.
    pub fn without_access_checks(mut self) -> Self {
        self.access_checked = false;
        self
    }

    /// A token the server cancels as soon as it starts shutting down, so that
    /// long-lived calls (server streams) can end on their own instead of
    /// holding the drain until its timeout.
    pub fn with_drain_signal(mut self, drain: CancellationToken) -> Self {
        self.drain.push(drain);
        self
    }

    /// Adds a dependency: while it fails, the service reports NOT_SERVING.
    pub fn with_check(mut self, check: impl HealthCheck) -> Self {
        self.checks.push(Arc::new(check));
        self
    }

    /// Adds a dependency the service can do without for a while (NATS: its
    /// events wait in the outbox). Its failure leaves the service SERVING and
    /// is reported on its own, as the health of `<service>/<dependency>`
    /// (e.g. `agora.users.v1.UserService/nats`), and logged.
    pub fn with_degraded_check(mut self, check: impl HealthCheck) -> Self {
        self.degraded_checks.push(Arc::new(check));
        self
    }

    /// Adds a background task, run alongside the server and stopped after it.
    pub fn with_worker<F, Fut>(mut self, name: &'static str, worker: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.workers
            .push((name, Box::new(move |stop| Box::pin(worker(stop)))));
        self
    }

    /// The service's full gRPC name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Builds an [`Application`]: which services, how often health is checked,
/// how long shutdown waits for in-flight calls, which transport limits hold.
pub struct Server {
    services: Vec<HostedService>,
    health_interval: Duration,
    drain_timeout: Duration,
    /// Streams per connection, keepalive, load shedding, default deadline.
    limits: ServerConfig,
    /// Request bytes buffered at once, when shared with other servers;
    /// `None`: a budget of this server's own, of `limits`' size.
    request_budget: Option<RequestBudget>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server with no services yet; health checked every second, 30 s
    /// drain, the default transport limits of [`ServerConfig`].
    pub fn new() -> Self {
        Self {
            services: Vec::new(),
            health_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            limits: ServerConfig::default(),
            request_budget: None,
        }
    }

    /// The transport limits of `config.server`: connections, streams per
    /// connection, HTTP/2 and TCP keepalive, calls in flight per hosted
    /// service, deadlines, request bodies (see the module docs). Message
    /// sizes are set on each generated server ([`crate::message_limits!`]).
    pub fn limits(mut self, limits: &ServerConfig) -> Self {
        self.limits = limits.clone();
        self
    }

    /// Counts buffered request messages against `budget` instead of a
    /// budget of this server's own (`server.max_buffered_request_bytes`):
    /// give the servers of one process (several services on their own
    /// ports, as `agora serve all` runs them) one budget, so that the bound
    /// holds for the process, not for each server.
    pub fn request_budget(mut self, budget: RequestBudget) -> Self {
        self.request_budget = Some(budget);
        self
    }

    /// Hosts a service.
    pub fn host(mut self, service: HostedService) -> Self {
        self.services.push(service);
        self
    }

    /// How often dependency checks run.
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// How long shutdown waits for in-flight calls (long streams included)
    /// before closing connections anyway.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Binds the listener (port 0 picks a free one) and assembles the routes.
    /// Fails when the contract leaves an RPC's access undeclared: no server
    /// runs without every rule.
    pub async fn bind(self, addr: SocketAddr) -> anyhow::Result<Application> {
        self.limits.validate()?;
        let table = AccessTable::contract()
            .map_err(|err| anyhow::anyhow!("the contract's access table: {err}"))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))?;
        let local_addr = listener.local_addr()?;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let mut names: Vec<&'static str> = Vec::new();
        let mut monitored = Vec::new();
        let mut degraded = Vec::new();
        let mut drain = Vec::new();
        let mut workers = Vec::new();
        let mut routes = RoutesBuilder::default();
        let mut verifiers = HashMap::new();
        for service in self.services {
            names.push(service.name);
            if !service.access_checked {
                tracing::warn!(service = service.name, "serving without access checks");
            } else if table.has_service(service.name) {
                let protected = table
                    .methods()
                    .any(|m| m.service == service.name && m.level != AccessLevel::Public);
                if service.verifier.is_none() && protected {
                    tracing::warn!(
                        service = service.name,
                        "no token verifier: every call of it that is not public will be refused"
                    );
                }
                verifiers.insert(service.name.to_owned(), service.verifier);
            }
            drain.extend(service.drain);
            workers.extend(service.workers);
            (service.register)(&mut routes);
            // Unknown until the first check has run.
            health_reporter
                .set_service_status(service.name, ServingStatus::NotServing)
                .await;
            monitored.push((service.name, service.checks));
            for check in service.degraded_checks {
                let name = format!("{}/{}", service.name, check.name());
                health_reporter
                    .set_service_status(&name, ServingStatus::NotServing)
                    .await;
                degraded.push((name, check));
            }
        }
        health_reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;

        let reflection = || reflection_builder(names.iter().copied());
        // The platform's own services get small request limits: they are
        // not behind the request-limits layer, and their requests are tiny.
        routes.add_service(health_service.max_decoding_message_size(HEALTH_MAX_REQUEST_BYTES));
        routes.add_service(
            reflection()
                .build_v1()?
                .max_decoding_message_size(REFLECTION_MAX_REQUEST_BYTES),
        );
        routes.add_service(
            reflection()
                .build_v1alpha()?
                .max_decoding_message_size(REFLECTION_MAX_REQUEST_BYTES),
        );

        Ok(Application {
            listener,
            local_addr,
            routes: routes.routes(),
            transport: Transport::from_config(&self.limits),
            shed: LoadShedLayer::new(
                names.iter().copied(),
                table,
                self.limits.max_in_flight_per_service,
            ),
            deadline: DeadlineLayer::new(
                table.clone(),
                (self.limits.default_timeout_ms > 0)
                    .then(|| Duration::from_millis(self.limits.default_timeout_ms)),
            )
            .with_max(
                (self.limits.max_timeout_ms > 0)
                    .then(|| Duration::from_millis(self.limits.max_timeout_ms)),
            ),
            access: AccessLayer::new(table.clone(), verifiers),
            request_limits: RequestLimitsLayer::contract(
                names.iter().copied(),
                self.limits.max_request_bytes,
            )
            .map_err(|err| anyhow::anyhow!("the contract's request limits: {err}"))?
            .with_budget(
                self.request_budget
                    .unwrap_or_else(|| RequestBudget::new(self.limits.max_buffered_request_bytes)),
            )
            .with_read_timeout(crate::limits::read_timeout(
                self.limits.body_read_timeout_ms,
            )),
            health: HealthMonitor {
                reporter: health_reporter,
                services: monitored,
                degraded,
                interval: self.health_interval,
            },
            drain_timeout: self.drain_timeout,
            drain,
            workers,
        })
    }
}

/// Server reflection (build it twice: `build_v1()` and `build_v1alpha()`)
/// listing `services` plus health and reflection themselves, and able to
/// describe any type of the contract, of health and reflection, and the
/// `google.rpc` error details (so grpcurl can print `BadRequest`
/// violations). Each server lists what it hosts; the gateway lists the
/// whole contract.
pub fn reflection_builder<'a>(
    services: impl IntoIterator<Item = &'a str>,
) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(agora_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in services.into_iter().chain([
        HEALTH_SERVICE_NAME,
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        builder = builder.with_service_name(name);
    }
    builder
}

/// A bound server, ready to run.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    routes: Routes,
    /// HTTP/2 and TCP settings of every connection.
    transport: Transport,
    /// Refuses calls beyond a hosted service's share of in-flight calls.
    shed: LoadShedLayer,
    /// Bounds each call by its caller's deadline or the unary default.
    deadline: DeadlineLayer,
    /// Checks every call of a hosted service against its declared access.
    access: AccessLayer,
    /// Checks each request message against the contract's length limits.
    request_limits: RequestLimitsLayer,
    health: HealthMonitor,
    drain_timeout: Duration,
    /// The hosted services' drain signals, cancelled when shutdown begins.
    drain: Vec<CancellationToken>,
    /// Background tasks, started with the server and stopped after it.
    workers: Vec<(&'static str, Worker)>,
}

/// How long stopped workers get to finish what they are doing (a relay's
/// batch in flight) before the process moves on without them.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Application {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then drains: health turns
    /// NOT_SERVING, no new connections are accepted, in-flight calls get up to
    /// the drain timeout to finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            local_addr,
            routes,
            transport,
            shed,
            deadline,
            access,
            request_limits,
            health,
            drain_timeout,
            drain,
            workers,
        } = self;
        let health_task = tokio::spawn(health.run(shutdown.clone()));
        // Workers outlive the drain: events recorded by the last in-flight
        // calls still get published.
        let stop_workers = CancellationToken::new();
        let mut worker_tasks = tokio::task::JoinSet::new();
        for (name, worker) in workers {
            let task = worker(stop_workers.clone());
            worker_tasks.spawn(async move {
                task.await;
                tracing::debug!(worker = name, "worker stopped");
            });
        }
        let draining = shutdown.clone();
        let drain_task = tokio::spawn(async move {
            draining.cancelled().await;
            drain.iter().for_each(CancellationToken::cancel);
        });

        let incoming = TcpIncoming::from(listener)
            // TCP_NODELAY: small gRPC frames must not wait for Nagle's algorithm.
            .with_nodelay(Some(true))
            // TCP keepalive: the kernel notices peers that vanished without
            // a word (a pod gone, a NAT entry forgotten) even while idle.
            .with_keepalive(Some(transport.keepalive_interval))
            .with_keepalive_interval(Some(transport.keepalive_timeout));
        // At most `max_connections` open: the next accept waits for a close.
        let incoming = ConnectionCap::new(transport.max_connections).incoming(incoming);
        let serve = tonic::transport::Server::builder()
            // A connection opens at most this many streams at once; the
            // client queues the rest (SETTINGS_MAX_CONCURRENT_STREAMS).
            .max_concurrent_streams(transport.max_concurrent_streams)
            // Pings on every connection: one whose peer stops answering is
            // closed, with its calls, instead of holding them forever.
            .http2_keepalive_interval(Some(transport.keepalive_interval))
            .http2_keepalive_timeout(Some(transport.keepalive_timeout))
            // A peer that answers pings could keep a connection (and its
            // `max_connections` slot) forever: connections are closed after
            // this age, gracefully (GOAWAY, calls in flight get the grace),
            // and clients reconnect, as gRPC clients do.
            .max_connection_age(transport.max_connection_age)
            .max_connection_age_grace(CONNECTION_AGE_GRACE)
            // Outermost: one span per RPC, so everything below is inside it.
            .layer(RpcTraceLayer)
            // Next: load shedding, before any work is done for the call (no
            // token verified, nothing queued), inside the span so that
            // refusals are traced; a unary call's permit lives until its
            // response ends, a stream's until its answer starts.
            .layer(shed)
            // Next: the handler runs within the caller's `grpc-timeout` (cut
            // to the maximum, or the unary default), so the calls it makes
            // are bounded by what the caller has left, and it is dropped
            // when that runs out.
            .layer(deadline)
            // Next: who may call this RPC, as the contract declares. Inside
            // the span, so refusals are traced.
            .layer(access)
            // Innermost, just before the handler: the request message, read
            // whole (at most `max_request_bytes`, within the byte budget and
            // the body read timeout) once the caller is known to be
            // allowed, within the contract's length limits.
            .layer(request_limits)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        tracing::info!(addr = %local_addr, "serving gRPC");

        let result = tokio::select! {
            result = serve => result.map_err(anyhow::Error::from),
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(drain_timeout).await;
            } => {
                tracing::warn!(?drain_timeout, "drain timeout reached, closing remaining calls");
                Ok(())
            }
        };
        health_task.abort();
        drain_task.abort();
        stop_workers.cancel();
        let stopped = tokio::time::timeout(WORKER_STOP_TIMEOUT, async {
            while worker_tasks.join_next().await.is_some() {}
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("background workers did not stop in time; abandoning them");
        }
        tracing::info!(addr = %local_addr, "server stopped");
        result
    }
}

/// Runs every service's checks on an interval and publishes the result to
/// `grpc.health.v1.Health`. The empty service name reports the whole server:
/// SERVING only when every hosted service is.
struct HealthMonitor {
    reporter: HealthReporter,
    services: Vec<(&'static str, Vec<Arc<dyn HealthCheck>>)>,
    /// `<service>/<dependency>` and its check: reported, never blocking.
    degraded: Vec<(String, Arc<dyn HealthCheck>)>,
    interval: Duration,
}

impl HealthMonitor {
    async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Vec<Option<bool>> = vec![None; self.services.len()];
        let mut last_degraded: Vec<Option<bool>> = vec![None; self.degraded.len()];
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let mut all_serving = true;
            for (index, (name, checks)) in self.services.iter().enumerate() {
                let mut failure = None;
                for check in checks {
                    if let Err(err) = check.check().await {
                        failure = Some((check.name().to_owned(), err));
                        break;
                    }
                }
                let serving = failure.is_none();
                all_serving &= serving;
                if last[index] != Some(serving) {
                    match &failure {
                        None => tracing::info!(service = name, "health: SERVING"),
                        Some((dependency, err)) => tracing::warn!(
                            service = name, dependency, error = %err, "health: NOT_SERVING"
                        ),
                    }
                    last[index] = Some(serving);
                }
                self.reporter
                    .set_service_status(*name, status(serving))
                    .await;
            }
            self.reporter
                .set_service_status("", status(all_serving))
                .await;
            for (index, (name, check)) in self.degraded.iter().enumerate() {
                let result = check.check().await;
                let ok = result.is_ok();
                if last_degraded[index] != Some(ok) {
                    match &result {
                        Ok(()) => tracing::info!(dependency = %name, "health: dependency back"),
                        Err(err) => tracing::warn!(
                            dependency = %name, error = %err, "health: degraded (still serving)"
                        ),
                    }
                    last_degraded[index] = Some(ok);
                }
                self.reporter.set_service_status(name, status(ok)).await;
            }
        }
        // Tell load balancers and watchers to go elsewhere while we drain.
        for (name, _) in &self.degraded {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        for (name, _) in &self.services {
            self.reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
}

fn status(serving: bool) -> ServingStatus {
    if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// The HTTP/2 and TCP settings of every connection, from [`ServerConfig`].
#[derive(Clone, Copy, Debug)]
struct Transport {
    max_connections: usize,
    max_concurrent_streams: u32,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    max_connection_age: Duration,
}

/// How long calls in flight on a connection past its maximum age may go on
/// after the GOAWAY: a unary call's default deadline.
const CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);

impl Transport {
    fn from_config(config: &ServerConfig) -> Self {
        Self {
            // Zero would accept nothing: at least one connection.
            max_connections: config.max_connections.max(1),
            // Zero would refuse every call: at least one stream.
            max_concurrent_streams: config.max_concurrent_streams.max(1),
            keepalive_interval: Duration::from_secs(config.keepalive_interval_secs.max(1)),
            keepalive_timeout: Duration::from_secs(config.keepalive_timeout_secs.max(1)),
            max_connection_age: Duration::from_secs(config.max_connection_age_secs.max(1)),
        }
    }
}

/// The streaming RPCs a server hosts besides the contract's: they get no
/// default deadline (every other call does).
const PLATFORM_STREAMS: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// How long a new connection may stay silent: a peer that has not sent a
/// byte by then (no HTTP/2 preface; hyper's handshake has no timer of its
/// own) is closed, so bare sockets cannot sit on `max_connections` slots.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request message of the platform's own services: a health check
/// names one service, a reflection request one symbol or file.
const HEALTH_MAX_REQUEST_BYTES: usize = 4 * 1024;
const REFLECTION_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// At most `limit` connections open at once (`server.max_connections`):
/// each accepted connection holds a slot until it closes, and the next
/// connection is accepted only once a slot is free, so at the cap new
/// clients wait in the kernel's listen backlog (and time out there, as
/// their own deadlines say) instead of taking file descriptors and memory
/// from the connections being served. Cheap to clone: clones share the
/// slots.
#[derive(Clone, Debug)]
pub struct ConnectionCap {
    open: Arc<Semaphore>,
}

impl ConnectionCap {
    /// At most `limit` connections (at least 1).
    pub fn new(limit: usize) -> Self {
        Self {
            open: Arc::new(Semaphore::new(limit.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// The connections of `incoming` (a `TcpIncoming`, whose socket options
    /// they keep), each holding a slot until it is dropped (closed); the
    /// next is taken from `incoming` (accepted) only once a slot is free.
    /// A failed accept gives its slot back at once.
    pub fn incoming<S, IO, E>(
        &self,
        incoming: S,
    ) -> impl futures::Stream<Item = Result<CappedConn<IO>, E>> + Send + 'static
    where
        S: futures::Stream<Item = Result<IO, E>> + Unpin + Send + 'static,
        IO: Send + 'static,
        E: Send + 'static,
    {
        use futures::StreamExt as _;
        futures::stream::unfold(
            (incoming, Arc::clone(&self.open)),
            |(mut incoming, open)| async move {
                // The semaphore is never closed; were it, accepting would stop.
                let slot = Arc::clone(&open).acquire_owned().await.ok()?;
                let accepted = incoming.next().await?;
                let conn = accepted.map(|io| CappedConn {
                    io,
                    _slot: slot,
                    silent_until: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
                });
                Some((conn, (incoming, open)))
            },
        )
    }
}

/// A connection counted by a [`ConnectionCap`]: the IO it wraps (its
/// TCP_NODELAY and keepalive settings untouched, its remote address still
/// reported to tonic through [`Connected`](tonic::transport::server::Connected)),
/// and its slot, given back when the connection is dropped.
#[derive(Debug)]
pub struct CappedConn<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
    /// Until the peer's first byte: when it must have come
    /// ([`FIRST_BYTES_TIMEOUT`]).
    silent_until: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CappedConn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(silent_until) = this.silent_until.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.silent_until = None,
                Poll::Pending if silent_until.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the peer sent nothing after connecting",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CappedConn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for CappedConn<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The message size limits of `config.server` on a tonic-generated server:
/// it sends no response larger than `max_response_bytes` (the call fails
/// with OUT_OF_RANGE, tonic's code for it, instead) and decodes no request
/// larger than `max_request_bytes` (a second line behind the request
/// limits checked before the handler; tonic's default is 4 MiB).
/// Generated servers share no trait for these settings, hence a macro,
/// used where each service builds its server:
///
/// ```ignore
/// let server = agora_platform::message_limits!(UserServiceServer::new(api), &config.server);
/// HostedService::new(SERVICE_NAME, server)
/// ```
#[macro_export]
macro_rules! message_limits {
    ($server:expr, $limits:expr $(,)?) => {{
        let limits: &$crate::config::ServerConfig = $limits;
        $server
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes)
    }};
}

/// Bounds every call by its deadline: the caller's `grpc-timeout`, cut to
/// the server's maximum (`server.max_timeout_ms`: a deadline of years
/// holds a handler no longer than that), or, for a unary RPC of the
/// contract whose caller states none, the server's default. The handler
/// runs inside [`crate::deadline::scope`] of it (so the calls it makes get
/// what is left) and is dropped when it passes: the caller gets
/// DEADLINE_EXCEEDED and the work stops. A call whose deadline has already
/// passed on arrival is refused without running.
///
/// The deadline bounds the time until the response starts: all of a unary
/// call, only the setup of a server stream. Streams get no default: they
/// are bounded by limits of their own (`watch.max_lifetime_secs`).
#[derive(Clone, Debug)]
pub struct DeadlineLayer {
    /// Tells unary RPCs (which get the default) from streams.
    table: AccessTable,
    /// The deadline of a unary call that states none; `None`: no default.
    default_unary: Option<Duration>,
    /// The longest deadline a caller may state; `None`: no cap.
    max: Option<Duration>,
}

/// How much earlier than the caller's deadline a handler is stopped.
/// Tonic runs a timer of its own on the same `grpc-timeout`, started as
/// the call arrives, and answers CANCELLED when it fires; stopping the
/// handler a moment earlier (counted from the same arrival, see
/// [`Arrival`]) makes sure the caller hears DEADLINE_EXCEEDED, the code
/// gRPC defines for it.
const DEADLINE_HEAD_START: Duration = Duration::from_millis(2);

/// When a call arrived: put in its extensions by [`RpcTrace`], the
/// outermost layer, whose `call` runs as the call arrives (handlers run on
/// a task of their own, possibly a moment later), so that every deadline
/// counts from the same instant as tonic's timer.
#[derive(Clone, Copy, Debug)]
struct Arrival(tokio::time::Instant);

impl DeadlineLayer {
    /// Enforces callers' deadlines, and `default_unary` on the unary RPCs
    /// of `table` whose caller states none.
    pub fn new(table: AccessTable, default_unary: Option<Duration>) -> Self {
        Self {
            table,
            default_unary,
            max: None,
        }
    }

    /// Cuts every stated deadline to `max` (`None`: no cap); a default
    /// longer than it is cut too.
    pub fn with_max(mut self, max: Option<Duration>) -> Self {
        self.max = max;
        self
    }

    /// When the call must be answered, if ever.
    fn deadline_of(&self, request: &http::Request<impl Sized>) -> Option<tokio::time::Instant> {
        let arrived = request
            .extensions()
            .get::<Arrival>()
            .map_or_else(tokio::time::Instant::now, |arrival| arrival.0);
        let timeout = match crate::deadline::grpc_timeout(request.headers()) {
            // Longer than the server allows: cut. Tonic's own timer runs on
            // the caller's (longer) deadline, so no head start is needed.
            Some(stated) if self.max.is_some_and(|max| stated > max) => self.max?,
            Some(stated) => stated.saturating_sub(DEADLINE_HEAD_START),
            None => {
                let path = request.uri().path();
                // Every unary call, the platform's own too (a `Health/Check`
                // whose body stalls must not wait forever); streams have
                // their own bounds.
                let unary = match self.table.get(path) {
                    Some(method) => !method.client_streaming && !method.server_streaming,
                    None => !PLATFORM_STREAMS.contains(&path),
                };
                let default = self.default_unary.filter(|_| unary)?;
                self.max.map_or(default, |max| default.min(max))
            }
        };
        // Overflow (a timeout of years): as good as no deadline.
        arrived.checked_add(timeout)
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    layer: DeadlineLayer,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>,
        futures::future::Either<
            S::Future,
            futures::future::Ready<Result<Self::Response, Self::Error>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        // Read before the handler runs: the budget starts when the call arrives.
        let Some(deadline) = self.layer.deadline_of(&request) else {
            return Either::Right(Either::Left(self.inner.call(request)));
        };
        if deadline <= tokio::time::Instant::now() {
            return Either::Right(Either::Right(futures::future::ready(Ok(
                deadline_exceeded().into_http(),
            ))));
        }
        let call = crate::deadline::scope(deadline, self.inner.call(request));
        Either::Left(Box::pin(async move {
            match tokio::time::timeout_at(deadline, call).await {
                Ok(answered) => answered,
                // The handler is dropped here: its work stops with the call.
                Err(_) => Ok(deadline_exceeded().into_http()),
            }
        }))
    }
}

/// The answer to a call whose deadline passed before its handler answered.
fn deadline_exceeded() -> tonic::Status {
    tonic::Status::deadline_exceeded("the deadline passed before the call was answered")
}

/// Load shedding: each hosted service answers at most `limit` calls at once
/// (a unary call holds its permit until its response body ends; a stream
/// only until its answer starts, then gives it back: how many streams stay
/// open is bounded by their own caps, `watch.*`). One call more is refused at once,
/// trailers-only, with RESOURCE_EXHAUSTED, `ErrorInfo` reason `OVERLOADED`
/// and a short `google.rpc.RetryInfo`: never queued, so an overloaded
/// service answers in microseconds and its latency stays that of the calls
/// it accepted. Each service has its own semaphore, so one saturated
/// service of a monolith leaves the others alone. Paths of services not
/// hosted here (health, reflection, unknown) are never shed: probes answer
/// under any load.
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    /// Full gRPC service name -> its calls in flight.
    services: Arc<HashMap<String, Arc<Semaphore>>>,
    /// Paths of the contract's streaming RPCs.
    streaming: Arc<std::collections::HashSet<String>>,
}

/// When a client refused by load shedding should try again: soon, as calls
/// in flight end all the time.
pub const OVERLOADED_RETRY_AFTER: Duration = Duration::from_millis(100);

impl LoadShedLayer {
    /// At most `limit` calls in flight for each of `services` (full gRPC
    /// names); a limit of 0 counts as 1. A streaming RPC of `table` holds
    /// its permit only until its answer starts: how many streams stay open,
    /// and for how long, is bounded by the stream's own caps (`watch.*` for
    /// `WatchOrder`), so that open streams never starve the unary calls.
    pub fn new<'a>(
        services: impl IntoIterator<Item = &'a str>,
        table: &AccessTable,
        limit: usize,
    ) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        let services = services
            .into_iter()
            .map(|name| (name.to_owned(), Arc::new(Semaphore::new(limit))))
            .collect();
        let streaming = table
            .methods()
            .filter(|method| method.client_streaming || method.server_streaming)
            .map(|method| method.path.clone())
            .collect();
        Self {
            services: Arc::new(services),
            streaming: Arc::new(streaming),
        }
    }
}

impl<S> tower::Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            services: Arc::clone(&self.services),
            streaming: Arc::clone(&self.streaming),
        }
    }
}

/// The service made by [`LoadShedLayer`].
#[derive(Clone, Debug)]
pub struct LoadShed<S> {
    inner: S,
    services: Arc<HashMap<String, Arc<Semaphore>>>,
    streaming: Arc<std::collections::HashSet<String>>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for LoadShed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = http::Response<PermitBody<RB>>;
    type Error = S::Error;
    type Future = futures::future::Either<
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>,
        futures::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        let (service, _) = split_rpc_path(request.uri().path());
        let permit = match self.services.get(service) {
            // Not a hosted service: health, reflection, or UNIMPLEMENTED.
            None => None,
            Some(in_flight) => match Arc::clone(in_flight).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    tracing::debug!(service, "overloaded: call refused");
                    let refusal = tonic::Status::from(overloaded(service)).into_http::<RB>();
                    return Either::Right(futures::future::ready(Ok(
                        refusal.map(|body| PermitBody::new(body, None))
                    )));
                }
            },
        };
        let streaming = self.streaming.contains(request.uri().path());
        let call = self.inner.call(request);
        Either::Left(Box::pin(async move {
            let response = call.await?;
            // A stream's setup has been counted; its lifetime is its own
            // caps' business (see `LoadShedLayer::new`).
            let permit = if streaming { None } else { permit };
            Ok(response.map(|body| PermitBody::new(body, permit)))
        }))
    }
}

/// RESOURCE_EXHAUSTED for a call to `service` beyond its in-flight limit.
fn overloaded(service: &str) -> Error {
    Error::overloaded(
        format!("{service} is overloaded: try again shortly"),
        crate::error::OVERLOADED,
        OVERLOADED_RETRY_AFTER,
    )
}

/// A response body holding its call's load-shedding permit (a unary call's;
/// a stream's was given back when its answer started): released when the
/// body ends (its trailers pass) or is dropped (the client went away).
pub struct PermitBody<B> {
    inner: B,
    permit: Option<OwnedSemaphorePermit>,
}

impl<B> PermitBody<B> {
    fn new(inner: B, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self { inner, permit }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Ready(Some(Err(_)) | None) => true,
            Poll::Pending => false,
        };
        if ended {
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Checks every call of a hosted service against the access level its RPC
/// declares in the contract ([`crate::access`]), before the handler runs:
/// verifies the caller's token once, with the verifier of the service
/// called (tokens are addressed to one service), and refuses with
/// UNAUTHENTICATED or PERMISSION_DENIED as [`MethodAccess::authorize`]
/// decides. The verified caller is left in the request's extensions for
/// [`TokenVerifier::caller_of`]. Public RPCs pass without their token being
/// looked at (an expired token never breaks a public read); paths outside
/// the contract or of services not hosted here (health, reflection) pass
/// untouched.
///
/// [`MethodAccess::authorize`]: crate::access::MethodAccess::authorize
#[derive(Clone, Debug)]
pub struct AccessLayer {
    policy: Arc<AccessPolicy>,
}

#[derive(Debug)]
struct AccessPolicy {
    table: AccessTable,
    /// The hosted services of the contract, by full name, and the verifier
    /// of tokens addressed to each (`None`: only public calls pass).
    services: HashMap<String, Option<TokenVerifier>>,
}

impl AccessLayer {
    /// Enforces `table`'s rules for the services in `services` (full gRPC
    /// name -> the verifier of tokens addressed to it, if any).
    pub fn new(table: AccessTable, services: HashMap<String, Option<TokenVerifier>>) -> Self {
        Self {
            policy: Arc::new(AccessPolicy { table, services }),
        }
    }
}

impl AccessPolicy {
    /// `Ok` when the call may reach its handler, with the verified caller
    /// added to its extensions when a token was checked.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Error> {
        let Some(method) = self.table.get(request.uri().path()) else {
            return Ok(());
        };
        // Not hosted here: the router answers UNIMPLEMENTED.
        let Some(verifier) = self.services.get(&method.service) else {
            return Ok(());
        };
        if method.level == AccessLevel::Public {
            return Ok(());
        }
        let caller = match verifier {
            Some(verifier) => verifier.caller_from_headers(request.headers())?,
            None if !request.headers().contains_key(http::header::AUTHORIZATION) => {
                Caller::Anonymous
            }
            None => {
                return Err(Error::new(
                    ErrorKind::Unauthenticated,
                    format!(
                        "this server cannot verify tokens for {}: it has no token verifier",
                        method.service
                    ),
                ));
            }
        };
        method.authorize(&caller)?;
        request.extensions_mut().insert(VerifiedCaller(caller));
        Ok(())
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Access {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The service made by [`AccessLayer`].
#[derive(Clone, Debug)]
pub struct Access<S> {
    inner: S,
    policy: Arc<AccessPolicy>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Access<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.policy.admit(&mut request) {
            Ok(()) => futures::future::Either::Left(self.inner.call(request)),
            // A trailers-only gRPC response: the status is in the headers.
            Err(refusal) => futures::future::Either::Right(futures::future::ready(Ok(
                tonic::Status::from(refusal).into_http(),
            ))),
        }
    }
}

/// Wraps every request in a span named after the RPC, with the OpenTelemetry
/// `rpc.*` attributes, parented to the caller's `traceparent`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcTraceLayer;

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// The service made by [`RpcTraceLayer`].
#[derive(Clone, Debug)]
pub struct RpcTrace<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: http_body::Body + Unpin,
{
    type Response = http::Response<TracedBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request
            .extensions_mut()
            .insert(Arrival(tokio::time::Instant::now()));
        let (service, method) = split_rpc_path(request.uri().path());
        let span = tracing::info_span!(
            "rpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(crate::telemetry::extract_parent(request.headers()));

        // The ready clone is the one we must call; keep a fresh clone in self.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let started = Instant::now();
        let call_span = span.clone();
        Box::pin(
            async move {
                let response = inner.call(request).await?;
                let mut body = TracedBody {
                    inner: None,
                    span: call_span,
                    started,
                    finished: false,
                    caller_stalled: response
                        .extensions()
                        .get::<crate::limits::CallerStalled>()
                        .is_some(),
                };
                // An error is sent as a trailers-only response: its status is
                // in the headers and the call is over. Otherwise the status
                // arrives in the trailers, at the end of the body.
                let (parts, inner_body) = response.into_parts();
                if let Some(code) = grpc_status(&parts.headers) {
                    body.finish(code);
                }
                body.inner = Some(inner_body);
                Ok(http::Response::from_parts(parts, body))
            }
            .instrument(span),
        )
    }
}

/// A response body that records the call's gRPC status on its span when the
/// trailers pass (or when the client goes away first).
pub struct TracedBody<B> {
    inner: Option<B>,
    span: tracing::Span,
    started: Instant,
    finished: bool,
    /// The caller did not send its request in time: its DEADLINE_EXCEEDED
    /// is the caller's doing, not the server's.
    caller_stalled: bool,
}

impl<B> TracedBody<B> {
    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let _entered = self.span.enter();
        self.span.record("rpc.grpc.status_code", code);
        let elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        match tonic::Code::from_i32(code) {
            tonic::Code::Ok => tracing::debug!(elapsed_ms, "rpc finished"),
            // Refusals for capacity (load shedding, busy work, byte budget)
            // and bodies stalled by their callers come in floods exactly
            // when the server is busiest or abused: a line each at INFO or
            // WARN would add logging to the overload. Debug only.
            code if code == tonic::Code::ResourceExhausted || self.caller_stalled => {
                tracing::debug!(?code, elapsed_ms, "rpc rejected");
            }
            code if is_server_fault(code) => {
                self.span.record("otel.status_code", "ERROR");
                tracing::warn!(?code, elapsed_ms, "rpc failed");
            }
            code => tracing::info!(?code, elapsed_ms, "rpc rejected"),
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(tonic::Code::Internal as i32),
            // A body that ends without trailers carried its status in the headers.
            Poll::Ready(None) => this.finish(tonic::Code::Ok as i32),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map(http_body::Body::size_hint)
            .unwrap_or_default()
    }
}

impl<B> Drop for TracedBody<B> {
    fn drop(&mut self) {
        // Dropped before the trailers: the client cancelled or went away.
        self.finish(tonic::Code::Cancelled as i32);
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Codes that mean the server, not the caller, is at fault (OTel semantic
/// conventions for gRPC server spans).
pub fn is_server_fault(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

/// `/agora.users.v1.UserService/GetUser` -> (`agora.users.v1.UserService`, `GetUser`).
pub fn split_rpc_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_paths_split_into_service_and_method() {
        assert_eq!(
            split_rpc_path("/agora.users.v1.UserService/GetUser"),
            ("agora.users.v1.UserService", "GetUser")
        );
        assert_eq!(split_rpc_path("/weird"), ("weird", ""));
    }

    /// A handler that answers with the deadline it runs under (the
    /// milliseconds left, in a header) and counts its calls.
    fn reporting_handler(
        calls: Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = BoxFuture<
            'static,
            Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
        >,
    > + Clone {
        tower::service_fn(move |_request: http::Request<()>| {
            let calls = Arc::clone(&calls);
            // Like a tonic handler, it runs when polled (inside the scope).
            Box::pin(async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let left = crate::deadline::remaining()
                    .map_or_else(|| "none".to_owned(), |left| left.as_millis().to_string());
                let mut response = http::Response::new(tonic::body::Body::empty());
                if let Ok(value) = http::HeaderValue::from_str(&left) {
                    response.headers_mut().insert("x-deadline-left-ms", value);
                }
                Ok(response)
            }) as BoxFuture<'static, _>
        })
    }

    fn request(path: &str, timeout: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path);
        if let Some(timeout) = timeout {
            builder = builder.header(crate::deadline::GRPC_TIMEOUT, timeout);
        }
        builder.body(()).expect("a valid request")
    }

    /// The handler's view of its deadline for a call of `path`.
    async fn deadline_seen(
        layer: &DeadlineLayer,
        path: &str,
        timeout: Option<&str>,
    ) -> (Option<String>, Option<String>) {
        use tower::{Layer as _, ServiceExt as _};
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service = layer.layer(reporting_handler(calls));
        let response = service
            .oneshot(request(path, timeout))
            .await
            .expect("infallible");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (header("x-deadline-left-ms"), header("grpc-status"))
    }

    fn layer_with_default(default: Option<Duration>) -> DeadlineLayer {
        let table = AccessTable::contract().expect("the contract's access table");
        DeadlineLayer::new(table.clone(), default)
    }

    #[tokio::test]
    async fn the_default_deadline_applies_to_unary_calls_that_state_none() {
        let layer = layer_with_default(Some(Duration::from_secs(30)));
        let unary = "/agora.orders.v1.OrderService/GetOrder";
        let (left, _) = deadline_seen(&layer, unary, None).await;
        let left: u64 = left.expect("a deadline").parse().expect("millis");
        assert!(left > 29_000 && left <= 30_000, "{left}");

        // A stated deadline replaces it, longer or shorter.
        let (left, _) = deadline_seen(&layer, unary, Some("60S")).await;
        let left: u64 = left.expect("a deadline").parse().expect("millis");
        assert!(left > 59_000 && left <= 60_000, "{left}");

        // No default: no deadline.
        let (left, _) = deadline_seen(&layer_with_default(None), unary, None).await;
        assert_eq!(left.as_deref(), Some("none"));
    }

    #[tokio::test]
    async fn streams_get_no_default() {
        let layer = layer_with_default(Some(Duration::from_millis(1)));
        for path in [
            "/agora.orders.v1.OrderService/WatchOrder",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let (left, status) = deadline_seen(&layer, path, None).await;
            assert_eq!(left.as_deref(), Some("none"), "{path}");
            assert_eq!(status, None, "{path}");
        }
        // A stream's caller may still state one.
        let (left, _) = deadline_seen(
            &layer,
            "/agora.orders.v1.OrderService/WatchOrder",
            Some("5S"),
        )
        .await;
        assert_ne!(left.as_deref(), Some("none"));
    }

    #[tokio::test]
    async fn stated_deadlines_and_the_default_are_cut_to_the_maximum() {
        let layer = layer_with_default(Some(Duration::from_secs(30)))
            .with_max(Some(Duration::from_secs(10)));
        let unary = "/agora.orders.v1.OrderService/GetOrder";
        let stream = "/agora.orders.v1.OrderService/WatchOrder";
        let left_ms =
            |left: Option<String>| -> u64 { left.expect("a deadline").parse().expect("millis") };
        // Years (the longest grpc-timeout there is), for a unary call and a
        // stream's setup alike: cut to ten seconds.
        for path in [unary, stream] {
            let left = left_ms(deadline_seen(&layer, path, Some("99999999H")).await.0);
            assert!(left > 9_000 && left <= 10_000, "{path}: {left}");
        }
        // Shorter than the maximum: the caller's own.
        let left = left_ms(deadline_seen(&layer, unary, Some("5S")).await.0);
        assert!(left > 4_000 && left <= 5_000, "{left}");
        // A default longer than the maximum: cut too.
        let left = left_ms(deadline_seen(&layer, unary, None).await.0);
        assert!(left > 9_000 && left <= 10_000, "{left}");
        // Without a cap, years stay years (as good as none).
        let (left, _) = deadline_seen(&layer_with_default(None), unary, Some("99999999H")).await;
        assert!(left_ms(left) > 10_000);
    }

    #[test]
    fn load_shedding_refuses_with_overloaded_and_retry_info() {
        use tonic_types::StatusExt as _;
        let status = tonic::Status::from(overloaded("agora.users.v1.UserService"));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            crate::error::reason_of(&status).as_deref(),
            Some(crate::error::OVERLOADED)
        );
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(OVERLOADED_RETRY_AFTER));
    }

    #[tokio::test]
    async fn a_call_whose_deadline_passed_on_arrival_never_runs() {
        use tower::{Layer as _, ServiceExt as _};
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let layer = layer_with_default(None);
        for timeout in ["0n", "0m", "1m"] {
            let service = layer.layer(reporting_handler(Arc::clone(&calls)));
            let response = service
                .oneshot(request(
                    "/agora.orders.v1.OrderService/GetOrder",
                    Some(timeout),
                ))
                .await
                .expect("infallible");
            let status = tonic::Status::from_header_map(response.headers()).expect("a status");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{timeout}");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
