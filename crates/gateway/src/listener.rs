//! The public port: accepting connections (cleartext or TLS), speaking
//! HTTP/1.1 and HTTP/2 on the same port, and closing the connections that
//! misbehave or idle.
//!
//! Limits per connection: the request head must arrive within
//! `header_read_timeout_ms` and fit in `max_header_bytes`; HTTP/2 allows
//! `max_concurrent_streams` at once; a connection with no call in flight for
//! `idle_timeout_secs` (or that never completes its first request head in
//! `header_read_timeout_ms`, whatever the protocol) is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::edge::Edge;

/// The connection limits, from `GatewayConfig`.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// The largest request head.
    pub max_header_bytes: usize,
    /// Time to send a request head (and a TLS handshake).
    pub header_read_timeout: Duration,
    /// A connection with nothing in flight is closed after this.
    pub idle_timeout: Duration,
    /// HTTP/2 streams at once per connection.
    pub max_concurrent_streams: u32,
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// HTTP/2 keepalive ping interval: dead peers are noticed and dropped.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
}

/// What a connection has in flight and when it last had any: the calls on
/// it hold a [`ConnActivity`] each.
#[derive(Debug)]
struct ConnState {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last call ended or began.
    last_change_ms: AtomicU64,
    /// Whether any request head was ever received.
    served: AtomicUsize,
}

impl ConnState {
    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_change_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the connection has had nothing in flight, if so.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.last_change_ms.load(Ordering::Relaxed));
        Some(self.opened.elapsed().saturating_sub(since))
    }
}

/// One call in flight on a connection, for the idle timer.
#[derive(Debug)]
pub struct ConnActivity(Arc<ConnState>);

impl ConnActivity {
    fn begin(state: &Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.served.store(1, Ordering::Relaxed);
        state.touch();
        Self(Arc::clone(state))
    }

    /// An activity that belongs to no connection (tests).
    pub fn detached() -> Self {
        Self::begin(&Arc::new(ConnState {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
            served: AtomicUsize::new(0),
        }))
    }
}

impl Drop for ConnActivity {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long connections get to finish their calls once the gateway stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Accepts connections on `listener` until `stop`, then lets those open
/// finish their calls (up to [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    edge: Arc<Edge>,
    limits: ConnLimits,
    stop: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's own floor for its read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.keepalive_interval))
        .keep_alive_timeout(limits.keepalive_timeout);
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    let open = Arc::new(tokio::sync::Semaphore::new(
        limits
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    loop {
        // Reap finished connections so the set stays as large as the open ones.
        while connections.try_join_next().is_some() {}
        // A free slot first: at the cap, new clients wait in the backlog
        // rather than take file descriptors from the ones being served.
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = Arc::clone(&open).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: wait, don't spin.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Nagle would hold small frames back ~40 ms (with delayed ACKs).
        let _ = stream.set_nodelay(true);
        let edge = Arc::clone(&edge);
        let builder = Arc::clone(&builder);
        let stop = stop.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(stream, peer, edge, builder, limits, stop).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                            .await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            connection(stream, peer, edge, builder, limits, stop).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain timeout: closing them"
        );
        connections.abort_all();
    }
}

/// Serves one connection until it closes, the gateway stops, or it idles.
async fn connection<IO>(
    io: IO,
    peer: SocketAddr,
    edge: Arc<Edge>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: ConnLimits,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState {
        opened: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_change_ms: AtomicU64::new(0),
        served: AtomicUsize::new(0),
    });
    let service_state = Arc::clone(&state);
    let service = hyper::service::service_fn(move |request| {
        let edge = Arc::clone(&edge);
        let activity = ConnActivity::begin(&service_state);
        async move { Ok::<_, std::convert::Infallible>(edge.handle(request, peer, activity).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, %err, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
            }
            _ = tick.tick() => {
                if let Some(deadline) = closing {
                    if tokio::time::Instant::now() >= deadline {
                        // Gracefully asked and still open: cut it.
                        return;
                    }
                    continue;
                }
                let limit = if state.served.load(Ordering::Relaxed) == 0 {
                    limits.header_read_timeout
                } else {
                    limits.idle_timeout
                };
                if state.idle_for().is_some_and(|idle| idle >= limit) {
                    tracing::debug!(%peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    // A client that ignores the goodbye (an HTTP/2 GOAWAY
                    // waits for a PING ack) is cut a second later.
                    closing = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }
}

/// The TLS acceptor of a PEM certificate chain and key (HTTP/2 by ALPN,
/// and HTTP/1.1).
pub fn tls_acceptor(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("reading gateway.tls_cert_file {}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing gateway.tls_cert_file {}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("reading gateway.tls_key_file {}", key_file.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the gateway's TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds the public port.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
