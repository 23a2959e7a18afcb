//! The edge gateway's overhead, measured side by side in one run: unary
//! `catalog.GetProduct` straight to the catalog service (native gRPC) versus
//! through the gateway (native gRPC, grpc-web binary, Connect JSON).
//!
//! `just bench gateway` runs it against real processes of the release
//! `agora` binary (`agora serve catalog` and `agora serve gateway`, SQLite,
//! no broker, rate limiting off) and prints Markdown tables for
//! BENCHMARKS.md. The load comes from this process:
//! - **Open loop**: `AGORA_BENCH_RATE` requests/s (1,000) for
//!   `AGORA_BENCH_SECONDS` (3) per target and round, `AGORA_BENCH_ROUNDS`
//!   (4) rounds, the targets interleaved and rotated each round (ABCD, BCDA,
//!   ...) so that the shared machine's noise hits all of them alike. Requests
//!   leave on schedule whatever the completions, and latency counts from the
//!   scheduled send time (no coordinated omission).
//! - **Saturated**: `AGORA_BENCH_CONCURRENCY` (32) calls in flight, closed
//!   loop, `AGORA_BENCH_SATURATED_SECONDS` (2.5) per target and round,
//!   `AGORA_BENCH_SATURATED_ROUNDS` (2) rounds.
//! - The gateway's RSS (`/proc/<pid>/status`) idle and under the open-loop
//!   load, and the CPU time each process spent per request.
//! - For reference, a plain TCP relay (a thread of this process, copying
//!   bytes) in front of catalog: what any proxy pays for the extra hop.
//!
//! Native gRPC uses HTTP/2 (`AGORA_BENCH_H2_CONNECTIONS`, 4 connections per
//! target); grpc-web and Connect use HTTP/1.1, as a browser without HTTP/2
//! (cleartext) or curl does, on a pool of `AGORA_BENCH_CONCURRENCY`
//! connections (one call in flight each); `AGORA_BENCH_WEB_HTTP2=1` sends
//! them over HTTP/2 instead.
//!
//! Also: `AGORA_BENCH_WARMUP_SECONDS` (1, per target, unmeasured),
//! `AGORA_BENCH_RUST_LOG` (`warn`: no access log), `AGORA_BENCH_START_SECS`
//! (30: how long the gateway may take to answer right, more under valgrind).
//!
//! The binary is `AGORA_BENCH_AGORA`, else `<target dir>/release/agora`.
//! Under `cargo test` (no `--bench` argument) it runs as a smoke test: the
//! same load generator, a fraction of a second per target, against catalog
//! and a gateway in this process; any error fails it, so the benchmark
//! cannot rot unnoticed.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::common::v1::Money;
use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// The method measured: public, one indexed read, a small answer.
const PATH: &str = "/agora.catalog.v1.CatalogService/GetProduct";

/// A call slower than this counts as an error rather than hang the run.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Targets on the issue's budget: overhead at 1,000 requests/s.
const TARGET_P50_OVERHEAD_US: f64 = 150.0;
const TARGET_P99_OVERHEAD_US: f64 = 300.0;
/// Saturated throughput through the gateway, as a fraction of direct.
const TARGET_THROUGHPUT_RATIO: f64 = 0.5;

fn main() -> anyhow::Result<()> {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if bench {
            run_processes(Settings::from_env()?).await
        } else {
            smoke().await
        }
    })
}

/// How long and how hard to drive each target.
#[derive(Clone, Debug)]
struct Settings {
    /// Open-loop request rate, per second.
    rate: f64,
    /// Open-loop seconds per target and round.
    seconds: f64,
    /// Open-loop rounds.
    rounds: usize,
    /// Open-loop seconds per target before measuring.
    warmup_seconds: f64,
    /// Calls in flight in the saturated runs (and HTTP/1.1 connections).
    concurrency: usize,
    /// Saturated seconds per target and round.
    saturated_seconds: f64,
    /// Saturated rounds.
    saturated_rounds: usize,
    /// HTTP/2 connections per target.
    h2_connections: usize,
    /// grpc-web and Connect over HTTP/2 rather than HTTP/1.1.
    web_http2: bool,
    /// How long the gateway may take to listen and answer right (longer
    /// under `valgrind`).
    start_secs: u64,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let defaults = Self {
            rate: 1000.0,
            seconds: 3.0,
            rounds: 4,
            warmup_seconds: 1.0,
            concurrency: 32,
            saturated_seconds: 2.5,
            saturated_rounds: 2,
            h2_connections: 4,
            web_http2: false,
            start_secs: 30,
        };
        let settings = Self {
            rate: env_or("AGORA_BENCH_RATE", defaults.rate)?,
            seconds: env_or("AGORA_BENCH_SECONDS", defaults.seconds)?,
            rounds: env_or("AGORA_BENCH_ROUNDS", defaults.rounds)?,
            warmup_seconds: env_or("AGORA_BENCH_WARMUP_SECONDS", defaults.warmup_seconds)?,
            concurrency: env_or("AGORA_BENCH_CONCURRENCY", defaults.concurrency)?,
            saturated_seconds: env_or("AGORA_BENCH_SATURATED_SECONDS", defaults.saturated_seconds)?,
            saturated_rounds: env_or("AGORA_BENCH_SATURATED_ROUNDS", defaults.saturated_rounds)?,
            h2_connections: env_or("AGORA_BENCH_H2_CONNECTIONS", defaults.h2_connections)?,
            web_http2: env_or("AGORA_BENCH_WEB_HTTP2", 0u8)? != 0,
            start_secs: env_or("AGORA_BENCH_START_SECS", defaults.start_secs)?,
        };
        anyhow::ensure!(
            settings.rate > 0.0
                && settings.seconds > 0.0
                && settings.rounds > 0
                && settings.concurrency > 0
                && settings.h2_connections > 0,
            "AGORA_BENCH_RATE, _SECONDS, _ROUNDS, _CONCURRENCY and _H2_CONNECTIONS must be above 0"
        );
        Ok(settings)
    }

    /// A fraction of a second per target: enough to exercise every path.
    fn smoke() -> Self {
        Self {
            rate: 200.0,
            seconds: 0.25,
            rounds: 1,
            warmup_seconds: 0.1,
            concurrency: 4,
            saturated_seconds: 0.25,
            saturated_rounds: 1,
            h2_connections: 2,
            web_http2: false,
            start_secs: 30,
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .map_err(|err| anyhow::anyhow!("{name}={value:?}: {err}")),
        Err(_) => Ok(default),
    }
}

// ---------------------------------------------------------------------------
// The real processes.
// ---------------------------------------------------------------------------

/// A child process of the bench, killed when dropped.
struct Spawned {
    child: Child,
    log: PathBuf,
}

impl Spawned {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for an error message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails when the process has exited.
    fn ensure_running(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{name} exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }
}

impl Drop for Spawned {
    /// SIGTERM first, so that a process run under a profiler writes its
    /// profile; SIGKILL when it is not gone within 30 s.
    fn drop(&mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        if terminated {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release binary: `AGORA_BENCH_AGORA`, else `<target dir>/release/agora`.
fn agora_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AGORA_BENCH_AGORA") {
        return Ok(PathBuf::from(path));
    }
    let root = agora_testkit::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_relative() {
                root.join(dir)
            } else {
                dir
            }
        })
        .unwrap_or_else(|| root.join("target"));
    let path = target.join("release").join("agora");
    anyhow::ensure!(
        path.exists(),
        "no release binary at {}: run `just bench gateway` (it builds one) \
         or `cargo build --release -p agora`",
        path.display()
    );
    Ok(path)
}

/// The commit measured, `+dirty` when the tree has uncommitted changes.
fn describe_tree() -> String {
    let root = agora_testkit::workspace_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|status| !status.is_empty());
    if dirty { format!("{head}+dirty") } else { head }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        agora_testkit::free_port()?,
    )))
}

/// `agora serve catalog` and `agora serve gateway` as separate processes on
/// free ports, one product created; then the whole benchmark.
async fn run_processes(settings: Settings) -> anyhow::Result<()> {
    let agora = agora_binary()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let keygen = Command::new(&agora)
        .arg("keygen")
        .arg("--dir")
        .arg(data.join("keys"))
        .output()?;
    anyhow::ensure!(
        keygen.status.success(),
        "agora keygen failed: {}",
        String::from_utf8_lossy(&keygen.stderr)
    );

    let catalog_addr = free_addr()?;
    let gateway_addr = free_addr()?;
    let log_level = std::env::var("AGORA_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into());
    let spawn = |target: &str| -> anyhow::Result<Spawned> {
        let log = dir.path().join(format!("{target}.log"));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(&agora);
        command
            .args(["serve", target])
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env_remove("AGORA_CONFIG")
            .env("AGORA_DATA_DIR", &data)
            // No broker: catalog's outbox relay retries in the background,
            // as in the binary tests.
            .env("AGORA_NATS_URL", agora_testkit::UNREACHABLE_NATS)
            // Logs at warn (so no access log): the figures are the proxy's,
            // not its logging's (`AGORA_BENCH_RUST_LOG` to measure that).
            .env("RUST_LOG", &log_level)
            .env("AGORA_CATALOG__LISTEN_ADDR", catalog_addr.to_string())
            .env("AGORA_GATEWAY__LISTEN_ADDR", gateway_addr.to_string())
            .env("AGORA_GATEWAY__RATE_LIMIT_PER_SEC", "0")
            .env(
                "AGORA_CATALOG__ADDRESSES",
                format!("[\"http://{catalog_addr}\"]"),
            )
            .stdout(Stdio::null())
            .stderr(file);
        // The services not started here point at a closed port, never at a
        // developer's `just up` on the default ports.
        for other in ["users", "inventory", "payments", "orders", "notifications"] {
            command.env(
                format!("AGORA_{}__ADDRESSES", other.to_uppercase()),
                "[\"http://127.0.0.1:1\"]",
            );
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting agora serve {target}"))?;
        Ok(Spawned { child, log })
    };

    let mut catalog_process = spawn("catalog")?;
    let health = Command::new(&agora)
        .args(["health", "--wait", "60", &format!("catalog={catalog_addr}")])
        .output()?;
    if !health.status.success() {
        anyhow::bail!(
            "catalog did not become healthy:\n{}\n{}",
            String::from_utf8_lossy(&health.stdout),
            catalog_process.log_tail()
        );
    }
    let token = admin_token(&data)?;
    let product_id = create_product(catalog_addr, &token).await?;
    let mut gateway_process = spawn("gateway")?;
    // Its port first; `bench` then waits for right answers through it.
    let deadline = Instant::now() + Duration::from_secs(settings.start_secs);
    while TcpStream::connect(gateway_addr).await.is_err() {
        gateway_process.ensure_running("gateway")?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the gateway did not listen on {gateway_addr} within {} s:\n{}",
            settings.start_secs,
            gateway_process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let processes = Processes {
        gateway: gateway_process.pid(),
        catalog: catalog_process.pid(),
    };
    println!(
        "agora {} ({}), {} cores; catalog pid {} on {catalog_addr}, gateway pid {} on {gateway_addr}; SQLite, logs at {log_level}",
        describe_tree(),
        agora.display(),
        std::thread::available_parallelism().map_or(0, usize::from),
        processes.catalog,
        processes.gateway,
    );
    let outcome = bench(
        &settings,
        catalog_addr,
        gateway_addr,
        &product_id,
        Some(processes),
    )
    .await;
    // A process that died explains a failed run better than its symptoms.
    catalog_process.ensure_running("catalog")?;
    gateway_process.ensure_running("gateway")?;
    let report = outcome?;
    print!("{}", report.render(&settings));
    Ok(())
}

/// An admin token signed with the user-token key `agora keygen` wrote, as
/// `agora seed` makes one.
fn admin_token(data: &Path) -> anyhow::Result<String> {
    let mut config = agora_platform::config::Config {
        data_dir: data.to_path_buf(),
        ..Default::default()
    };
    config.use_default_key_files(&["users"]);
    let issuer = agora_platform::auth::TokenIssuer::from_config(&config.auth)
        .context("loading the user-token signing key")?;
    Ok(issuer
        .issue_user_token(
            "agora-bench",
            "bench@agora.localhost",
            &["admin".to_owned()],
        )?
        .token)
}

/// Creates the product every request reads; returns its id.
async fn create_product(catalog_addr: SocketAddr, admin_token: &str) -> anyhow::Result<String> {
    let mut client = CatalogServiceClient::connect(format!("http://{catalog_addr}")).await?;
    let mut request = tonic::Request::new(catalog::CreateProductRequest {
        sku: "BENCH-GATEWAY-001".into(),
        name: "Gateway bench product".into(),
        description: "The product every benchmark request reads.".into(),
        price: Some(Money {
            currency_code: "EUR".into(),
            amount_minor: 1999,
        }),
        categories: vec!["bench".into()],
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {admin_token}").parse()?);
    let product = client
        .create_product(request)
        .await
        .context("creating the benchmark product")?
        .into_inner()
        .product
        .context("catalog returned no product")?;
    Ok(product.id)
}

/// Under `cargo test`: catalog and a gateway in this process, every target
/// driven for a fraction of a second; any error or missing sample fails.
async fn smoke() -> anyhow::Result<()> {
    use agora_testkit::{Backend, TestEnv, TestServer};
    let mut env = TestEnv::per_service(Backend::Sqlite).await?;
    let server = TestServer::start(vec![agora_catalog::hosted(&env.config).await?]).await?;
    let catalog_addr = server.addr();
    env.config.catalog.addresses = vec![format!("http://{catalog_addr}")];
    for other in [
        &mut env.config.users,
        &mut env.config.inventory,
        &mut env.config.payments,
        &mut env.config.orders,
        &mut env.config.notifications,
    ] {
        other.addresses = vec!["http://127.0.0.1:1".into()];
    }
    env.config.gateway.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    env.config.gateway.rate_limit_per_sec = 0;
    let gateway =
        agora_gateway::Gateway::bind(&env.config, agora_platform_client::Discovery::Static).await?;
    let gateway_addr = gateway.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(gateway.run_until_stopped(stop.clone()));

    let product_id = create_product(catalog_addr, &env.admin_token()?).await?;
    let settings = Settings::smoke();
    let report = bench(&settings, catalog_addr, gateway_addr, &product_id, None).await?;
    let rendered = report.render(&settings);
    println!("{rendered}");

    stop.cancel();
    task.await??;
    server.stop().await?;

    for (index, name) in report.targets.iter().enumerate() {
        let open: Vec<_> = report.open.iter().filter(|r| r.target == index).collect();
        let closed: Vec<_> = report.closed.iter().filter(|r| r.target == index).collect();
        anyhow::ensure!(
            !open.is_empty() && !closed.is_empty(),
            "{name}: no measured run"
        );
        for run in &open {
            anyhow::ensure!(
                run.errors == 0 && run.ok > 0,
                "{name}: open loop {} ok, {} errors ({:?})",
                run.ok,
                run.errors,
                run.first_error
            );
        }
        for run in &closed {
            anyhow::ensure!(
                run.errors == 0 && run.ok > 0,
                "{name}: saturated {} ok, {} errors ({:?})",
                run.ok,
                run.errors,
                run.first_error
            );
        }
    }
    anyhow::ensure!(
        rendered.contains("| gateway, grpc-web"),
        "the table lacks a target"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The client: one request, a fixed pool of connections.
// ---------------------------------------------------------------------------

/// A wire format of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// `application/grpc`, HTTP/2, trailers.
    Grpc,
    /// `application/grpc-web+proto`: gRPC frames, the status in a trailer frame.
    GrpcWeb,
    /// Connect unary, `application/json`: the bare JSON message.
    ConnectJson,
}

/// One way of making the call.
#[derive(Clone, Debug)]
struct TargetSpec {
    name: String,
    addr: SocketAddr,
    protocol: Protocol,
    http2: bool,
    via_gateway: bool,
}

type H1Sender = http1::SendRequest<Full<Bytes>>;
type H2Sender = http2::SendRequest<Full<Bytes>>;

/// The connections of one target.
enum Pool {
    /// Calls share the connections, round robin.
    H2 {
        senders: Vec<H2Sender>,
        next: AtomicUsize,
    },
    /// One call per connection at a time; a call waits for a free one
    /// (that wait counts in its latency, as it would for a browser). Taken
    /// in turn (first in, first out), so that none idles long enough for
    /// the server to close it during a run.
    H1 {
        idle: Mutex<VecDeque<H1Sender>>,
        permits: Semaphore,
    },
}

/// A target's request and connections; cheap to clone.
#[derive(Clone)]
struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    spec: TargetSpec,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    pool: Pool,
    /// HTTP/1.1 connections opened again because the server had closed them.
    reconnects: AtomicUsize,
    /// The answer's payload length, learnt when verified: a different one
    /// during a run is an error (a truncated or wrong answer).
    expected_len: AtomicUsize,
}

async fn tcp(addr: SocketAddr) -> Result<TokioIo<TcpStream>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connecting to {addr}: {err}"))?;
    // Without it a small request waits on Nagle and a delayed ACK (~40 ms).
    stream
        .set_nodelay(true)
        .map_err(|err| format!("TCP_NODELAY: {err}"))?;
    Ok(TokioIo::new(stream))
}

async fn connect_h1(addr: SocketAddr) -> Result<H1Sender, String> {
    let (sender, connection) = http1::handshake(tcp(addr).await?)
        .await
        .map_err(|err| format!("HTTP/1.1 handshake with {addr}: {err}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn connect_h2(addr: SocketAddr) -> Result<H2Sender, String> {
    let (sender, connection) = http2::handshake(TokioExecutor::new(), tcp(addr).await?)
        .await
        .map_err(|err| format!("HTTP/2 handshake with {addr}: {err}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

impl Client {
    async fn connect(
        spec: TargetSpec,
        product_id: &str,
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        let message = catalog::GetProductRequest {
            id: product_id.to_owned(),
        }
        .encode_to_vec();
        let mut headers = HeaderMap::new();
        let body = match spec.protocol {
            Protocol::Grpc | Protocol::GrpcWeb => {
                let content_type = if spec.protocol == Protocol::Grpc {
                    headers.insert(header::TE, HeaderValue::from_static("trailers"));
                    "application/grpc"
                } else {
                    headers.insert("x-grpc-web", HeaderValue::from_static("1"));
                    "application/grpc-web+proto"
                };
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                Bytes::from(grpc_frame(0, &message))
            }
            Protocol::ConnectJson => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                headers.insert("connect-protocol-version", HeaderValue::from_static("1"));
                Bytes::from(serde_json::to_vec(
                    &serde_json::json!({ "id": product_id }),
                )?)
            }
        };
        let (uri, pool) = if spec.http2 {
            let mut senders = Vec::with_capacity(settings.h2_connections);
            for _ in 0..settings.h2_connections {
                senders.push(connect_h2(spec.addr).await.map_err(anyhow::Error::msg)?);
            }
            let uri: Uri = format!("http://{}{PATH}", spec.addr).parse()?;
            let pool = Pool::H2 {
                senders,
                next: AtomicUsize::new(0),
            };
            (uri, pool)
        } else {
            headers.insert(header::HOST, HeaderValue::from_str(&spec.addr.to_string())?);
            let mut idle = VecDeque::with_capacity(settings.concurrency);
            for _ in 0..settings.concurrency {
                idle.push_back(connect_h1(spec.addr).await.map_err(anyhow::Error::msg)?);
            }
            let pool = Pool::H1 {
                permits: Semaphore::new(idle.len()),
                idle: Mutex::new(idle),
            };
            (Uri::from_static(PATH), pool)
        };
        Ok(Self {
            inner: Arc::new(ClientInner {
                spec,
                uri,
                headers,
                body,
                pool,
                reconnects: AtomicUsize::new(0),
                expected_len: AtomicUsize::new(usize::MAX),
            }),
        })
    }

    fn request(&self) -> Result<Request<Full<Bytes>>, String> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.inner.uri.clone())
            .body(Full::new(self.inner.body.clone()))
            .map_err(|err| format!("building the request: {err}"))?;
        *request.headers_mut() = self.inner.headers.clone();
        Ok(request)
    }

    /// One call: its payload (the protobuf message, or the JSON body) when
    /// the answer is a success, else what was wrong.
    async fn call(&self) -> Result<Bytes, String> {
        let request = self.request()?;
        let (status, headers, trailers, body) = match &self.inner.pool {
            Pool::H2 { senders, next } => {
                let index = next.fetch_add(1, Ordering::Relaxed) % senders.len();
                let mut sender = senders
                    .get(index)
                    .cloned()
                    .ok_or_else(|| "no connection".to_owned())?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|err| format!("HTTP/2 request: {err}"))?;
                read_response(response).await?
            }
            Pool::H1 { idle, permits } => {
                let permit = permits
                    .acquire()
                    .await
                    .map_err(|err| format!("connection pool: {err}"))?;
                let mut sender = idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front()
                    .ok_or_else(|| "no idle connection".to_owned())?;
                let mut request = Some(request);
                let result = loop {
                    // A server may close a keep-alive connection that idles
                    // (the gateway does): as a browser, the call then takes a
                    // new one, and the reconnect counts in its latency.
                    if sender.ready().await.is_err() {
                        self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
                        match connect_h1(self.inner.spec.addr).await {
                            Ok(fresh) => sender = fresh,
                            Err(err) => {
                                // One connection fewer: one permit fewer too.
                                permit.forget();
                                return Err(err);
                            }
                        }
                    }
                    let Some(this) = request.take() else {
                        break Err("the request was not sent, twice".to_owned());
                    };
                    match sender.send_request(this).await {
                        // Closed before the request went out: it was not
                        // sent, so it may go once more, on a new connection.
                        Err(err) if err.is_canceled() => request = self.request().ok(),
                        Err(err) => break Err(format!("HTTP/1.1 request: {err}")),
                        // The body read to its end before the connection goes
                        // back to the pool: HTTP/1.1 has one call at a time.
                        Ok(response) => break read_response(response).await,
                    }
                };
                idle.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_back(sender);
                drop(permit);
                result?
            }
        };
        let payload = check(
            self.inner.spec.protocol,
            status,
            &headers,
            trailers.as_ref(),
            body,
        )?;
        let expected = self.inner.expected_len.load(Ordering::Relaxed);
        if expected != usize::MAX && payload.len() != expected {
            return Err(format!(
                "an answer of {} bytes, expected {expected}",
                payload.len()
            ));
        }
        Ok(payload)
    }

    /// Between runs, with no call in flight: opens again the HTTP/1.1
    /// connections the server closed while they idled (the gateway closes
    /// an idle keep-alive connection after `gateway.header_read_timeout_ms`),
    /// so that a run does not pay for the pause before it. Returns how many.
    async fn refresh(&self) -> usize {
        let Pool::H1 { idle, .. } = &self.inner.pool else {
            return 0;
        };
        let senders: Vec<H1Sender> = idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        let mut reopened = 0;
        let mut kept = VecDeque::with_capacity(senders.len());
        for mut sender in senders {
            // One that cannot be opened again is left closed: the call that
            // takes it reconnects (or fails) then.
            if sender.ready().await.is_err()
                && let Ok(fresh) = connect_h1(self.inner.spec.addr).await
            {
                sender = fresh;
                reopened += 1;
            }
            kept.push_back(sender);
        }
        idle.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&mut kept);
        reopened
    }

    /// One call whose answer must be the product: sets the payload length
    /// the runs then expect.
    async fn verify(&self, product_id: &str) -> Result<(), String> {
        let payload = self.call().await?;
        let id = match self.inner.spec.protocol {
            Protocol::Grpc | Protocol::GrpcWeb => {
                catalog::GetProductResponse::decode(payload.clone())
                    .map_err(|err| format!("decoding GetProductResponse: {err}"))?
                    .product
                    .map(|product| product.id)
            }
            Protocol::ConnectJson => serde_json::from_slice::<serde_json::Value>(&payload)
                .map_err(|err| format!("decoding the JSON answer: {err}"))?
                .pointer("/product/id")
                .and_then(|id| id.as_str())
                .map(str::to_owned),
        };
        if id.as_deref() != Some(product_id) {
            return Err(format!(
                "answered product {id:?}, not {product_id}: {}",
                String::from_utf8_lossy(&payload)
            ));
        }
        self.inner
            .expected_len
            .store(payload.len(), Ordering::Relaxed);
        Ok(())
    }
}

type Answer = (StatusCode, HeaderMap, Option<HeaderMap>, Bytes);

async fn read_response(response: http::Response<hyper::body::Incoming>) -> Result<Answer, String> {
    let (parts, body) = response.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|err| format!("reading the body: {err}"))?;
    let trailers = collected.trailers().cloned();
    Ok((parts.status, parts.headers, trailers, collected.to_bytes()))
}

/// A gRPC (and grpc-web) frame: flag, big-endian length, payload.
fn grpc_frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(flag);
    frame.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(payload);
    frame
}

/// The message frame and the trailer frame (grpc-web's 0x80) of a body.
fn split_frames(mut body: &[u8]) -> Result<(Option<Bytes>, Option<String>), String> {
    let (mut message, mut trailer) = (None, None);
    while !body.is_empty() {
        let (&flag, rest) = body.split_first().ok_or_else(|| "empty frame".to_owned())?;
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| "a truncated frame header".to_owned())?;
        let len = u32::from_be_bytes(*len) as usize;
        let payload = rest
            .get(..len)
            .ok_or_else(|| format!("a frame of {len} bytes truncated to {}", rest.len()))?;
        if flag & 0x80 != 0 {
            trailer = Some(String::from_utf8_lossy(payload).into_owned());
        } else if message.replace(Bytes::copy_from_slice(payload)).is_some() {
            return Err("two messages in a unary answer".into());
        }
        body = rest.get(len..).unwrap_or_default();
    }
    Ok((message, trailer))
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The payload of a successful answer, or what makes it a failure.
fn check(
    protocol: Protocol,
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
    body: Bytes,
) -> Result<Bytes, String> {
    let snippet = |body: &Bytes| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if status != StatusCode::OK {
        return Err(format!("HTTP {status}: {}", snippet(&body)));
    }
    // A gateway-made error (or a trailers-only answer) has its status in
    // the headers.
    let in_headers = header_text(headers, "grpc-status");
    match protocol {
        Protocol::Grpc => {
            let grpc_status = trailers
                .and_then(|trailers| header_text(trailers, "grpc-status"))
                .or(in_headers);
            if grpc_status != Some("0") {
                let message = trailers
                    .and_then(|trailers| header_text(trailers, "grpc-message"))
                    .or_else(|| header_text(headers, "grpc-message"));
                return Err(format!("grpc-status {grpc_status:?}: {message:?}"));
            }
            split_frames(&body)?
                .0
                .ok_or_else(|| "no message frame".to_owned())
        }
        Protocol::GrpcWeb => {
            if let Some(code) = in_headers.filter(|code| *code != "0") {
                let message = header_text(headers, "grpc-message");
                return Err(format!("grpc-status {code} in the headers: {message:?}"));
            }
            let (message, trailer) = split_frames(&body)?;
            let trailer = trailer.ok_or_else(|| "no trailer frame".to_owned())?;
            let ok = trailer.split("\r\n").any(|line| {
                line.split_once(':').is_some_and(|(name, value)| {
                    name.trim().eq_ignore_ascii_case("grpc-status") && value.trim() == "0"
                })
            });
            if !ok {
                return Err(format!("trailer frame {trailer:?}"));
            }
            message.ok_or_else(|| "no message frame".to_owned())
        }
        Protocol::ConnectJson => Ok(body),
    }
}

// ---------------------------------------------------------------------------
// What the processes use: RSS, CPU.
// ---------------------------------------------------------------------------

/// The pids of the processes measured (none in the smoke test).
#[derive(Clone, Copy, Debug)]
struct Processes {
    gateway: u32,
    catalog: u32,
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User and system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from its closing ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user, system))
}

/// Clock ticks of the whole machine (`/proc/stat`): busy in processes
/// (user, nice, system, steal) and in interrupts (irq, softirq).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    // Interrupt time is no process's: loopback TCP, this benchmark's own
    // traffic, is mostly softirq.
    let field = |index: usize| values.get(index).copied();
    let busy = field(0)? + field(1)? + field(2)? + field(7)?;
    Some((busy, field(5)? + field(6)?))
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU counters at one instant.
#[derive(Clone, Copy)]
struct CpuSnapshot {
    at: Instant,
    /// (user, system) ticks.
    gateway: Option<(u64, u64)>,
    catalog: Option<(u64, u64)>,
    bench: Option<(u64, u64)>,
    machine: Option<(u64, u64)>,
}

impl CpuSnapshot {
    fn take(processes: Option<Processes>) -> Self {
        Self {
            at: Instant::now(),
            gateway: processes.and_then(|p| cpu_ticks(&p.gateway.to_string())),
            catalog: processes.and_then(|p| cpu_ticks(&p.catalog.to_string())),
            bench: cpu_ticks("self"),
            machine: machine_ticks(),
        }
    }
}

/// What the CPU did between two snapshots.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    /// CPU µs per request of the gateway and of catalog.
    gateway_us_per_call: Option<f64>,
    catalog_us_per_call: Option<f64>,
    /// The kernel's part of `gateway_us_per_call` (system time).
    gateway_sys_us_per_call: Option<f64>,
    /// CPU of this process (the load), in % of one core.
    bench_pct: Option<f64>,
    /// CPU of everything else on the machine, in % of one core.
    others_pct: Option<f64>,
    /// CPU in interrupts (mostly this benchmark's loopback traffic), in %
    /// of one core.
    interrupts_pct: Option<f64>,
}

fn cpu_use(before: &CpuSnapshot, after: &CpuSnapshot, calls: usize, hz: f64) -> CpuUse {
    let delta = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| {
        let ((user0, sys0), (user1, sys1)) = (a?, b?);
        Some((user1 + sys1).saturating_sub(user0 + sys0) as f64)
    };
    let per_call = |ticks: Option<f64>| ticks.map(|t| t / hz * 1e6 / calls.max(1) as f64);
    let gateway = delta(before.gateway, after.gateway);
    let gateway_sys = match (before.gateway, after.gateway) {
        (Some((_, sys0)), Some((_, sys1))) => Some(sys1.saturating_sub(sys0) as f64),
        _ => None,
    };
    let catalog = delta(before.catalog, after.catalog);
    let bench = delta(before.bench, after.bench);
    let seconds = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let (others_pct, interrupts_pct) = match (before.machine, after.machine) {
        (Some((busy0, irq0)), Some((busy1, irq1))) => {
            let ours = gateway.unwrap_or(0.0) + catalog.unwrap_or(0.0) + bench.unwrap_or(0.0);
            let others = busy1.saturating_sub(busy0) as f64 - ours;
            (
                Some((others / hz / seconds * 100.0).max(0.0)),
                Some(irq1.saturating_sub(irq0) as f64 / hz / seconds * 100.0),
            )
        }
        _ => (None, None),
    };
    CpuUse {
        gateway_us_per_call: per_call(gateway),
        catalog_us_per_call: per_call(catalog),
        gateway_sys_us_per_call: per_call(gateway_sys),
        bench_pct: bench.map(|ticks| ticks / hz / seconds * 100.0),
        others_pct,
        interrupts_pct,
    }
}

/// Samples the gateway's RSS every 50 ms until stopped; the peak in kB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Option<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut peak = status_kb(pid, "VmRSS");
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                peak = peak.max(status_kb(pid, "VmRSS"));
            }
            peak
        });
        Self { stop, task }
    }

    async fn finish(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.ok().flatten()
    }
}

// ---------------------------------------------------------------------------
// The load.
// ---------------------------------------------------------------------------

/// Sorted latencies in µs.
struct Latencies(Vec<f64>);

impl Latencies {
    fn new(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self(values)
    }

    /// Nearest rank: the smallest value with at least `p` of them at or below.
    fn percentile(&self, p: f64) -> f64 {
        let rank = (p * self.0.len() as f64).ceil() as usize;
        self.0
            .get(rank.saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    }

    fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }
}

/// One open-loop run of one target.
#[derive(Debug)]
struct OpenRun {
    target: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// Successful answers per second, from the first scheduled send to the
    /// last answer.
    achieved: f64,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    /// How late the calls left (scheduled -> the call's task running): the
    /// client's own floor, in every figure alike.
    lag_p50: f64,
    lag_p99: f64,
    rss_peak_kb: Option<u64>,
    /// HTTP/1.1 connections the server had closed, opened again.
    reconnects: usize,
    cpu: CpuUse,
}

/// The open loop: `rate` calls a second for `seconds`, each sent on its
/// schedule whatever the others do; latency from the scheduled instant.
async fn open_loop(
    client: &Client,
    target: usize,
    rate: f64,
    seconds: f64,
    processes: Option<Processes>,
    hz: f64,
) -> OpenRun {
    let calls = (rate * seconds).round().max(1.0) as usize;
    let interval_ns = (1e9 / rate) as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let start = Instant::now() + Duration::from_millis(5);
    // The schedule runs on a thread of its own: tokio's timer ticks in whole
    // milliseconds, as coarse as the latencies measured. A thread's sleep is
    // good to ~0.1 ms; how late each call really left is reported (`lag`).
    let scheduler = std::thread::spawn(move || {
        for i in 0..calls as u64 {
            let at = start + Duration::from_nanos(i * interval_ns);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(at).is_err() {
                break;
            }
        }
    });
    let sampler = processes.map(|p| RssSampler::start(p.gateway));
    let before = CpuSnapshot::take(processes);
    let reconnects = client.inner.reconnects.load(Ordering::Relaxed);
    let mut handles = Vec::with_capacity(calls);
    while let Some(at) = rx.recv().await {
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            let lag = at.elapsed();
            let outcome = match tokio::time::timeout(CALL_TIMEOUT, client.call()).await {
                Ok(result) => result.map(drop),
                Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
            };
            let done = Instant::now();
            (done.duration_since(at), lag, done, outcome)
        }));
    }
    let _ = scheduler.join();
    let mut latencies = Vec::with_capacity(calls);
    let mut lags = Vec::with_capacity(calls);
    let (mut errors, mut first_error, mut last_done) = (0, None, start);
    for handle in handles {
        match handle.await {
            Ok((latency, lag, done, outcome)) => {
                lags.push(lag.as_secs_f64() * 1e6);
                last_done = last_done.max(done);
                match outcome {
                    Ok(()) => latencies.push(latency.as_secs_f64() * 1e6),
                    Err(err) => {
                        errors += 1;
                        first_error.get_or_insert(err);
                    }
                }
            }
            Err(err) => {
                errors += 1;
                first_error.get_or_insert(format!("the call's task failed: {err}"));
            }
        }
    }
    let after = CpuSnapshot::take(processes);
    let rss_peak_kb = match sampler {
        Some(sampler) => sampler.finish().await,
        None => None,
    };
    let ok = latencies.len();
    let latencies = Latencies::new(latencies);
    let lags = Latencies::new(lags);
    OpenRun {
        target,
        p50: latencies.percentile(0.50),
        p99: latencies.percentile(0.99),
        max: latencies.max(),
        achieved: ok as f64 / last_done.duration_since(start).as_secs_f64().max(1e-6),
        ok,
        errors,
        first_error,
        lag_p50: lags.percentile(0.50),
        lag_p99: lags.percentile(0.99),
        rss_peak_kb,
        reconnects: client.inner.reconnects.load(Ordering::Relaxed) - reconnects,
        cpu: cpu_use(&before, &after, calls, hz),
    }
}

/// One saturated run of one target.
#[derive(Debug)]
struct ClosedRun {
    target: usize,
    throughput: f64,
    p50: f64,
    p99: f64,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    reconnects: usize,
    cpu: CpuUse,
}

/// The closed loop: `concurrency` calls in flight, each followed at once by
/// the next, for `seconds`.
async fn closed_loop(
    client: &Client,
    target: usize,
    concurrency: usize,
    seconds: f64,
    processes: Option<Processes>,
    hz: f64,
) -> ClosedRun {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let before = CpuSnapshot::take(processes);
    let reconnects = client.inner.reconnects.load(Ordering::Relaxed);
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0usize, None);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let outcome = match tokio::time::timeout(CALL_TIMEOUT, client.call()).await {
                    Ok(result) => result.map(drop),
                    Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
                };
                match outcome {
                    Ok(()) => latencies.push(sent.elapsed().as_secs_f64() * 1e6),
                    Err(err) => {
                        errors += 1;
                        first_error.get_or_insert(err);
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
    for worker in workers {
        match worker.await {
            Ok((mut done, worker_errors, worker_error)) => {
                latencies.append(&mut done);
                errors += worker_errors;
                first_error = first_error.or(worker_error);
            }
            Err(err) => {
                errors += 1;
                first_error.get_or_insert(format!("a worker failed: {err}"));
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take(processes);
    let ok = latencies.len();
    let latencies = Latencies::new(latencies);
    ClosedRun {
        target,
        throughput: ok as f64 / elapsed.max(1e-6),
        p50: latencies.percentile(0.50),
        p99: latencies.percentile(0.99),
        ok,
        errors,
        first_error,
        reconnects: client.inner.reconnects.load(Ordering::Relaxed) - reconnects,
        cpu: cpu_use(&before, &after, ok + errors, hz),
    }
}

/// A TCP relay in front of `upstream`, on a thread of its own (one core at
/// most, as a sidecar would have): bytes copied both ways, nothing parsed.
/// Its overhead over direct is what any proxy pays for the extra loopback
/// hop and wake-ups; the gateway's, less that, is the gateway's own work.
fn start_relay(upstream: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Lives as long as the benchmark: it ends with the process.
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
    });
    Ok(addr)
}

/// Everything measured.
struct Report {
    targets: Vec<String>,
    /// Index of the direct target in `targets`.
    direct: usize,
    via_gateway: Vec<bool>,
    open: Vec<OpenRun>,
    closed: Vec<ClosedRun>,
    /// HTTP/1.1 connections the gateway closed between runs, while idle.
    closed_while_idle: usize,
    rss_idle_kb: Option<u64>,
    rss_after_warmup_kb: Option<u64>,
    rss_hwm_kb: Option<u64>,
    load_before: String,
    load_after: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

/// Verifies every target, warms them up, then the interleaved open-loop
/// rounds and the saturated rounds.
async fn bench(
    settings: &Settings,
    catalog_addr: SocketAddr,
    gateway_addr: SocketAddr,
    product_id: &str,
    processes: Option<Processes>,
) -> anyhow::Result<Report> {
    let web_http2 = settings.web_http2;
    let web = if web_http2 { "h2" } else { "HTTP/1.1" };
    let specs = vec![
        TargetSpec {
            name: "direct, gRPC (h2)".into(),
            addr: catalog_addr,
            protocol: Protocol::Grpc,
            http2: true,
            via_gateway: false,
        },
        TargetSpec {
            name: "reference: TCP relay, gRPC (h2)".into(),
            addr: start_relay(catalog_addr)?,
            protocol: Protocol::Grpc,
            http2: true,
            via_gateway: false,
        },
        TargetSpec {
            name: "gateway, gRPC (h2)".into(),
            addr: gateway_addr,
            protocol: Protocol::Grpc,
            http2: true,
            via_gateway: true,
        },
        TargetSpec {
            name: format!("gateway, grpc-web ({web})"),
            addr: gateway_addr,
            protocol: Protocol::GrpcWeb,
            http2: web_http2,
            via_gateway: true,
        },
        TargetSpec {
            name: format!("gateway, Connect JSON ({web})"),
            addr: gateway_addr,
            protocol: Protocol::ConnectJson,
            http2: web_http2,
            via_gateway: true,
        },
    ];
    let hz = clock_ticks_per_sec();
    let mut clients = Vec::new();
    for spec in &specs {
        clients.push(
            Client::connect(spec.clone(), product_id, settings)
                .await
                .with_context(|| format!("connecting {}", spec.name))?,
        );
    }
    // The gateway may still be starting (its backends' health unknown):
    // each target must give the right answer once within `start_secs`.
    for client in &clients {
        let deadline = Instant::now() + Duration::from_secs(settings.start_secs);
        loop {
            match client.verify(product_id).await {
                Ok(()) => break,
                Err(err) if Instant::now() >= deadline => {
                    anyhow::bail!(
                        "{}: no right answer within {} s: {err}",
                        client.inner.spec.name,
                        settings.start_secs
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    println!("every target answered product {product_id}");
    let rss_idle_kb = processes.and_then(|p| status_kb(p.gateway, "VmRSS"));
    let load_before = loadavg();

    for (index, client) in clients.iter().enumerate() {
        let run = open_loop(
            client,
            index,
            settings.rate,
            settings.warmup_seconds,
            processes,
            hz,
        )
        .await;
        if run.errors > 0 {
            println!(
                "warm-up {}: {} errors, first: {}",
                specs[index].name,
                run.errors,
                run.first_error.as_deref().unwrap_or("")
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after_warmup_kb = processes.and_then(|p| status_kb(p.gateway, "VmRSS"));

    let count = clients.len();
    let mut closed_while_idle = 0;
    let mut open = Vec::new();
    for round in 0..settings.rounds {
        for k in 0..count {
            // Rotated each round, so no target always follows the same one.
            let index = (round + k) % count;
            closed_while_idle += clients[index].refresh().await;
            let run = open_loop(
                &clients[index],
                index,
                settings.rate,
                settings.seconds,
                processes,
                hz,
            )
            .await;
            println!(
                "open loop, round {}: {:<32} p50 {:>6.0} µs  p99 {:>6.0} µs  max {:>7.0} µs  {:>6.0} req/s  reconnects {}  errors {}{}",
                round + 1,
                specs[index].name,
                run.p50,
                run.p99,
                run.max,
                run.achieved,
                run.reconnects,
                run.errors,
                run.first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
            open.push(run);
        }
    }
    let mut closed = Vec::new();
    for round in 0..settings.saturated_rounds {
        for k in 0..count {
            let index = (round + k) % count;
            closed_while_idle += clients[index].refresh().await;
            let run = closed_loop(
                &clients[index],
                index,
                settings.concurrency,
                settings.saturated_seconds,
                processes,
                hz,
            )
            .await;
            println!(
                "saturated, round {}: {:<32} {:>7.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs  reconnects {}  errors {}{}",
                round + 1,
                specs[index].name,
                run.throughput,
                run.p50,
                run.p99,
                run.reconnects,
                run.errors,
                run.first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
            closed.push(run);
        }
    }
    Ok(Report {
        targets: specs.iter().map(|s| s.name.clone()).collect(),
        direct: 0,
        via_gateway: specs.iter().map(|s| s.via_gateway).collect(),
        open,
        closed,
        closed_while_idle,
        rss_idle_kb,
        rss_after_warmup_kb,
        rss_hwm_kb: processes.and_then(|p| status_kb(p.gateway, "VmHWM")),
        load_before,
        load_after: loadavg(),
    })
}

// ---------------------------------------------------------------------------
// The summary.
// ---------------------------------------------------------------------------

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or_else(
        || "n/a".into(),
        |kb| format!("{:.1} MiB", kb as f64 / 1024.0),
    )
}

fn opt_us(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.0}"))
}

fn percent(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.0}%")
    } else {
        "n/a".into()
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

impl Report {
    /// Runs of `target`, in round order.
    fn open_of(&self, target: usize) -> Vec<&OpenRun> {
        self.open.iter().filter(|r| r.target == target).collect()
    }

    fn closed_of(&self, target: usize) -> Vec<&ClosedRun> {
        self.closed.iter().filter(|r| r.target == target).collect()
    }

    /// Per round, gateway minus direct of `metric`: paired differences
    /// (µs) and ratios, so that a slow round moves both sides alike.
    fn paired(&self, target: usize, metric: fn(&OpenRun) -> f64) -> (Vec<f64>, Vec<f64>) {
        let direct = self.open_of(self.direct);
        let through = self.open_of(target);
        direct
            .iter()
            .zip(&through)
            .map(|(d, g)| (metric(g) - metric(d), metric(g) / metric(d)))
            .unzip()
    }

    /// The Markdown summary, for BENCHMARKS.md.
    fn render(&self, settings: &Settings) -> String {
        let mut out = String::new();
        let rounds = self.open_of(self.direct).len();
        let _ = writeln!(
            out,
            "\n### Open loop: {:.0} requests/s, {} s per target and round, {rounds} rounds interleaved (medians across rounds)\n",
            settings.rate, settings.seconds
        );
        let _ = writeln!(
            out,
            "| path | p50 µs | p99 µs | max µs | req/s | errors | p50 overhead µs (ratio) | p99 overhead µs (ratio) | gateway CPU µs/call (sys) | catalog CPU µs/call |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (index, name) in self.targets.iter().enumerate() {
            let runs = self.open_of(index);
            let p50 = median(runs.iter().map(|r| r.p50).collect());
            let p99 = median(runs.iter().map(|r| r.p99).collect());
            let max = runs.iter().map(|r| r.max).fold(f64::NAN, f64::max);
            let achieved = median(runs.iter().map(|r| r.achieved).collect());
            let errors: usize = runs.iter().map(|r| r.errors).sum();
            let gateway_cpu = median(
                runs.iter()
                    .filter_map(|r| r.cpu.gateway_us_per_call)
                    .collect(),
            );
            let gateway_sys = median(
                runs.iter()
                    .filter_map(|r| r.cpu.gateway_sys_us_per_call)
                    .collect(),
            );
            let catalog_cpu = median(
                runs.iter()
                    .filter_map(|r| r.cpu.catalog_us_per_call)
                    .collect(),
            );
            let overhead = |metric: fn(&OpenRun) -> f64| {
                if index == self.direct {
                    return "-".to_owned();
                }
                let (diffs, ratios) = self.paired(index, metric);
                let (lo, hi) = range(&diffs);
                format!(
                    "**{:+.0}** ({:.2}x; {:+.0}..{:+.0})",
                    median(diffs),
                    median(ratios),
                    lo,
                    hi
                )
            };
            let _ = writeln!(
                out,
                "| {name} | {p50:.0} | {p99:.0} | {max:.0} | {achieved:.0} | {errors} | {} | {} | {} | {} |",
                overhead(|r| r.p50),
                overhead(|r| r.p99),
                if gateway_cpu.is_finite() && gateway_sys.is_finite() {
                    format!("{gateway_cpu:.0} ({gateway_sys:.0})")
                } else {
                    "n/a".to_owned()
                },
                opt_us(catalog_cpu.is_finite().then_some(catalog_cpu)),
            );
        }
        let _ = writeln!(
            out,
            "\nOverhead: per round, gateway minus direct (median of the rounds' differences and ratios; the range of the differences after `;`)."
        );

        let _ = writeln!(
            out,
            "\n### Saturated: {} calls in flight, closed loop, {} s per target and round, {} rounds (medians)\n",
            settings.concurrency, settings.saturated_seconds, settings.saturated_rounds
        );
        let _ = writeln!(
            out,
            "| path | req/s | x direct | p50 µs | p99 µs | errors | gateway CPU µs/call | catalog CPU µs/call |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let direct_rate = median(
            self.closed_of(self.direct)
                .iter()
                .map(|r| r.throughput)
                .collect(),
        );
        let mut ratios = Vec::new();
        for (index, name) in self.targets.iter().enumerate() {
            let runs = self.closed_of(index);
            let rate = median(runs.iter().map(|r| r.throughput).collect());
            let ratio = rate / direct_rate;
            if self.via_gateway.get(index).copied().unwrap_or(false) {
                ratios.push((name.clone(), ratio));
            }
            let gateway_cpu = median(
                runs.iter()
                    .filter_map(|r| r.cpu.gateway_us_per_call)
                    .collect(),
            );
            let catalog_cpu = median(
                runs.iter()
                    .filter_map(|r| r.cpu.catalog_us_per_call)
                    .collect(),
            );
            let _ = writeln!(
                out,
                "| {name} | {rate:.0} | {ratio:.2} | {:.0} | {:.0} | {} | {} | {} |",
                median(runs.iter().map(|r| r.p50).collect()),
                median(runs.iter().map(|r| r.p99).collect()),
                runs.iter().map(|r| r.errors).sum::<usize>(),
                opt_us(gateway_cpu.is_finite().then_some(gateway_cpu)),
                opt_us(catalog_cpu.is_finite().then_some(catalog_cpu)),
            );
        }

        let gateway_peak = self
            .open
            .iter()
            .filter(|r| self.via_gateway.get(r.target).copied().unwrap_or(false))
            .filter_map(|r| r.rss_peak_kb)
            .max();
        let _ = writeln!(
            out,
            "\nGateway RSS: idle after start {}, after warm-up {}, peak during the {:.0} req/s runs {}, peak overall (VmHWM, saturated runs included) {}.",
            mib(self.rss_idle_kb),
            mib(self.rss_after_warmup_kb),
            settings.rate,
            mib(gateway_peak),
            mib(self.rss_hwm_kb),
        );
        let reconnects: usize = self.open.iter().map(|r| r.reconnects).sum::<usize>()
            + self.closed.iter().map(|r| r.reconnects).sum::<usize>();
        let _ = writeln!(
            out,
            "HTTP/1.1 connections the gateway closed while idle: {} between runs (opened again before the next run), {reconnects} during runs (opened again within a call, which counts in its latency).",
            self.closed_while_idle
        );
        let lag_p50 = median(self.open.iter().map(|r| r.lag_p50).collect());
        let lag_p99 = median(self.open.iter().map(|r| r.lag_p99).collect());
        let others = median(self.open.iter().filter_map(|r| r.cpu.others_pct).collect());
        let load = median(self.open.iter().filter_map(|r| r.cpu.bench_pct).collect());
        let interrupts = median(
            self.open
                .iter()
                .filter_map(|r| r.cpu.interrupts_pct)
                .collect(),
        );
        let _ = writeln!(
            out,
            "Machine: load average {} before, {} after; during the open-loop runs (medians) the load generator used {} of a core, interrupts (loopback traffic) {} and other processes {}; calls left {lag_p50:.0} µs (p50) / {lag_p99:.0} µs (p99) after their scheduled time (the client's floor, in every figure alike).",
            self.load_before,
            self.load_after,
            percent(load),
            percent(interrupts),
            percent(others),
        );

        let _ = writeln!(
            out,
            "\nTargets (overhead <= {TARGET_P50_OVERHEAD_US:.0} µs p50, <= {TARGET_P99_OVERHEAD_US:.0} µs p99 at {:.0} req/s; saturated >= {TARGET_THROUGHPUT_RATIO}x direct):",
            settings.rate
        );
        for (index, name) in self.targets.iter().enumerate() {
            if !self.via_gateway.get(index).copied().unwrap_or(false) {
                continue;
            }
            let p50 = median(self.paired(index, |r| r.p50).0);
            let p99_diffs = self.paired(index, |r| r.p99).0;
            let (p99_low, p99_high) = range(&p99_diffs);
            let p99 = median(p99_diffs);
            let ratio = ratios
                .iter()
                .find(|(n, _)| n == name)
                .map_or(f64::NAN, |(_, r)| *r);
            let errors: usize = self.open_of(index).iter().map(|r| r.errors).sum::<usize>()
                + self
                    .closed_of(index)
                    .iter()
                    .map(|r| r.errors)
                    .sum::<usize>();
            let _ = writeln!(
                out,
                "- {name}: p50 {:+.0} µs {}, p99 {:+.0} µs {}, saturated {}{}",
                p50,
                verdict(p50 <= TARGET_P50_OVERHEAD_US),
                p99,
                // A tail that moves by more than the budget from round to
                // round says more about the machine than the gateway.
                if p99_high - p99_low > TARGET_P99_OVERHEAD_US {
                    format!("undetermined (noisy: rounds {p99_low:+.0}..{p99_high:+.0} µs)")
                } else {
                    verdict(p99 <= TARGET_P99_OVERHEAD_US).to_owned()
                },
                if ratio.is_finite() {
                    format!("{ratio:.2}x {}", verdict(ratio >= TARGET_THROUGHPUT_RATIO))
                } else {
                    "not measured".to_owned()
                },
                if errors > 0 {
                    format!("; **{errors} errors: this run does not count**")
                } else {
                    String::new()
                }
            );
        }
        out
    }
}
