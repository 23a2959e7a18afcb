//! The Agora edge gateway: the one public port.
//!
//! Browsers (grpc-web), curl and Connect clients (Connect JSON and proto),
//! grpcurl and generated clients (native gRPC) all reach the services
//! through it. It routes each call by its gRPC path to that service's
//! instances through the platform client stack, and applies the edge policy
//! first: the method's access level from the contract, the user's token,
//! the client's rate limit, CORS, size limits and deadlines.
//!
//! ```ignore
//! let gateway = Gateway::bind(&config, Discovery::Static).await?;
//! gateway.run_until_stopped(shutdown).await?;
//! ```
//!
//! # Layout
//! - [`listener`]: the port: TCP or TLS, HTTP/1.1 and HTTP/2, connection
//!   limits and idle timeouts.
//! - [`edge`]: one request: protocol, policy, call, translation, its span,
//!   metric and access-log line.
//! - [`body`]: request and response bodies, translated frame by frame.
//! - [`routes`]: gRPC path -> method facts and backend.
//! - [`health`]: backend health from their `Watch` streams; `/readyz`.
//! - [`ratelimit`]: per-client token buckets in bounded memory.
//! - [`cors`]: which browser origins may call, and what they may read.
//! - [`metrics`]: Prometheus `/metrics`.
//! - [`codec`]: the wire formats, as pure functions: gRPC frames, grpc-web
//!   (binary and base64 text), Connect (envelopes, errors, JSON).

#![forbid(unsafe_code)]

pub mod body;
pub mod codec;
pub mod cors;
pub mod edge;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod ratelimit;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agora_platform::access::AccessTable;
use agora_platform::auth::TokenVerifier;
use agora_platform::config::Config;
use agora_platform_client::{Clients, Credentials, Discovery};
use anyhow::Context as _;
use prost::Message as _;
use prost_reflect::DescriptorPool;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::codec::json::JsonCodec;
use crate::cors::CorsPolicy;
use crate::edge::{Edge, Limits};
use crate::health::HealthState;
use crate::listener::ConnLimits;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::routes::Routes;

/// A bound gateway, ready to run.
pub struct Gateway {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    edge: Arc<Edge>,
    limits: ConnLimits,
}

impl Gateway {
    /// Binds `gateway.listen_addr` (port 0 picks a free one) and builds the
    /// routes to every service of the contract, found by `discovery`.
    pub async fn bind(config: &Config, discovery: Discovery) -> anyhow::Result<Self> {
        let settings = &config.gateway;
        anyhow::ensure!(
            settings.default_timeout_ms > 0 && settings.max_timeout_ms > 0,
            "gateway.default_timeout_ms and gateway.max_timeout_ms must be above 0"
        );
        anyhow::ensure!(
            settings.max_request_bytes > 0 && settings.max_response_bytes > 0,
            "gateway.max_request_bytes and gateway.max_response_bytes must be above 0"
        );
        let tls = match (&settings.tls_cert_file, &settings.tls_key_file) {
            (Some(cert), Some(key)) => Some(listener::tls_acceptor(cert, key)?),
            (None, None) => None,
            _ => anyhow::bail!("gateway.tls_cert_file and gateway.tls_key_file go together"),
        };
        let table = AccessTable::contract().context("reading the contract's access levels")?;
        let pool = descriptor_pool()?;

        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Reflection lists the whole contract (no proto files needed).
        let mut contract_services: Vec<&str> =
            table.methods().map(|m| m.service.as_str()).collect();
        contract_services.sort_unstable();
        contract_services.dedup();
        let reflection =
            || agora_platform::server::reflection_builder(contract_services.iter().copied());
        let local = tonic::service::Routes::new(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);

        // Backend calls carry the client's own token or none: the gateway
        // lends nobody an identity. A call's deadline is the client's
        // (`grpc-timeout`, cut to the maximum) or the stack's default: the
        // gateway's default for unary calls, its maximum for streams. Two
        // stacks, so that a unary call on the default deadline counts as a
        // full budget for the breakers (a hung instance opens its breaker).
        let credentials: Credentials = Arc::new(|_target: &str| Ok(None));
        let clients_with_timeout = |timeout_ms: u64| {
            let mut client_config = config.clone();
            client_config.clients.default_timeout_ms = timeout_ms;
            Clients::new(
                &client_config,
                "gateway",
                discovery.clone(),
                Arc::clone(&credentials),
            )
        };
        let unary = clients_with_timeout(settings.default_timeout_ms)?;
        let streaming = clients_with_timeout(settings.max_timeout_ms)?;
        let routes = Routes::new(table, &unary, &streaming, &pool, local)?;

        let verifier = TokenVerifier::for_service(&config.auth, "gateway")
            .context("the gateway verifies user tokens: configure auth.public_key_file")?;
        let metrics = Metrics::new_with_methods(routes.paths().map(str::to_owned));
        let health = HealthState::new(reporter, &routes.backends);
        let edge = Arc::new(Edge {
            verifier,
            limiter: RateLimiter::new(
                settings.rate_limit_per_sec,
                settings.rate_limit_burst,
                settings.rate_limit_max_clients,
            ),
            cors: CorsPolicy::new(
                &settings.cors_allowed_origins,
                settings.cors_allow_any_origin,
            ),
            metrics,
            json: JsonCodec::new(pool),
            health,
            limits: Limits {
                max_request_bytes: settings.max_request_bytes,
                max_response_bytes: settings.max_response_bytes,
                default_timeout: Duration::from_millis(settings.default_timeout_ms),
                max_timeout: Duration::from_millis(settings.max_timeout_ms),
                body_read_timeout: Duration::from_millis(settings.header_read_timeout_ms),
                buffer_budget: Arc::new(tokio::sync::Semaphore::new(
                    settings
                        .max_buffered_request_bytes
                        .min(tokio::sync::Semaphore::MAX_PERMITS),
                )),
                trust_forwarded_for: settings.trust_forwarded_for,
                in_flight: Arc::new(tokio::sync::Semaphore::new(
                    settings
                        .max_in_flight
                        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
                )),
            },
            routes,
        });
        let (listener, local_addr) = listener::bind(settings.listen_addr).await?;
        Ok(Self {
            listener,
            local_addr,
            tls,
            edge,
            limits: ConnLimits {
                max_header_bytes: settings.max_header_bytes,
                header_read_timeout: Duration::from_millis(settings.header_read_timeout_ms),
                idle_timeout: Duration::from_secs(settings.idle_timeout_secs),
                max_concurrent_streams: settings.max_concurrent_streams,
                max_connections: settings.max_connections.max(1),
                keepalive_interval: Duration::from_secs(settings.keepalive_interval_secs.max(1)),
                keepalive_timeout: Duration::from_secs(settings.keepalive_timeout_secs.max(1)),
            },
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown`, then drains: readiness and health turn
    /// NOT_SERVING, no new connection is accepted, open calls may finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            local_addr,
            tls,
            edge,
            limits,
        } = self;
        edge.health.start().await;
        let watchers = CancellationToken::new();
        edge.health.spawn_watchers(&edge.routes.backends, &watchers);
        tracing::info!(
            addr = %local_addr,
            tls = tls.is_some(),
            "gateway listening (gRPC, grpc-web, Connect)"
        );
        let stop = CancellationToken::new();
        let serving = tokio::spawn(listener::serve(
            listener,
            tls,
            Arc::clone(&edge),
            limits,
            stop.clone(),
        ));
        shutdown.cancelled().await;
        edge.health.drain().await;
        stop.cancel();
        let served = serving.await;
        watchers.cancel();
        served.context("the gateway's listener task failed")?;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// The descriptors the gateway converts JSON with and routes its own
/// services by: the contract, health, reflection and the `google.rpc`
/// error details. Files already in the pool (shared well-known types) are
/// added once.
pub fn descriptor_pool() -> anyhow::Result<DescriptorPool> {
    let mut pool = DescriptorPool::decode(agora_proto::FILE_DESCRIPTOR_SET)
        .context("decoding the contract's descriptors")?;
    for set in [
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(set)
            .context("decoding a bundled descriptor set")?;
        let files: Vec<_> = set
            .file
            .into_iter()
            .filter(|file| pool.get_file_by_name(file.name()).is_none())
            .collect();
        pool.add_file_descriptor_protos(files)
            .context("adding a bundled descriptor set")?;
    }
    Ok(pool)
}
