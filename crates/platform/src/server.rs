//! The gRPC server every Agora service runs in.
//!
//! ```ignore
//! let app = Server::new()
//!     .host(
//!         HostedService::new(SERVICE_NAME, UserServiceServer::new(api))
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
//! the caller's `grpc-timeout` ([`DeadlineLayer`], [`crate::deadline`]),
//! which bounds the calls it makes in turn.
//! [`Application::run_until_stopped`] turns health to NOT_SERVING on
//! shutdown, stops accepting, and lets in-flight calls finish for up to
//! [`Server::drain_timeout`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
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
use crate::db::Db;
use crate::error::{Error, ErrorKind};

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
/// how long shutdown waits for in-flight calls.
pub struct Server {
    services: Vec<HostedService>,
    health_interval: Duration,
    drain_timeout: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server with no services yet; health checked every second, 30 s drain.
    pub fn new() -> Self {
        Self {
            services: Vec::new(),
            health_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
        }
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
        routes.add_service(health_service);
        routes.add_service(reflection().build_v1()?);
        routes.add_service(reflection().build_v1alpha()?);

        Ok(Application {
            listener,
            local_addr,
            routes: routes.routes(),
            access: AccessLayer::new(table.clone(), verifiers),
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
    /// Checks every call of a hosted service against its declared access.
    access: AccessLayer,
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
            access,
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

        // TCP_NODELAY: small gRPC frames must not wait for Nagle's algorithm.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let serve = tonic::transport::Server::builder()
            // Outermost: one span per RPC, so everything below is inside it.
            .layer(RpcTraceLayer)
            // Next: the handler runs within the caller's `grpc-timeout`, so
            // the calls it makes are bounded by what the caller has left.
            .layer(DeadlineLayer)
            // Innermost, just before the handler: who may call this RPC, as
            // the contract declares. Inside the span, so refusals are traced.
            .layer(access)
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

/// Runs every request's handler inside [`crate::deadline::scope`] of the
/// deadline its `grpc-timeout` header states (requests without one run
/// without a deadline).
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        tokio::task::futures::TaskLocalFuture<tokio::time::Instant, S::Future>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Read before the handler runs: the budget starts when the call arrives.
        let deadline = crate::deadline::grpc_timeout(request.headers())
            .and_then(|timeout| tokio::time::Instant::now().checked_add(timeout));
        match deadline {
            Some(deadline) => futures::future::Either::Left(crate::deadline::scope(
                deadline,
                self.inner.call(request),
            )),
            None => futures::future::Either::Right(self.inner.call(request)),
        }
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
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
}
