//! `agora loadgen`: shoppers browsing and checking out against running
//! services over native gRPC, like Online Boutique's load generator, with a
//! latency summary per operation at the end.
//!
//! A run has three phases:
//! 1. Preparation, not measured: the products come from `ListProducts`, and
//!    every product's stock is set to `--stock` (as admin) so that checkouts
//!    fail for other reasons than an emptied shelf; then `--concurrency`
//!    virtual users each sign up and log in with an account of their own
//!    (`loadgen-<run id>-<n>@agora.localhost`).
//! 2. The run: each virtual user loops, picking an operation by the weights
//!    of `--mix`, until `--duration` seconds have passed or `--checkouts`
//!    `PlaceOrder` calls have been made (Ctrl-C stops early; the summary is
//!    still printed). A progress line goes to stderr every second.
//! 3. The summary on stdout (and with `--json FILE`, the same numbers for
//!    scripts): per operation the calls, errors, calls/s and the latency
//!    percentiles of the successful calls (HDR histograms, microsecond
//!    resolution); errors by gRPC code and `google.rpc.ErrorInfo` reason;
//!    completed checkouts per second.
//!
//! The load is bounded: exactly `--concurrency` tasks, each with one call in
//! flight at a time (closed loop, no think time), every call with a deadline
//! (`--timeout-ms`, sent as `grpc-timeout` and enforced by the client too).
//! Each virtual user has its own connections, as distinct shoppers would,
//! so that one HTTP/2 connection does not become the bottleneck being
//! measured.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_platform::error::reason_of;
use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_proto::orders::v1 as orders;
use agora_proto::orders::v1::order_service_client::OrderServiceClient;
use agora_proto::users::v1 as users;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use anyhow::Context as _;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::seed::{self, DEFAULT_ADMIN_EMAIL};

/// Arguments of `agora loadgen`.
#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// The users service (sign-up and login of the virtual users).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub users: String,
    /// The catalog service.
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    pub catalog: String,
    /// The inventory service.
    #[arg(long, default_value = "http://127.0.0.1:50053")]
    pub inventory: String,
    /// The orders service.
    #[arg(long, default_value = "http://127.0.0.1:50055")]
    pub orders: String,
    /// Virtual users, each with its own account and connections and one call
    /// in flight at a time.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Seconds to run (default 30, or no limit with `--checkouts`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
    /// Stop after this many `PlaceOrder` calls (and after `--duration`
    /// seconds if given too, whichever comes first).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkouts: Option<u64>,
    /// What each virtual user does, per iteration.
    #[arg(long, value_enum, default_value_t = Mix::Browse)]
    pub mix: Mix,
    /// Card number every checkout pays with (the test processor declines
    /// some numbers on purpose).
    #[arg(long, default_value = "4242424242424242")]
    pub card: String,
    /// Units every product is set to before the run, so that checkouts do
    /// not fail for stock.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub stock: i64,
    /// Deadline of every call, in milliseconds.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub timeout_ms: u64,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Admin account that sets the stock.
    #[arg(long, default_value = DEFAULT_ADMIN_EMAIL)]
    pub admin_email: String,
    /// Its password; without it, an admin token is signed with the
    /// user-token key of the configuration, as `agora seed` does.
    #[arg(long, env = "AGORA_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// TOML configuration file (for the token signing key).
    #[arg(long, env = "AGORA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data folder holding the development key pair.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// The weights of the operations a virtual user picks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// Mostly browsing: ListProducts 40%, GetProduct 30%, GetStock 15%,
    /// PlaceOrder 15%.
    Browse,
    /// PlaceOrder only.
    Checkout,
    /// ListProducts 20%, GetProduct 20%, GetStock 10%, PlaceOrder 50%.
    Balanced,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Self::Browse => "browse",
            Self::Checkout => "checkout",
            Self::Balanced => "balanced",
        }
    }

    /// Percent per operation, in the order of [`Operation::ALL`]; sums to 100.
    fn weights(self) -> [u32; 4] {
        match self {
            Self::Browse => [40, 30, 15, 15],
            Self::Checkout => [0, 0, 0, 100],
            Self::Balanced => [20, 20, 10, 50],
        }
    }

    fn pick(self, rng: &mut StdRng) -> Operation {
        let mut roll = rng.gen_range(0..100);
        for (operation, weight) in Operation::ALL.into_iter().zip(self.weights()) {
            if roll < weight {
                return operation;
            }
            roll -= weight;
        }
        Operation::PlaceOrder
    }
}

/// What a virtual user does in one iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    ListProducts,
    GetProduct,
    GetStock,
    PlaceOrder,
}

impl Operation {
    const ALL: [Operation; 4] = [
        Self::ListProducts,
        Self::GetProduct,
        Self::GetStock,
        Self::PlaceOrder,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::ListProducts => "ListProducts",
            Self::GetProduct => "GetProduct",
            Self::GetStock => "GetStock",
            Self::PlaceOrder => "PlaceOrder",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How one call ended.
enum Outcome {
    Ok,
    /// A `PlaceOrder` that returned the order COMPLETED.
    CheckedOut,
    Failed(ErrorKey, String),
}

impl Outcome {
    fn of<T>(result: Result<T, Status>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(status) => Self::failed(&status),
        }
    }

    fn failed(status: &Status) -> Self {
        Self::Failed(
            ErrorKey {
                code: code_name(status.code()).to_owned(),
                reason: reason_of(status).unwrap_or_default(),
            },
            status.message().to_owned(),
        )
    }
}

/// Errors are counted per gRPC code and `ErrorInfo` reason.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ErrorKey {
    code: String,
    reason: String,
}

/// Runs the load and prints the summary; fails when nothing succeeded, or
/// with `--checkouts N` when fewer than N checkouts completed.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_millis(args.timeout_ms);
    // Short, so that the accounts of a run are easy to find; random, so that
    // runs never collide.
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let duration = args
        .duration
        .or(args.checkouts.is_none().then_some(30))
        .map(Duration::from_secs);

    let products = prepare_catalog(&args, timeout).await?;
    eprintln!(
        "loadgen {run_id}: {} products stocked; signing up {} virtual users ...",
        products.len(),
        args.concurrency
    );
    let shoppers = sign_up_shoppers(&args, &run_id, timeout).await?;
    eprintln!(
        "loadgen {run_id}: running mix {} with {} virtual users for {} ...",
        args.mix.name(),
        args.concurrency,
        match (duration, args.checkouts) {
            (Some(d), Some(n)) => format!("{n} checkouts or {} s", d.as_secs()),
            (Some(d), None) => format!("{} s", d.as_secs()),
            (None, Some(n)) => format!("{n} checkouts"),
            (None, None) => "ever".to_owned(),
        }
    );

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        checkouts_left: args.checkouts.map(AtomicU64::new),
        recorder: Mutex::new(Recorder::new()?),
        products,
        mix: args.mix,
        card: args.card.clone(),
        timeout,
    });
    let elapsed = drive(shoppers, &shared, duration).await?;
    let recorder = std::mem::replace(&mut *shared.lock(), Recorder::new()?);
    let summary = Summary {
        run_id,
        mix: args.mix,
        concurrency: args.concurrency,
        elapsed,
        recorder,
    };
    print!("{}", summary.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary.json())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    let completed = summary.recorder.checkouts;
    if let Some(wanted) = args.checkouts
        && completed < wanted
    {
        eprintln!("loadgen: {completed} of {wanted} checkouts completed");
        return Ok(ExitCode::FAILURE);
    }
    if summary.recorder.total.latency.is_empty() {
        eprintln!("loadgen: no call succeeded");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// An address as given (`http://host:port`, or `host:port`) as a URI.
fn endpoint(addr: &str, timeout: Duration) -> anyhow::Result<Endpoint> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .with_context(|| format!("bad address {addr}"))?
        .connect_timeout(timeout)
        // The client gives up at the deadline even if the server does not.
        .timeout(timeout))
}

async fn connect(service: &str, addr: &str, timeout: Duration) -> anyhow::Result<Channel> {
    endpoint(addr, timeout)?
        .connect()
        .await
        .with_context(|| format!("connecting to the {service} service at {addr}"))
}

/// `message` with the deadline (as `grpc-timeout`, so that the server stops
/// working on it too) and, for a signed-in user, their token.
fn request<T>(message: T, auth: Option<&AsciiMetadataValue>, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    if let Some(auth) = auth {
        request.metadata_mut().insert("authorization", auth.clone());
    }
    request
}

/// Lists every product and sets its stock to `--stock`; the product ids.
async fn prepare_catalog(args: &LoadgenArgs, timeout: Duration) -> anyhow::Result<Vec<String>> {
    let mut catalog = CatalogServiceClient::new(connect("catalog", &args.catalog, timeout).await?);
    let mut products = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = catalog
            .list_products(request(
                catalog::ListProductsRequest {
                    page_size: 500,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                None,
                timeout,
            ))
            .await
            .context("listing the products")?
            .into_inner();
        products.extend(page.products.into_iter().map(|p| p.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    anyhow::ensure!(
        !products.is_empty(),
        "the catalog at {} has no products: run `agora seed` first",
        args.catalog
    );

    let admin_token = match &args.admin_password {
        Some(password) => {
            let mut users = UserServiceClient::new(connect("users", &args.users, timeout).await?);
            log_in(&mut users, &args.admin_email, password, timeout)
                .await
                .context("logging in as the admin")?
        }
        None => seed::operator_admin_token(
            args.config.as_deref(),
            args.data_dir.as_deref(),
            &args.admin_email,
            "agora-loadgen",
        )
        .context("signing an admin token (or pass --admin-password)")?,
    };
    let mut inventory =
        InventoryServiceClient::new(connect("inventory", &args.inventory, timeout).await?);
    for product_id in &products {
        let mut set = seed::with_token(
            inventory::SetStockRequest {
                product_id: product_id.clone(),
                quantity: args.stock,
            },
            &admin_token,
        )?;
        set.set_timeout(timeout);
        inventory.set_stock(set).await.with_context(|| {
            format!(
                "setting the stock of {product_id} as {} (is it an admin?)",
                args.admin_email
            )
        })?;
    }
    Ok(products)
}

/// `Authenticate`: the access token.
async fn log_in(
    users: &mut UserServiceClient<Channel>,
    email: &str,
    password: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let response = users
        .authenticate(request(
            users::AuthenticateRequest {
                email: email.to_owned(),
                password: password.to_owned(),
            },
            None,
            timeout,
        ))
        .await
        .with_context(|| format!("logging in as {email}"))?;
    Ok(response.into_inner().access_token)
}

/// A virtual user, signed in, with its own connections.
struct Shopper {
    auth: AsciiMetadataValue,
    catalog: CatalogServiceClient<Channel>,
    inventory: InventoryServiceClient<Channel>,
    orders: OrderServiceClient<Channel>,
    rng: StdRng,
}

async fn sign_up_shoppers(
    args: &LoadgenArgs,
    run_id: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<Shopper>> {
    let users = UserServiceClient::new(connect("users", &args.users, timeout).await?);
    // A few at a time: password hashing is deliberately slow, and a burst of
    // sign-ups would only queue behind it.
    futures::stream::iter(0..args.concurrency)
        .map(|number| sign_up_shopper(args, users.clone(), run_id, number, timeout))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn sign_up_shopper(
    args: &LoadgenArgs,
    mut users: UserServiceClient<Channel>,
    run_id: &str,
    number: u32,
    timeout: Duration,
) -> anyhow::Result<Shopper> {
    let email = format!("loadgen-{run_id}-{number}@agora.localhost");
    let password = uuid::Uuid::new_v4().simple().to_string();
    let create = users::CreateUserRequest {
        email: email.clone(),
        name: format!("Loadgen Shopper {number}"),
        password: password.clone(),
    };
    seed::sign_up(&mut users, request(create, None, timeout))
        .await
        .with_context(|| format!("signing up {email}"))?;
    let token = log_in(&mut users, &email, &password, timeout).await?;
    Ok(Shopper {
        auth: format!("Bearer {token}")
            .parse()
            .context("the access token is not a valid header value")?,
        catalog: CatalogServiceClient::new(connect("catalog", &args.catalog, timeout).await?),
        inventory: InventoryServiceClient::new(
            connect("inventory", &args.inventory, timeout).await?,
        ),
        orders: OrderServiceClient::new(connect("orders", &args.orders, timeout).await?),
        rng: StdRng::from_entropy(),
    })
}

/// What the virtual users share.
struct Shared {
    stop: AtomicBool,
    /// `PlaceOrder` calls left with `--checkouts`.
    checkouts_left: Option<AtomicU64>,
    recorder: Mutex<Recorder>,
    products: Vec<String>,
    mix: Mix,
    card: String,
    timeout: Duration,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorder> {
        // A recorder is consistent after any panic of a holder: it only adds.
        self.recorder.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one `PlaceOrder` call off the budget; false when none is left.
    fn claim_checkout(&self) -> bool {
        self.checkouts_left.as_ref().is_none_or(|left| {
            left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        })
    }

    fn checkouts_exhausted(&self) -> bool {
        self.checkouts_left
            .as_ref()
            .is_some_and(|left| left.load(Ordering::Acquire) == 0)
    }
}

/// Runs the virtual users until they stop, printing progress every second;
/// the time they ran.
async fn drive(
    shoppers: Vec<Shopper>,
    shared: &Arc<Shared>,
    duration: Option<Duration>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for shopper in shoppers {
        workers.spawn(shop(shopper, Arc::clone(shared)));
    }
    let second = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = async {
        match duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(end);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut progress = Progress::new(started);
    let mut stopping = false;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break,
                Some(Ok(())) => {}
                Some(Err(failed)) => anyhow::bail!("a virtual user failed: {failed}"),
            },
            _ = ticker.tick() => progress.print(shared),
            () = &mut end, if !stopping => {
                stopping = true;
                shared.stop.store(true, Ordering::Release);
            }
            _ = &mut interrupted, if !stopping => {
                stopping = true;
                shared.stop.store(true, Ordering::Release);
                progress.finish();
                eprintln!("interrupted: waiting for the calls in flight");
            }
        }
    }
    progress.finish();
    Ok(started.elapsed())
}

/// One virtual user's loop: pick an operation, call, record, again.
async fn shop(mut shopper: Shopper, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) && !shared.checkouts_exhausted() {
        let operation = shared.mix.pick(&mut shopper.rng);
        if operation == Operation::PlaceOrder && !shared.claim_checkout() {
            break;
        }
        let started = Instant::now();
        let outcome = shopper.call(operation, &shared).await;
        shared.lock().record(operation, started.elapsed(), outcome);
    }
}

impl Shopper {
    async fn call(&mut self, operation: Operation, shared: &Shared) -> Outcome {
        let timeout = shared.timeout;
        let product_id = shared
            .products
            .choose(&mut self.rng)
            .cloned()
            .unwrap_or_default();
        match operation {
            // Browsing is anonymous, as on a shop's front pages.
            Operation::ListProducts => Outcome::of(
                self.catalog
                    .list_products(request(
                        catalog::ListProductsRequest {
                            page_size: 20,
                            ..Default::default()
                        },
                        None,
                        timeout,
                    ))
                    .await,
            ),
            Operation::GetProduct => Outcome::of(
                self.catalog
                    .get_product(request(
                        catalog::GetProductRequest { id: product_id },
                        None,
                        timeout,
                    ))
                    .await,
            ),
            Operation::GetStock => Outcome::of(
                self.inventory
                    .get_stock(request(
                        inventory::GetStockRequest { product_id },
                        None,
                        timeout,
                    ))
                    .await,
            ),
            Operation::PlaceOrder => {
                let count = self.rng.gen_range(1..=3);
                let items = shared
                    .products
                    .choose_multiple(&mut self.rng, count)
                    .map(|product_id| orders::LineItem {
                        product_id: product_id.clone(),
                        quantity: 1,
                    })
                    .collect();
                let place = orders::PlaceOrderRequest {
                    request_id: uuid::Uuid::now_v7().to_string(),
                    items,
                    card_number: shared.card.clone(),
                };
                match self
                    .orders
                    .place_order(request(place, Some(&self.auth), timeout))
                    .await
                {
                    Ok(response) => {
                        let status = response.into_inner().order.unwrap_or_default().status();
                        if status == orders::OrderStatus::Completed {
                            Outcome::CheckedOut
                        } else {
                            // PENDING: the saga outlived the service's wait.
                            Outcome::Failed(
                                ErrorKey {
                                    code: "OK".to_owned(),
                                    reason: status.as_str_name().to_owned(),
                                },
                                "the order was not completed when PlaceOrder returned".to_owned(),
                            )
                        }
                    }
                    Err(status) => Outcome::failed(&status),
                }
            }
        }
    }
}

/// Latencies are recorded in microseconds, up to an hour.
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The calls of one operation (or of all).
struct OperationStats {
    calls: u64,
    errors: u64,
    /// Successful calls only: a failure's latency (a deadline, a refused
    /// connection) says nothing about how fast the work is done.
    latency: Histogram<u64>,
}

impl OperationStats {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            calls: 0,
            errors: 0,
            latency: histogram()?,
        })
    }
}

/// Everything measured, since the start and over the last second.
struct Recorder {
    operations: [OperationStats; 4],
    total: OperationStats,
    checkouts: u64,
    /// Per operation and error: count and the first message seen.
    errors: BTreeMap<(&'static str, ErrorKey), (u64, String)>,
    window: Window,
}

/// The last second, for the progress line.
struct Window {
    calls: u64,
    checkouts: u64,
    latency: Histogram<u64>,
}

impl Recorder {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            operations: [
                OperationStats::new()?,
                OperationStats::new()?,
                OperationStats::new()?,
                OperationStats::new()?,
            ],
            total: OperationStats::new()?,
            checkouts: 0,
            errors: BTreeMap::new(),
            window: Window {
                calls: 0,
                checkouts: 0,
                latency: histogram()?,
            },
        })
    }

    fn record(&mut self, operation: Operation, elapsed: Duration, outcome: Outcome) {
        let micros = micros(elapsed);
        let stats = &mut self.operations[operation.index()];
        stats.calls += 1;
        self.total.calls += 1;
        self.window.calls += 1;
        match outcome {
            Outcome::Ok | Outcome::CheckedOut => {
                stats.latency.saturating_record(micros);
                self.total.latency.saturating_record(micros);
                self.window.latency.saturating_record(micros);
                if matches!(outcome, Outcome::CheckedOut) {
                    self.checkouts += 1;
                    self.window.checkouts += 1;
                }
            }
            Outcome::Failed(key, message) => {
                stats.errors += 1;
                self.total.errors += 1;
                self.errors
                    .entry((operation.name(), key))
                    .or_insert((0, message))
                    .0 += 1;
            }
        }
    }
}

/// The progress line on stderr: rewritten in place on a terminal, one line
/// per second otherwise (logs, CI).
struct Progress {
    started: Instant,
    last: Instant,
    terminal: bool,
    printed: bool,
}

impl Progress {
    fn new(started: Instant) -> Self {
        Self {
            started,
            last: started,
            terminal: std::io::stderr().is_terminal(),
            printed: false,
        }
    }

    fn print(&mut self, shared: &Shared) {
        let now = Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64().max(1e-3);
        self.last = now;
        let (calls, checkouts, errors, p50, p99) = {
            let mut recorder = shared.lock();
            let errors = recorder.total.errors;
            let window = &mut recorder.window;
            let line = (
                window.calls,
                window.checkouts,
                errors,
                window.latency.value_at_quantile(0.5),
                window.latency.value_at_quantile(0.99),
            );
            window.calls = 0;
            window.checkouts = 0;
            window.latency.reset();
            line
        };
        let line = format!(
            "{:>6.1} s  {:>8.1} req/s  {:>7.1} checkouts/s  {errors} errors  p50 {} ms  p99 {} ms",
            now.duration_since(self.started).as_secs_f64(),
            calls as f64 / seconds,
            checkouts as f64 / seconds,
            millis(p50),
            millis(p99),
        );
        if self.terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.printed = true;
    }

    /// Ends a line left open on a terminal.
    fn finish(&mut self) {
        if self.terminal && self.printed {
            eprintln!();
            self.printed = false;
        }
    }
}

/// Microseconds as milliseconds with two decimals.
fn millis(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

/// The end of a run.
struct Summary {
    run_id: String,
    mix: Mix,
    concurrency: u32,
    elapsed: Duration,
    recorder: Recorder,
}

impl Summary {
    fn per_second(&self, count: u64) -> f64 {
        count as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    fn table(&self) -> String {
        let mut out = format!(
            "\nagora loadgen: run {}, mix {}, {} virtual users, {:.2} s\n\n",
            self.run_id,
            self.mix.name(),
            self.concurrency,
            self.elapsed.as_secs_f64()
        );
        out.push_str(&format!(
            "{:<14} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "OPERATION",
            "CALLS",
            "ERRORS",
            "CALLS/S",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        ));
        let rows = Operation::ALL
            .iter()
            .map(|operation| {
                (
                    operation.name(),
                    &self.recorder.operations[operation.index()],
                )
            })
            .chain([("all", &self.recorder.total)]);
        for (name, stats) in rows {
            if stats.calls == 0 {
                continue;
            }
            let latency = &stats.latency;
            out.push_str(&format!(
                "{:<14} {:>9} {:>7} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
                name,
                stats.calls,
                stats.errors,
                self.per_second(stats.calls),
                millis(latency.value_at_quantile(0.5)),
                millis(latency.value_at_quantile(0.9)),
                millis(latency.value_at_quantile(0.99)),
                millis(latency.value_at_quantile(0.999)),
                millis(latency.max()),
            ));
        }
        out.push_str("(latencies of the successful calls)\n\n");
        out.push_str(&format!(
            "checkouts: {} completed, {:.1}/s\n",
            self.recorder.checkouts,
            self.per_second(self.recorder.checkouts)
        ));
        if self.recorder.errors.is_empty() {
            out.push_str("errors: none\n");
        } else {
            out.push_str(
                "errors (operation, gRPC code, ErrorInfo reason, count, first message):\n",
            );
            for ((operation, key), (count, message)) in &self.recorder.errors {
                out.push_str(&format!(
                    "  {operation:<14} {:<20} {:<24} {count:>7}  {}\n",
                    key.code,
                    if key.reason.is_empty() {
                        "-"
                    } else {
                        &key.reason
                    },
                    message.chars().take(120).collect::<String>()
                ));
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let stats = |stats: &OperationStats| {
            let latency = &stats.latency;
            let ms = |micros: u64| micros as f64 / 1000.0;
            serde_json::json!({
                "calls": stats.calls,
                "errors": stats.errors,
                "calls_per_sec": self.per_second(stats.calls),
                "latency_ms": {
                    "p50": ms(latency.value_at_quantile(0.5)),
                    "p90": ms(latency.value_at_quantile(0.9)),
                    "p99": ms(latency.value_at_quantile(0.99)),
                    "p99_9": ms(latency.value_at_quantile(0.999)),
                    "max": ms(latency.max()),
                },
            })
        };
        let operations: serde_json::Map<_, _> = Operation::ALL
            .iter()
            .map(|operation| {
                (
                    operation.name().to_owned(),
                    stats(&self.recorder.operations[operation.index()]),
                )
            })
            .collect();
        let errors: Vec<_> = self
            .recorder
            .errors
            .iter()
            .map(|((operation, key), (count, message))| {
                serde_json::json!({
                    "operation": operation,
                    "code": key.code,
                    "reason": key.reason,
                    "count": count,
                    "message": message,
                })
            })
            .collect();
        serde_json::json!({
            "run_id": self.run_id,
            "mix": self.mix.name(),
            "concurrency": self.concurrency,
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "checkouts": self.recorder.checkouts,
            "checkouts_per_sec": self.per_second(self.recorder.checkouts),
            "operations": operations,
            "all": stats(&self.recorder.total),
            "errors": errors,
        })
    }
}

/// The canonical name of a gRPC status code, as in the gRPC docs and logs.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mix_adds_up_to_one_hundred_percent() {
        for mix in [Mix::Browse, Mix::Checkout, Mix::Balanced] {
            assert_eq!(mix.weights().iter().sum::<u32>(), 100, "{mix:?}");
        }
    }

    #[test]
    fn the_checkout_mix_only_places_orders() {
        let mut rng = StdRng::seed_from_u64(7);
        assert!((0..1000).all(|_| Mix::Checkout.pick(&mut rng) == Operation::PlaceOrder));
    }

    #[test]
    fn the_browse_mix_is_mostly_browsing() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[Mix::Browse.pick(&mut rng).index()] += 1;
        }
        // 40/30/15/15 within a couple of percent.
        for (count, weight) in counts.iter().zip(Mix::Browse.weights()) {
            assert!(count.abs_diff(weight * 100) < 250, "{counts:?}");
        }
    }

    #[test]
    fn a_checkout_budget_is_spent_exactly_once() -> anyhow::Result<()> {
        let shared = Shared {
            stop: AtomicBool::new(false),
            checkouts_left: Some(AtomicU64::new(2)),
            recorder: Mutex::new(Recorder::new()?),
            products: Vec::new(),
            mix: Mix::Checkout,
            card: String::new(),
            timeout: Duration::from_secs(1),
        };
        assert!(shared.claim_checkout());
        assert!(!shared.checkouts_exhausted());
        assert!(shared.claim_checkout());
        assert!(shared.checkouts_exhausted());
        assert!(!shared.claim_checkout());
        Ok(())
    }

    #[test]
    fn the_summary_counts_failures_apart_from_latencies() -> anyhow::Result<()> {
        let mut recorder = Recorder::new()?;
        recorder.record(
            Operation::PlaceOrder,
            Duration::from_millis(4),
            Outcome::CheckedOut,
        );
        recorder.record(
            Operation::PlaceOrder,
            Duration::from_secs(5),
            Outcome::Failed(
                ErrorKey {
                    code: "FAILED_PRECONDITION".into(),
                    reason: "CARD_DECLINED".into(),
                },
                "card declined".into(),
            ),
        );
        let summary = Summary {
            run_id: "test".into(),
            mix: Mix::Checkout,
            concurrency: 1,
            elapsed: Duration::from_secs(2),
            recorder,
        };
        let json = summary.json();
        assert_eq!(json["checkouts"], 1);
        assert_eq!(json["operations"]["PlaceOrder"]["calls"], 2);
        assert_eq!(json["operations"]["PlaceOrder"]["errors"], 1);
        // The failure's 5 s is not a latency of the work.
        let max = json["operations"]["PlaceOrder"]["latency_ms"]["max"]
            .as_f64()
            .unwrap_or_default();
        assert!((3.9..4.1).contains(&max), "{max}");
        assert_eq!(json["errors"][0]["reason"], "CARD_DECLINED");
        let table = summary.table();
        assert!(table.contains("checkouts: 1 completed, 0.5/s"), "{table}");
        assert!(table.contains("CARD_DECLINED"), "{table}");
        Ok(())
    }
}
