//! Layered, typed configuration.
//!
//! Sources, later ones winning: built-in defaults, an optional TOML file
//! (`--config` / `AGORA_CONFIG`), environment variables prefixed `AGORA_` with
//! `__` separating nested keys (`AGORA_USERS__DATABASE_URL`), and finally
//! command-line flags, which the binary merges through [`load`]'s `overrides`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A value that must never be printed: its `Debug` and `Display` say
/// `[redacted]`. Read it with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself; call it only where the value is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How logs are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Everything an Agora process needs to know, for every service it may run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where services keep local state: SQLite files, development keys, .eml files.
    pub data_dir: PathBuf,
    /// Log output format.
    pub log_format: LogFormat,
    /// NATS server for domain events.
    pub nats_url: String,
    /// Domain events: streams, retries, retention.
    pub events: EventsConfig,
    /// The checkout saga: deadlines, leases, reservation expiry.
    pub checkout: CheckoutConfig,
    /// Calls between services: discovery, deadlines, retries, circuit breakers.
    pub clients: ClientsConfig,
    /// SMTP server for the notifications service (`smtp://host:port`,
    /// `smtps://user:pass@host`); unset writes `.eml` files under
    /// `<data_dir>/mail/` instead. May hold a password, hence secret.
    pub smtp_url: Option<Secret<String>>,
    /// The `From` address of emails.
    pub mail_from: String,
    /// Token signing and verification.
    pub auth: AuthConfig,
    /// The users service.
    pub users: ServiceConfig,
    /// The catalog service.
    pub catalog: ServiceConfig,
    /// The inventory service.
    pub inventory: ServiceConfig,
    /// The payments service.
    pub payments: ServiceConfig,
    /// The orders service.
    pub orders: ServiceConfig,
    /// The notifications service.
    pub notifications: ServiceConfig,
    /// The edge gateway: the one public port.
    pub gateway: GatewayConfig,
    /// Transport limits of every service's gRPC server.
    pub server: ServerConfig,
    /// Password hashing: how many hashes may run at once, how long a call
    /// waits for one, the longest password.
    pub passwords: PasswordConfig,
    /// `WatchOrder` streams: how many, for how long, how often re-read.
    pub watch: WatchConfig,
}

/// Transport limits of every service's gRPC server (the gateway has its own
/// under `gateway.*`): what one connection, one call and one service may
/// ask of a process, so that no caller (a misbehaving neighbour, an internal
/// port reached by mistake, a burst of legitimate traffic) can take it down.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Streams one HTTP/2 connection may have open at once (at least 1);
    /// the client queues the rest until one ends.
    pub max_concurrent_streams: u32,
    /// Calls one hosted service runs at once (a stream counts until its
    /// answer starts; open streams have their own caps, `watch.*`, so they
    /// never starve unary calls); a call beyond it is refused at once with
    /// RESOURCE_EXHAUSTED (reason `OVERLOADED`) and `google.rpc.RetryInfo`,
    /// never queued. Health and reflection are not counted, so probes
    /// answer under load. At least 1.
    pub max_in_flight_per_service: usize,
    /// Seconds between HTTP/2 keepalive pings on a connection that has
    /// been quiet that long; a peer that does not answer within
    /// `keepalive_timeout_secs` is dropped, with its calls. Also the idle
    /// time before TCP keepalive probes. At least 1.
    pub keepalive_interval_secs: u64,
    /// Seconds a keepalive ping may go unanswered (and between TCP
    /// keepalive probes). At least 1.
    pub keepalive_timeout_secs: u64,
    /// The largest request message, in bytes (its size on the wire, without
    /// the 5-byte gRPC frame header); a larger one is refused from its
    /// length prefix with RESOURCE_EXHAUSTED (`MESSAGE_TOO_LARGE`). Each
    /// call's message is held whole before its handler runs, so this times
    /// the calls in flight is what requests can cost in memory (bounded
    /// overall by `max_buffered_request_bytes`). The default, 256 KiB, is
    /// over ten times the largest legitimate request (`CreateProduct` with
    /// a 20 KB description, about 22 KB).
    pub max_request_bytes: usize,
    /// Request bytes all calls together may hold buffered at once (each
    /// call's message is read whole before its handler runs), in bytes: a
    /// message is admitted once its length prefix is in and its length is
    /// still free, else refused at once with RESOURCE_EXHAUSTED (`OVERLOADED`)
    /// and `google.rpc.RetryInfo`, never waited for. Its share is given back
    /// when the handler has answered. At least `max_request_bytes` + 5, so
    /// that a message of the largest size can be admitted at all.
    pub max_buffered_request_bytes: usize,
    /// Milliseconds a request message may take to arrive whole once the
    /// call's headers are in, whatever deadline the caller states: a caller
    /// that stalls its body is answered DEADLINE_EXCEEDED and its slot and
    /// buffered bytes are freed. 0: no limit but the caller's deadline.
    pub body_read_timeout_ms: u64,
    /// The largest response message a server sends, in bytes: a larger one
    /// fails the call (OUT_OF_RANGE, tonic's code) instead of being sent.
    pub max_response_bytes: usize,
    /// Deadline of a unary call whose caller sets none, in milliseconds:
    /// past it the handler is dropped and the caller gets
    /// DEADLINE_EXCEEDED. Streams are not bounded by it. 0: no default.
    pub default_timeout_ms: u64,
    /// The longest deadline a caller may state, in milliseconds: a longer
    /// `grpc-timeout` (a deadline of years) is cut to it, so that no caller
    /// holds a handler longer. A stream's deadline bounds only its setup
    /// (until its answer starts), as before; its lifetime is bounded by its
    /// own limits (`watch.max_lifetime_secs`). 0: no cap.
    pub max_timeout_ms: u64,
    /// Connections the server keeps open at once, all clients together (at
    /// least 1): the next one is accepted only once one closes, and waits
    /// in the kernel's listen backlog until then, so that connections
    /// cannot exhaust file descriptors or the memory each one costs. A
    /// connection that sends nothing for 10 s after connecting is closed.
    pub max_connections: usize,
    /// Seconds a connection lives at most: then the server sends GOAWAY,
    /// calls in flight get 30 s to finish, and the client reconnects (as
    /// gRPC clients do). A peer answering keepalive pings cannot hold a
    /// connection slot forever. Longer than `watch.max_lifetime_secs`.
    pub max_connection_age_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 200,
            max_in_flight_per_service: 512,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 10,
            max_request_bytes: 256 * 1024,
            max_buffered_request_bytes: 32 * 1024 * 1024,
            body_read_timeout_ms: 10_000,
            max_response_bytes: 16 * 1024 * 1024,
            default_timeout_ms: 30_000,
            max_timeout_ms: 300_000,
            max_connections: 4_096,
            max_connection_age_secs: 3_600,
        }
    }
}

impl ServerConfig {
    /// Refuses settings under which the server could not serve as
    /// documented: checked when a server is bound, so that a process never
    /// starts with them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // A message is accounted with its 5-byte gRPC frame header.
        let largest = self.max_request_bytes.saturating_add(5);
        if self.max_buffered_request_bytes < largest {
            return Err(ConfigError(format!(
                "server.max_buffered_request_bytes ({}) must be at least \
                 server.max_request_bytes + 5 ({largest}): a message of the \
                 largest size could never be admitted",
                self.max_buffered_request_bytes
            )));
        }
        Ok(())
    }
}

/// Password hashing (argon2id, about 19 MiB and tens of milliseconds of one
/// core per hash): bounded, so that a burst of sign-ups or logins cannot
/// exhaust the users service's memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordConfig {
    /// Hashes computed at once; 0 sizes it from the machine: no more than
    /// the cores, nor than fit (19 MiB each) in a quarter of the memory
    /// limit (cgroup v2 or v1, else physical memory), at least 1. The chosen
    /// size is logged at startup.
    pub max_concurrent_hashes: usize,
    /// Calls that may wait for a hash slot at once; beyond it they are
    /// refused at once with RESOURCE_EXHAUSTED and `RetryInfo`.
    pub max_waiting: usize,
    /// Milliseconds a call waits for a slot (less if its deadline is
    /// nearer) before RESOURCE_EXHAUSTED.
    pub max_wait_ms: u64,
    /// The longest password accepted, in bytes (UTF-8). The default, 1024,
    /// admits every password the earlier limit of 256 characters did, so
    /// no existing user is locked out; the contract's own limit on the
    /// field is 1024 too, so a larger value has no effect. Hashing cost
    /// barely depends on the length (argon2 pre-hashes the password).
    pub max_password_bytes: usize,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            max_concurrent_hashes: 0,
            max_waiting: 64,
            max_wait_ms: 2_000,
            max_password_bytes: 1024,
        }
    }
}

/// `WatchOrder` streams (orders service): bounded in number and lifetime,
/// and fed by one shared re-read per replica instead of one per stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// Streams one user may have open at once (on one replica); beyond it
    /// `WatchOrder` is RESOURCE_EXHAUSTED (`TOO_MANY_WATCHES`). 0 turns
    /// watching off.
    pub max_streams_per_user: usize,
    /// Streams one replica serves at once, all users together.
    pub max_streams: usize,
    /// Seconds a stream stays open at most (at least 1); it then ends with
    /// OK and the client watches again if it still cares.
    pub max_lifetime_secs: u64,
    /// Milliseconds between two checks of the watched orders (at least
    /// 10; one light query of status and `updated_at` per 500 watched
    /// orders, however many streams, and a full read of only the orders
    /// that changed), which catch changes made by other replicas. This
    /// replica's own changes arrive at once.
    pub poll_interval_ms: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            max_streams_per_user: 16,
            max_streams: 10_000,
            max_lifetime_secs: 1_800,
            poll_interval_ms: 1_000,
        }
    }
}

/// The edge gateway (`agora serve gateway`): where it listens, who may call
/// it from a browser, how much one client may ask of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The one public port: gRPC, grpc-web, Connect, `/healthz`, `/readyz`
    /// and `/metrics`.
    pub listen_addr: SocketAddr,
    /// PEM certificate chain; with `tls_key_file`, the port speaks TLS
    /// (HTTP/2 by ALPN, and HTTP/1.1) instead of cleartext.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Browser origins allowed by CORS (`https://shop.example.com`).
    pub cors_allowed_origins: Vec<String>,
    /// Development only: allow any origin (echoed back, never `*`).
    pub cors_allow_any_origin: bool,
    /// Requests a client may make per second, on average (token bucket
    /// refill rate); a client is its user id when the call carries a valid
    /// token, else its IP address. 0 turns rate limiting off.
    pub rate_limit_per_sec: u32,
    /// Requests a client may make at once after being idle (bucket size).
    pub rate_limit_burst: u32,
    /// Clients whose buckets are remembered at most; past that the idlest
    /// are forgotten first, so memory stays bounded whatever the traffic.
    pub rate_limit_max_clients: usize,
    /// The largest request body or message, in bytes (grpc-web, Connect,
    /// and every gRPC message frame). The default, 256 KiB, is the
    /// services' own `server.max_request_bytes`: the gateway does not hold
    /// what they would refuse anyway (a Connect JSON body of the largest
    /// legitimate request is about 30 KB).
    pub max_request_bytes: usize,
    /// The largest response message the gateway converts (Connect JSON), in
    /// bytes.
    pub max_response_bytes: usize,
    /// Request bodies the gateway holds whole at once (Connect unary calls),
    /// in bytes, all clients together: past it, RESOURCE_EXHAUSTED, so that
    /// many large bodies cannot exhaust memory.
    pub max_buffered_request_bytes: usize,
    /// Connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// The largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// A client must send its request head within this many milliseconds
    /// (slow clients are cut off), and each piece of a body the gateway
    /// reads whole (Connect unary) within as long of the previous one.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight is closed after this many
    /// seconds. An HTTP/1.1 keep-alive connection waits for its next
    /// request head at most `header_read_timeout_ms` (hyper's header timer
    /// runs from the end of the previous answer), so this bounds HTTP/2.
    pub idle_timeout_secs: u64,
    /// Streams one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Calls the gateway has in flight at once, all clients together
    /// (streams count while open): past it a call is refused at once with
    /// RESOURCE_EXHAUSTED (`OVERLOADED`; HTTP 429 for Connect) and
    /// `RetryInfo`, never queued. `/healthz`, `/readyz` and `/metrics` are
    /// not counted.
    pub max_in_flight: usize,
    /// Seconds between HTTP/2 keepalive pings on a connection; a client
    /// that does not answer within `keepalive_timeout_secs` is dropped.
    pub keepalive_interval_secs: u64,
    /// Seconds a keepalive ping may go unanswered.
    pub keepalive_timeout_secs: u64,
    /// Deadline of a unary call whose client sets none, in milliseconds.
    pub default_timeout_ms: u64,
    /// The longest deadline a client may ask for (and that of a streaming
    /// call that sets none), in milliseconds: longer ones are cut to it.
    pub max_timeout_ms: u64,
    /// Take the client IP (for rate limiting and the access log) from the
    /// last `x-forwarded-for` address, the one the proxy in front of the
    /// gateway appended (earlier ones are the client's to forge): only
    /// behind exactly one such proxy.
    pub trust_forwarded_for: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert_file: None,
            tls_key_file: None,
            cors_allowed_origins: Vec::new(),
            cors_allow_any_origin: false,
            rate_limit_per_sec: 100,
            rate_limit_burst: 200,
            rate_limit_max_clients: 100_000,
            max_request_bytes: 256 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
            max_buffered_request_bytes: 64 * 1024 * 1024,
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_secs: 300,
            max_concurrent_streams: 200,
            max_in_flight: 10_000,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 10,
            default_timeout_ms: 30_000,
            max_timeout_ms: 300_000,
            trust_forwarded_for: false,
        }
    }
}

/// Domain event settings shared by every service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Copies of each JetStream stream in a NATS cluster: 1 on a single
    /// server, 3 in production.
    pub stream_replicas: usize,
    /// Deliveries after which a consumer gives up on a failing event and
    /// moves it to the dead-letter stream.
    pub dead_letter_after: i64,
    /// Hours published outbox rows are kept before they are pruned.
    pub outbox_retention_hours: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            stream_replicas: 1,
            dead_letter_after: 5,
            outbox_retention_hours: 24,
        }
    }
}

/// Checkout saga settings (orders drives the saga, inventory expires the
/// reservations it leaves behind, payments settles interrupted charges).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckoutConfig {
    /// Deadline of one saga step (one call to inventory or payments,
    /// retries included), in milliseconds.
    pub step_timeout_ms: u64,
    /// Deadline of a whole checkout, in milliseconds: a saga still running
    /// after it compensates instead of going on.
    pub saga_timeout_ms: u64,
    /// How long `PlaceOrder` waits for its saga to finish before it returns
    /// the order as PENDING (the client can then `WatchOrder`).
    pub place_order_wait_ms: u64,
    /// How long a replica's claim on a saga lasts without renewal; a dead
    /// replica's sagas are taken over after it.
    pub lease_ms: u64,
    /// Seconds a stock reservation holds its units unless committed; then
    /// inventory releases it, so stock held by a saga that never finishes
    /// comes back. Well above `saga_timeout_ms`.
    pub reservation_ttl_secs: u64,
    /// Milliseconds between two sweeps of inventory's expired reservations
    /// and of payments' unsettled charges.
    pub sweep_interval_ms: u64,
    /// Milliseconds a payment may stay `processing` (claimed, the provider's
    /// answer not recorded: payments died in between) before the sweeper
    /// settles it from the provider's books, or voids it when the provider
    /// has nothing. Well above how long one provider call may take.
    pub payment_settle_after_ms: u64,
}

impl Default for CheckoutConfig {
    fn default() -> Self {
        Self {
            step_timeout_ms: 5_000,
            saga_timeout_ms: 30_000,
            place_order_wait_ms: 10_000,
            lease_ms: 10_000,
            reservation_ttl_secs: 900,
            sweep_interval_ms: 5_000,
            payment_settle_after_ms: 60_000,
        }
    }
}

/// How a service finds and calls another (`agora-platform-client`): where
/// the instances are, how long a call may take, when a failed call is tried
/// again, and when an instance that keeps failing is left alone for a while.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientsConfig {
    /// Where the instances of a service are found: `static` (each service's
    /// `addresses`, else its `listen_addr`) or `nats` (the instances
    /// registered in the `agora_services` key-value bucket on `nats_url`,
    /// where `agora serve` registers every service it runs).
    pub discovery: DiscoveryMode,
    /// Deadline of an outgoing call in milliseconds, unless the caller set a
    /// shorter one or the request being served has less time left.
    pub default_timeout_ms: u64,
    /// At most this many retries of a call the caller marked idempotent that
    /// failed with UNAVAILABLE (0: never retry).
    pub max_retries: u32,
    /// Retries allowed on top of the calls made, in percent of the calls of
    /// the last 10 seconds (plus one retry per second whatever the traffic),
    /// so that retries cannot multiply the load on a service that is down.
    pub retry_budget_percent: u32,
    /// Consecutive failures of one instance (UNAVAILABLE, DEADLINE_EXCEEDED,
    /// no connection) that open its circuit breaker: calls to it then fail
    /// at once, without touching the network.
    pub breaker_failure_threshold: u32,
    /// Milliseconds an open circuit breaker waits before it lets one probe
    /// call through (half-open): success closes it, failure opens it again.
    pub breaker_recovery_ms: u64,
    /// Seconds between two heartbeats of a registered instance (`nats`
    /// discovery): each re-writes its address, health and time.
    pub heartbeat_secs: u64,
    /// Seconds after its last heartbeat an instance counts as gone: its key
    /// expires from the bucket and clients stop calling it. Several
    /// heartbeats long, so one late heartbeat does not drop an instance.
    pub instance_ttl_secs: u64,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        Self {
            discovery: DiscoveryMode::Static,
            default_timeout_ms: 5_000,
            max_retries: 2,
            retry_budget_percent: 20,
            breaker_failure_threshold: 5,
            breaker_recovery_ms: 5_000,
            heartbeat_secs: 2,
            instance_ttl_secs: 10,
        }
    }
}

/// Where clients find the instances of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// Addresses from configuration (`<service>.addresses`, else its
    /// `listen_addr`): one process, Compose, or Kubernetes Service DNS.
    #[default]
    Static,
    /// Instances registered in NATS, each with its health and heartbeat.
    Nats,
}

/// Settings of one service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Address the gRPC server binds; port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// `postgres://...` or `sqlite://...`; unset means a SQLite file named after
    /// the service under `data_dir`. May hold a password, hence secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<Secret<String>>,
    /// Where other services call this one with static discovery, as URIs:
    /// `http://payments:50054` (a Kubernetes Service) or several replicas'
    /// addresses. Empty: `http://<listen_addr>`, an unspecified address
    /// (`0.0.0.0`, `[::]`) read as 127.0.0.1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The address this service registers for others to dial with `nats`
    /// discovery (`http://10.1.2.3:50054`; `http://` is assumed when no
    /// scheme is given). Default: the address it bound, an unspecified one
    /// read as 127.0.0.1 (which only reaches processes on the same host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    /// Ed25519 private key (PKCS#8 PEM file) this service signs its service
    /// tokens with, when it calls another service's internal RPCs. Each
    /// service has its own, held by that service only; its public half goes
    /// to `auth.service_public_keys` / `auth.service_public_key_dir` of every
    /// service. Default: `<data_dir>/keys/services/<service>.pem` if present
    /// and this process runs the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// The same key as PEM text (for example from a Kubernetes Secret); wins
    /// over `signing_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_pem: Option<Secret<String>>,
}

impl ServiceConfig {
    fn on_port(port: u16) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            database_url: None,
            addresses: Vec::new(),
            advertise_addr: None,
            signing_key_file: None,
            signing_key_pem: None,
        }
    }
}

impl ServiceConfig {
    /// The addresses clients dial with static discovery: `addresses`, or
    /// `http://<listen_addr>`.
    pub fn dial_addresses(&self) -> Vec<String> {
        if self.addresses.is_empty() {
            vec![dialable(self.listen_addr)]
        } else {
            self.addresses.clone()
        }
    }

    /// The address this service registers once it has bound `bound`:
    /// `advertise_addr`, or `bound` as an `http://` URI.
    pub fn advertised_address(&self, bound: SocketAddr) -> String {
        match &self.advertise_addr {
            Some(address) if address.contains("://") => address.clone(),
            Some(address) => format!("http://{address}"),
            None => dialable(bound),
        }
    }
}

/// `http://<addr>`, with an unspecified IP (bind to every interface) replaced
/// by 127.0.0.1, the one of them every local client can reach.
fn dialable(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// JWT settings. Keys are PEM files (PKCS#8 private key, SPKI public key) or
/// inline PEM text, which wins over the file when both are set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `iss` claim of issued tokens, and the only issuer accepted.
    pub issuer: String,
    /// Lifetime of an access token, in seconds.
    pub token_ttl_secs: u64,
    /// Ed25519 private key file; only the users service (the issuer) needs it.
    pub private_key_file: Option<PathBuf>,
    /// Ed25519 private key as PEM text.
    pub private_key_pem: Option<Secret<String>>,
    /// Ed25519 public key file of user tokens: the current key, the public
    /// half of the key the users service signs with; every service verifies
    /// tokens with it.
    pub public_key_file: Option<PathBuf>,
    /// The current user-token public key as PEM text (wins over the file).
    pub public_key_pem: Option<String>,
    /// Other user-token public key files, accepted beside the current one
    /// while the user-token key is rotated: the next key (so that every
    /// service accepts its tokens before the users service signs with it),
    /// or the previous one (until the last token it signed has expired).
    /// A token names its key in `kid` and is verified with that key only.
    /// Empty outside a rotation. As an environment variable:
    /// `AGORA_AUTH__ADDITIONAL_PUBLIC_KEY_FILES='["/keys/old.pub.pem"]'`.
    pub additional_public_key_files: Vec<PathBuf>,
    /// Like `additional_public_key_files`, as PEM text.
    pub additional_public_keys: Vec<String>,
    /// Public keys of service tokens: service name -> SPKI PEM text. A
    /// service token is verified with the key of the service its `kid`
    /// header names, so only that service can sign tokens in its name. Set
    /// one per variable: `AGORA_AUTH__SERVICE_PUBLIC_KEYS__ORDERS="$(cat
    /// orders.pub.pem)"`. Wins over a file of the same service in
    /// `service_public_key_dir`.
    pub service_public_keys: BTreeMap<String, String>,
    /// A folder of service public keys, one `<service>.pub.pem` file each (as
    /// `agora keygen` writes them to `<dir>/services/`, or a Kubernetes
    /// ConfigMap mounted as a volume); other files are ignored, and so is
    /// the user-token key `jwt_ed25519.pub.pem` when it lies there too.
    /// Default: `<data_dir>/keys/services/` if present.
    pub service_public_key_dir: Option<PathBuf>,
    /// Lifetime of a service token, in seconds. A caller re-signs its token
    /// for a target once less than half of it is left, so a stolen token is
    /// of use for this long at most (plus 30 s of tolerated clock skew).
    pub service_token_ttl_secs: u64,
    /// Emails that receive the admin role when they sign up (the way to
    /// bootstrap the first admin; `just up` seeds one).
    pub admin_emails: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "agora".to_owned(),
            token_ttl_secs: 3600,
            private_key_file: None,
            private_key_pem: None,
            public_key_file: None,
            public_key_pem: None,
            additional_public_key_files: Vec::new(),
            additional_public_keys: Vec::new(),
            service_public_keys: BTreeMap::new(),
            service_public_key_dir: None,
            service_token_ttl_secs: 60,
            admin_emails: Vec::new(),
        }
    }
}

impl Default for Config {
    /// The defaults of shared/CONTRACT.md: services on 127.0.0.1:50051..50056,
    /// SQLite under `.data/`, NATS on its standard port.
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".data"),
            log_format: LogFormat::Pretty,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            events: EventsConfig::default(),
            checkout: CheckoutConfig::default(),
            clients: ClientsConfig::default(),
            smtp_url: None,
            mail_from: "Agora <no-reply@agora.localhost>".to_owned(),
            auth: AuthConfig::default(),
            users: ServiceConfig::on_port(50051),
            catalog: ServiceConfig::on_port(50052),
            inventory: ServiceConfig::on_port(50053),
            payments: ServiceConfig::on_port(50054),
            orders: ServiceConfig::on_port(50055),
            notifications: ServiceConfig::on_port(50056),
            gateway: GatewayConfig::default(),
            server: ServerConfig::default(),
            passwords: PasswordConfig::default(),
            watch: WatchConfig::default(),
        }
    }
}

/// File name of the development private key under `<data_dir>/keys/`.
pub const PRIVATE_KEY_FILE: &str = "jwt_ed25519.pem";
/// File name of the development public key under `<data_dir>/keys/`.
pub const PUBLIC_KEY_FILE: &str = "jwt_ed25519.pub.pem";
/// Folder of the service token key pairs under `<data_dir>/keys/`.
pub const SERVICE_KEYS_DIR: &str = "services";

/// File name of the private key service `service` signs its service tokens
/// with, in [`SERVICE_KEYS_DIR`].
pub fn service_private_key_file(service: &str) -> String {
    format!("{service}.pem")
}

/// File name of the public key of service `service`'s tokens, in
/// [`SERVICE_KEYS_DIR`] (or any `auth.service_public_key_dir`).
pub fn service_public_key_file(service: &str) -> String {
    format!("{service}{SERVICE_PUBLIC_KEY_SUFFIX}")
}

/// How the name of a service public key file ends.
pub const SERVICE_PUBLIC_KEY_SUFFIX: &str = ".pub.pem";

impl Config {
    /// Where no token key is configured, uses the keys `agora keygen` writes
    /// to `<data_dir>/keys/`, if they are there, but only the private keys
    /// the `services` run by this process need: the user-token signing key
    /// when `users` is among them, and the service-token signing key of each
    /// of them. Public keys are always used. So in the mesh (one process per
    /// service) a process holds no other service's private key, and only the
    /// users process can sign user tokens.
    pub fn use_default_key_files(&mut self, services: &[&str]) {
        let keys = self.data_dir.join("keys");
        let service_keys = keys.join(SERVICE_KEYS_DIR);
        let existing = |path: PathBuf| path.exists().then_some(path);
        let auth = &mut self.auth;
        if services.contains(&"users")
            && auth.private_key_pem.is_none()
            && auth.private_key_file.is_none()
        {
            auth.private_key_file = existing(keys.join(PRIVATE_KEY_FILE));
        }
        if auth.public_key_pem.is_none() && auth.public_key_file.is_none() {
            auth.public_key_file = existing(keys.join(PUBLIC_KEY_FILE));
        }
        if auth.service_public_key_dir.is_none() {
            auth.service_public_key_dir = existing(service_keys.clone());
        }
        for name in services {
            if let Some(service) = self.service_mut(name)
                && service.signing_key_pem.is_none()
                && service.signing_key_file.is_none()
            {
                service.signing_key_file =
                    existing(service_keys.join(service_private_key_file(name)));
            }
        }
    }

    fn service_mut(&mut self, name: &str) -> Option<&mut ServiceConfig> {
        Some(match name {
            "users" => &mut self.users,
            "catalog" => &mut self.catalog,
            "inventory" => &mut self.inventory,
            "payments" => &mut self.payments,
            "orders" => &mut self.orders,
            "notifications" => &mut self.notifications,
            _ => return None,
        })
    }

    /// The settings of the service called `name` (`users`, `catalog`, ...).
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        Some(match name {
            "users" => &self.users,
            "catalog" => &self.catalog,
            "inventory" => &self.inventory,
            "payments" => &self.payments,
            "orders" => &self.orders,
            "notifications" => &self.notifications,
            _ => return None,
        })
    }

    /// The database URL of service `name`: the configured one, or a SQLite file
    /// `<data_dir>/<name>.db`, created on first use.
    pub fn database_url(&self, name: &str) -> Secret<String> {
        match self.service(name).and_then(|s| s.database_url.clone()) {
            Some(url) => url,
            None => Secret::new(format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join(format!("{name}.db")).display()
            )),
        }
    }
}

/// Loads the configuration: defaults, then `file` if given, then `AGORA_*`
/// environment variables, then `overrides` (typically command-line flags,
/// as a partial document such as `{"users": {"listen_addr": "..."}}`).
pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                file.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    figment
        .merge(
            Env::prefixed("AGORA_")
                // Only variables that name a configuration key: other AGORA_*
                // variables (AGORA_CONFIG, the test kit's) are not config.
                // Typos below a known key are still rejected by name.
                .filter(|key| top_level_keys().contains(&top_level(key.as_str())))
                .split("__"),
        )
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(|err| ConfigError(err.to_string()))
}

/// The keys of [`Config`] (`AGORA_<KEY>` or `AGORA_<KEY>__<NESTED>`), read
/// off its serialized defaults so that a new field needs no second list.
fn top_level_keys() -> &'static [String] {
    static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => Vec::new(),
    })
}

fn top_level(env_key: &str) -> String {
    env_key
        .split("__")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Configuration that could not be read or does not fit the schema; the
/// message names the key and the source it came from.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

#[cfg(test)]
// figment's Jail closures must return its (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let mut config = Config::default();
        config.users.database_url = Some(Secret::new("postgres://u:hunter2@db/users".into()));
        config.auth.private_key_pem = Some(Secret::new("-----BEGIN PRIVATE KEY-----".into()));
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("BEGIN PRIVATE KEY"), "{printed}");
        assert!(printed.contains("[redacted]"));
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_overrides() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "agora.toml",
                "nats_url = \"nats://file:4222\"\n[users]\nlisten_addr = \"127.0.0.1:1111\"\n[catalog]\nlisten_addr = \"127.0.0.1:2222\"\n",
            )?;
            jail.set_env("AGORA_CATALOG__LISTEN_ADDR", "127.0.0.1:3333");
            jail.set_env("AGORA_AUTH__TOKEN_TTL_SECS", "60");
            jail.set_env("AGORA_CONFIG", "ignored: not a key");
            jail.set_env("AGORA_SOMETHING_ELSE", "ignored: not a key");
            let overrides = serde_json::json!({"users": {"listen_addr": "127.0.0.1:4444"}});
            let config = load(Some(Path::new("agora.toml")), overrides)
                .map_err(|e| figment::Error::from(e.to_string()))?;
            assert_eq!(config.nats_url, "nats://file:4222"); // file over default
            assert_eq!(config.catalog.listen_addr.port(), 3333); // env over file
            assert_eq!(config.users.listen_addr.port(), 4444); // flag over file
            assert_eq!(config.auth.token_ttl_secs, 60);
            assert_eq!(config.orders.listen_addr.port(), 50055); // default
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("agora.toml", "[users]\nlisten_adr = \"127.0.0.1:1\"\n")?;
            let err = load(Some(Path::new("agora.toml")), serde_json::json!({}))
                .expect_err("typo must be rejected");
            assert!(err.to_string().contains("listen_adr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn lists_and_secrets_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "AGORA_AUTH__ADMIN_EMAILS",
                r#"["admin@agora.localhost", "b@x.io"]"#,
            );
            jail.set_env("AGORA_SMTP_URL", "smtp://127.0.0.1:2525");
            jail.set_env("AGORA_EVENTS__DEAD_LETTER_AFTER", "2");
            let config = load(None, serde_json::json!({}))
                .map_err(|e| figment::Error::from(e.to_string()))?;
            assert_eq!(config.events.dead_letter_after, 2);
            assert_eq!(
                config.auth.admin_emails,
                ["admin@agora.localhost", "b@x.io"]
            );
            assert_eq!(
                config.smtp_url.as_ref().map(|s| s.expose().as_str()),
                Some("smtp://127.0.0.1:2525")
            );
            Ok(())
        });
    }

    #[test]
    fn typos_below_a_known_key_in_the_environment_are_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AGORA_USERS__LISTEN_ADR", "127.0.0.1:1");
            let err = load(None, serde_json::json!({})).expect_err("typo must be rejected");
            assert!(err.to_string().contains("listen_adr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn clients_dial_the_listen_address_unless_addresses_are_given() {
        let mut service = ServiceConfig::on_port(50054);
        assert_eq!(service.dial_addresses(), ["http://127.0.0.1:50054"]);
        service.listen_addr = "0.0.0.0:7000".parse().expect("address");
        assert_eq!(service.dial_addresses(), ["http://127.0.0.1:7000"]);
        service.listen_addr = "[::]:7000".parse().expect("address");
        assert_eq!(service.dial_addresses(), ["http://127.0.0.1:7000"]);
        let bound = "[::1]:7001".parse().expect("address");
        assert_eq!(service.advertised_address(bound), "http://[::1]:7001");
        service.advertise_addr = Some("10.1.2.3:50054".into());
        assert_eq!(service.advertised_address(bound), "http://10.1.2.3:50054");
        service.addresses = vec!["http://payments:50054".into()];
        assert_eq!(service.dial_addresses(), ["http://payments:50054"]);
    }

    #[test]
    fn clients_settings_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AGORA_CLIENTS__DISCOVERY", "nats");
            jail.set_env("AGORA_CLIENTS__MAX_RETRIES", "0");
            jail.set_env(
                "AGORA_PAYMENTS__ADDRESSES",
                r#"["http://payments-0:50054", "http://payments-1:50054"]"#,
            );
            let config = load(None, serde_json::json!({}))
                .map_err(|e| figment::Error::from(e.to_string()))?;
            assert_eq!(config.clients.discovery, DiscoveryMode::Nats);
            assert_eq!(config.clients.max_retries, 0);
            assert_eq!(config.clients.default_timeout_ms, 5_000);
            assert_eq!(config.payments.addresses.len(), 2);
            Ok(())
        });
    }

    #[test]
    fn default_database_is_a_sqlite_file_per_service() {
        let config = Config::default();
        assert_eq!(
            config.database_url("users").expose(),
            "sqlite://.data/users.db?mode=rwc"
        );
    }

    #[test]
    fn default_key_files_give_a_process_only_the_private_keys_of_its_services() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        let services = keys.join(SERVICE_KEYS_DIR);
        std::fs::create_dir_all(&services).expect("mkdir");
        for file in [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE] {
            std::fs::write(keys.join(file), "pem").expect("write");
        }
        for name in ["users", "orders", "payments"] {
            std::fs::write(services.join(service_private_key_file(name)), "pem").expect("write");
            std::fs::write(services.join(service_public_key_file(name)), "pem").expect("write");
        }
        let base = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };

        let mut orders = base.clone();
        orders.use_default_key_files(&["orders"]);
        assert_eq!(orders.auth.private_key_file, None);
        assert_eq!(
            orders.auth.public_key_file,
            Some(keys.join(PUBLIC_KEY_FILE))
        );
        assert_eq!(orders.auth.service_public_key_dir, Some(services.clone()));
        assert_eq!(
            orders.orders.signing_key_file,
            Some(services.join("orders.pem"))
        );
        assert_eq!(orders.payments.signing_key_file, None);
        assert_eq!(orders.users.signing_key_file, None);

        let mut users = base.clone();
        users.use_default_key_files(&["users"]);
        assert_eq!(
            users.auth.private_key_file,
            Some(keys.join(PRIVATE_KEY_FILE))
        );
        assert_eq!(
            users.users.signing_key_file,
            Some(services.join("users.pem"))
        );
        assert_eq!(users.orders.signing_key_file, None);

        // Configured keys win; a missing file is not used.
        let mut mono = base;
        mono.payments.signing_key_pem = Some(Secret::new("inline".into()));
        mono.use_default_key_files(&["users", "catalog", "payments", "orders"]);
        assert_eq!(mono.payments.signing_key_file, None);
        assert_eq!(mono.catalog.signing_key_file, None);
        assert!(mono.auth.private_key_file.is_some());
        assert!(mono.orders.signing_key_file.is_some());
    }

    #[test]
    fn service_keys_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "AGORA_AUTH__SERVICE_PUBLIC_KEYS__ORDERS",
                "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n",
            );
            jail.set_env(
                "AGORA_AUTH__SERVICE_PUBLIC_KEY_DIR",
                "/etc/agora/public-keys",
            );
            jail.set_env("AGORA_AUTH__SERVICE_TOKEN_TTL_SECS", "30");
            jail.set_env("AGORA_ORDERS__SIGNING_KEY_FILE", "/etc/agora/orders.pem");
            jail.set_env(
                "AGORA_PAYMENTS__SIGNING_KEY_PEM",
                "-----BEGIN PRIVATE KEY-----",
            );
            let config = load(None, serde_json::json!({}))
                .map_err(|e| figment::Error::from(e.to_string()))?;
            assert_eq!(
                config
                    .auth
                    .service_public_keys
                    .get("orders")
                    .map(String::as_str),
                // Trimmed by figment; PEM parsing does not need the newline.
                Some("-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----")
            );
            assert_eq!(
                config.auth.service_public_key_dir.as_deref(),
                Some(Path::new("/etc/agora/public-keys"))
            );
            assert_eq!(config.auth.service_token_ttl_secs, 30);
            assert_eq!(
                config.orders.signing_key_file.as_deref(),
                Some(Path::new("/etc/agora/orders.pem"))
            );
            assert!(config.payments.signing_key_pem.is_some());
            Ok(())
        });
    }

    #[test]
    fn the_request_byte_budget_must_admit_the_largest_message() {
        let defaults = ServerConfig::default();
        defaults.validate().expect("the defaults are valid");
        // Exactly one largest message (with its frame header) fits.
        let tight = ServerConfig {
            max_request_bytes: 1_000,
            max_buffered_request_bytes: 1_005,
            ..ServerConfig::default()
        };
        tight.validate().expect("room for one message");
        let err = ServerConfig {
            max_buffered_request_bytes: 1_004,
            ..tight
        }
        .validate()
        .expect_err("no message of the largest size could be admitted");
        assert!(
            err.to_string()
                .contains("server.max_buffered_request_bytes"),
            "{err}"
        );
    }
}
