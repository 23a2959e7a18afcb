//! `WatchOrder` under load, over real gRPC on loopback, on PostgreSQL and
//! SQLite: the caps per user and per replica refuse at once with
//! RESOURCE_EXHAUSTED (`TOO_MANY_WATCHES`, RetryInfo), slots come back
//! however a stream ends, streams end with OK after their lifetime, and the
//! database reads of the one shared poll do not grow with the number of
//! watchers, and read orders in full only when they changed (counted by a
//! decorator around the real store).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agora_orders::changes::OrderChanges;
use agora_orders::checkout::{Backends, Checkout};
use agora_orders::domain::{NewOrder, Order, OrderItem, OrderStatus};
use agora_orders::grpc::{OrderApi, to_proto};
use agora_orders::store::{MAX_IDS_PER_READ, OrderPage, OrderStamp, OrderStore, SqlOrderStore};
use agora_orders::watch::{TOO_MANY_WATCHES, WatchHub, WatchStats};
use agora_platform::auth::TokenVerifier;
use agora_platform::config::WatchConfig;
use agora_platform::db::Db;
use agora_platform::error::Result as AgoraResult;
use agora_platform::money::Money;
use agora_platform::pagination::Cursor;
use agora_platform::server::HostedService;
use agora_platform_client::{CallPolicy, Clients, Credentials, Discovery};
use agora_proto::orders::v1 as pb;
use agora_proto::orders::v1::order_service_client::OrderServiceClient;
use agora_proto::orders::v1::order_service_server::OrderServiceServer;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests, with_token};
use anyhow::Context as _;
use futures::StreamExt as _;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt as _;

/// Only a guard against a hang turning into a stuck test run; no test
/// asserts how fast anything is.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Streams one HTTP/2 connection of the test server carries at once
/// (`server.max_concurrent_streams`); more open streams need more channels.
const STREAMS_PER_CONNECTION: usize = 150;

struct Harness {
    env: TestEnv,
    server: TestServer,
    store: SqlOrderStore,
    watches: WatchHub<SqlOrderStore>,
}

impl Harness {
    /// The orders service as `agora serve` builds it, with `watch` limits.
    async fn start(backend: Backend, watch: WatchConfig) -> anyhow::Result<Self> {
        let mut env = TestEnv::new(backend).await?;
        env.config.watch = watch;
        let agora_orders::Orders {
            hosted,
            store,
            watches,
            ..
        } = agora_orders::build(&env.config).await?;
        let server = TestServer::start(vec![hosted]).await?;
        Ok(Self {
            env,
            server,
            store,
            watches,
        })
    }

    fn client(&self) -> anyhow::Result<OrderServiceClient<Channel>> {
        Ok(OrderServiceClient::new(self.server.channel()?))
    }
}

fn watch_config(per_user: usize, total: usize, lifetime_secs: u64, poll_ms: u64) -> WatchConfig {
    WatchConfig {
        max_streams_per_user: per_user,
        max_streams: total,
        max_lifetime_secs: lifetime_secs,
        poll_interval_ms: poll_ms,
    }
}

fn new_order(user_id: &str) -> NewOrder {
    NewOrder {
        user_id: user_id.to_owned(),
        request_id: uuid::Uuid::new_v4().to_string(),
        items: vec![OrderItem {
            product_id: "book".into(),
            quantity: 1,
            unit_price: Money {
                currency_code: "EUR".into(),
                amount_minor: 150,
            },
        }],
        currency: "EUR".into(),
    }
}

fn watch(id: &str, token: &str) -> tonic::Request<pb::WatchOrderRequest> {
    with_token(pb::WatchOrderRequest { id: id.to_owned() }, token)
}

/// The next order a watch sends; `None` when it ended with OK.
async fn next_state(
    stream: &mut Streaming<pb::WatchOrderResponse>,
) -> anyhow::Result<Option<pb::Order>> {
    let message = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .context("watch stream hung")??;
    Ok(message.map(|m| m.order.expect("every message carries the order")))
}

/// Opens a watch and reads its first state.
async fn open(
    client: &mut OrderServiceClient<Channel>,
    order: &Order,
    token: &str,
) -> Result<Streaming<pb::WatchOrderResponse>, Status> {
    let mut stream = client
        .watch_order(watch(&order.id, token))
        .await?
        .into_inner();
    let first = stream.message().await?.and_then(|m| m.order);
    assert_eq!(
        first.as_ref().map(|o| o.id.as_str()),
        Some(order.id.as_str())
    );
    Ok(stream)
}

/// A refusal for too many watches: RESOURCE_EXHAUSTED, the reason, RetryInfo.
fn assert_too_many(status: &Status, scope: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, TOO_MANY_WATCHES);
    assert_eq!(info.metadata.get("scope").map(String::as_str), Some(scope));
    let retry = details.retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
}

/// Waits until the hub's stats satisfy `done`.
async fn until(
    watches: &WatchHub<impl OrderStore>,
    what: &str,
    done: impl Fn(&WatchStats) -> bool,
) -> anyhow::Result<WatchStats> {
    let wait = async {
        loop {
            let stats = watches.stats();
            if done(&stats) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .with_context(|| format!("waiting for {what}: {:?}", watches.stats()))
}

/// 1,000 `WatchOrder` calls from one user, 100 at a time over one connection:
/// exactly `max_streams_per_user` are served, every other one is refused
/// with RESOURCE_EXHAUSTED, `TOO_MANY_WATCHES` and RetryInfo. Once the
/// served ones are closed, the user may watch again as much as before.
async fn a_thousand_watches_from_one_user_get_exactly_the_cap(
    backend: Backend,
) -> anyhow::Result<()> {
    const CAP: usize = 16;
    let h = Harness::start(backend, watch_config(CAP, 10_000, 600, 1_000)).await?;
    let user = uuid::Uuid::now_v7().to_string();
    let token = h.env.user_token(&user, "ada@example.com", &[])?;
    let mut orders = Vec::new();
    for _ in 0..20 {
        orders.push(h.store.create(new_order(&user)).await?);
    }
    let client = h.client()?;
    let calls = (0..1_000).map(|n| {
        let mut client = client.clone();
        let order = orders[n % orders.len()].clone();
        let token = token.clone();
        async move { open(&mut client, &order, &token).await }
    });
    // 100 in flight at a time: enough to race for the slots, without
    // starving the accepted calls' database reads of CPU on a loaded
    // machine (debug builds verify every token slowly).
    let results: Vec<_> = tokio::time::timeout(
        HANG_GUARD,
        futures::stream::iter(calls).buffer_unordered(100).collect(),
    )
    .await
    .context("the watches hung")?;
    let mut served = Vec::new();
    let mut refused = 0;
    for result in results {
        match result {
            Ok(stream) => served.push(stream),
            Err(status) => {
                assert_too_many(&status, "user");
                refused += 1;
            }
        }
    }
    assert_eq!((served.len(), refused), (CAP, 1_000 - CAP));
    assert_eq!(h.watches.stats().open_streams, CAP);

    drop(served);
    until(&h.watches, "the slots to come back", |s| {
        s.open_streams == 0 && s.watched_orders == 0
    })
    .await?;
    let mut client = h.client()?;
    let mut again = Vec::new();
    for order in orders.iter().take(CAP) {
        again.push(open(&mut client, order, &token).await?);
    }
    let status = open(&mut client, &orders[CAP], &token)
        .await
        .expect_err("still capped");
    assert_too_many(&status, "user");
    drop(again);
    h.server.stop().await
}

/// The replica's cap holds across users, and a slot comes back when a
/// stream ends because its order finished.
async fn the_replica_cap_holds_across_users(backend: Backend) -> anyhow::Result<()> {
    const CAP: usize = 5;
    let h = Harness::start(backend, watch_config(16, CAP, 600, 1_000)).await?;
    let mut client = h.client()?;
    let mut watchers = Vec::new();
    for n in 0..=CAP {
        let user = uuid::Uuid::now_v7().to_string();
        let token = h.env.user_token(&user, &format!("u{n}@example.com"), &[])?;
        let order = h.store.create(new_order(&user)).await?;
        watchers.push((order, token));
    }
    let mut streams = Vec::new();
    for (order, token) in &watchers[..CAP] {
        streams.push(open(&mut client, order, token).await?);
    }
    let (last_order, last_token) = &watchers[CAP];
    let status = open(&mut client, last_order, last_token)
        .await
        .expect_err("over the replica cap");
    assert_too_many(&status, "replica");

    // The first order completes: its stream sends that and ends, which
    // frees its slot.
    let completed = h
        .store
        .transition(&watchers[0].0.id, OrderStatus::Completed, "")
        .await?;
    assert_eq!(
        next_state(&mut streams[0]).await?,
        Some(to_proto(&completed))
    );
    assert_eq!(next_state(&mut streams[0]).await?, None);
    until(&h.watches, "the finished stream's slot", |s| {
        s.open_streams == CAP - 1
    })
    .await?;
    streams.push(open(&mut client, last_order, last_token).await?);
    assert_eq!(h.watches.stats().open_streams, CAP);
    drop(streams);
    h.server.stop().await
}

/// After `max_lifetime_secs` a stream ends with OK (the client watches
/// again if it still cares) and gives its slot back.
async fn a_watch_ends_with_ok_after_its_lifetime(backend: Backend) -> anyhow::Result<()> {
    let h = Harness::start(backend, watch_config(16, 100, 1, 1_000)).await?;
    let mut client = h.client()?;
    let user = uuid::Uuid::now_v7().to_string();
    let token = h.env.user_token(&user, "ada@example.com", &[])?;
    let order = h.store.create(new_order(&user)).await?;
    let mut stream = open(&mut client, &order, &token).await?;
    // The order never changes: only the lifetime ends the stream, with OK
    // (an error would make `message` fail).
    assert_eq!(next_state(&mut stream).await?, None);
    until(&h.watches, "the slot of the expired stream", |s| {
        s.open_streams == 0
    })
    .await?;
    // Watching again works, from the current state.
    let mut again = open(&mut client, &order, &token).await?;
    assert_eq!(next_state(&mut again).await?, None);
    h.server.stop().await
}

/// No slot is kept by a refused watch (unknown order, someone else's
/// order), by a client that went away, nor by the drain, which ends open
/// streams with UNAVAILABLE.
async fn slots_come_back_however_a_stream_ends(backend: Backend) -> anyhow::Result<()> {
    const CAP: usize = 2;
    let h = Harness::start(backend, watch_config(CAP, 100, 600, 1_000)).await?;
    let mut client = h.client()?;
    let ada = uuid::Uuid::now_v7().to_string();
    let ada_token = h.env.user_token(&ada, "ada@example.com", &[])?;
    let grace = uuid::Uuid::now_v7().to_string();
    let grace_order = h.store.create(new_order(&grace)).await?;
    let adas_order = h.store.create(new_order(&ada)).await?;
    for _ in 0..(3 * CAP) {
        let status = client
            .watch_order(watch(&grace_order.id, &ada_token))
            .await
            .expect_err("someone else's order");
        assert_eq!(status.code(), Code::NotFound);
        let unknown = uuid::Uuid::now_v7().to_string();
        let status = client
            .watch_order(watch(&unknown, &ada_token))
            .await
            .expect_err("unknown order");
        assert_eq!(status.code(), Code::NotFound);
    }
    let stats = h.watches.stats();
    assert_eq!((stats.open_streams, stats.watched_orders), (0, 0));
    // Clients that go away.
    for _ in 0..(3 * CAP) {
        let stream = open(&mut client, &adas_order, &ada_token).await?;
        drop(stream);
        until(&h.watches, "a dropped stream's slot", |s| {
            s.open_streams == 0
        })
        .await?;
    }
    // The drain.
    let mut streams = Vec::new();
    for _ in 0..CAP {
        streams.push(open(&mut client, &adas_order, &ada_token).await?);
    }
    let watches = h.watches.clone();
    tokio::time::timeout(Duration::from_secs(10), h.server.stop())
        .await
        .context("shutdown waited for the open watches")??;
    for stream in &mut streams {
        let status = stream.message().await.expect_err("ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    until(&watches, "the drained streams' slots", |s| {
        s.open_streams == 0 && s.watched_orders == 0
    })
    .await?;
    // And with nothing left to watch, the poll task ends.
    until(&watches, "the poll task to end", |s| !s.polling).await?;
    Ok(())
}

/// An [`OrderStore`] that counts the reads the watch path makes (`get`,
/// `get_many` and `stamps`: one SQL statement each) and does them on the
/// real store.
#[derive(Clone)]
struct CountingStore {
    inner: SqlOrderStore,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Statements: every `get`, `get_many` and `stamps`.
    reads: AtomicU64,
    /// Orders read in full (with their items) by `get_many`.
    full_orders: AtomicU64,
}

impl Counts {
    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn full_orders(&self) -> u64 {
        self.full_orders.load(Ordering::Relaxed)
    }
}

impl OrderStore for CountingStore {
    async fn create(&self, new: NewOrder) -> AgoraResult<Order> {
        self.inner.create(new).await
    }

    async fn get(&self, id: &str) -> AgoraResult<Option<Order>> {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.get(id).await
    }

    async fn get_many(&self, ids: &[String]) -> AgoraResult<Vec<Order>> {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        self.counts
            .full_orders
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.inner.get_many(ids).await
    }

    async fn stamps(&self, ids: &[String]) -> AgoraResult<Vec<OrderStamp>> {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.stamps(ids).await
    }

    async fn list_for_user(
        &self,
        user_id: &str,
        cursor: Option<&Cursor>,
        size: i64,
    ) -> AgoraResult<OrderPage> {
        self.inner.list_for_user(user_id, cursor, size).await
    }

    async fn transition(&self, id: &str, to: OrderStatus, reason: &str) -> AgoraResult<Order> {
        self.inner.transition(id, to, reason).await
    }

    fn changes(&self) -> &OrderChanges {
        self.inner.changes()
    }
}

/// One phase of [`database_reads_stay_flat_as_watchers_grow`].
#[derive(Debug)]
struct Measured {
    watchers: usize,
    rounds: u64,
    reads: u64,
    reads_per_sec: f64,
    /// Orders read in full meanwhile: none changed, so none.
    full_orders: u64,
}

/// The orders service over a [`CountingStore`]: the reads the watch hub
/// makes for 1, 10, 200 and 501 open watches (of as many orders) over a few
/// polls are at most one per 500 watched orders per poll, not one per
/// watch: they do not grow with the number of watchers. Those reads are
/// stamps only: an order that did not change is never read in full, and
/// one that changed (on another replica: no notice) is read in full alone.
async fn database_reads_stay_flat_as_watchers_grow(backend: Backend) -> anyhow::Result<()> {
    const POLL_MS: u64 = 50;
    const ROUNDS: u64 = 6;
    let mut env = TestEnv::new(backend).await?;
    env.config.watch = watch_config(1_000, 10_000, 600, POLL_MS);
    let db = Db::connect_and_migrate(&env.config.database_url("orders"), agora_orders::MIGRATIONS)
        .await?;
    agora_platform_events::migrate(&db).await?;
    let store = SqlOrderStore::new(agora_platform_events::Outbox::new(db));
    let counts = Arc::new(Counts::default());
    let counting = CountingStore {
        inner: store.clone(),
        counts: Arc::clone(&counts),
    };
    // The checkout is never called here: its clients are never used.
    let credentials: Credentials = Arc::new(|_: &str| Ok(None));
    let clients = Clients::new(&env.config, "orders", Discovery::Static, credentials)?;
    let channel = |service: &str| clients.channel(service, CallPolicy::no_retries());
    let checkout = Checkout::new(
        store.clone(),
        Backends {
            inventory: channel("inventory")?,
            payments: channel("payments")?,
            catalog: channel("catalog")?,
        },
        &env.config.checkout,
    );
    let verifier = TokenVerifier::for_service(&env.config.auth, "orders")?;
    let api =
        OrderApi::new(counting, checkout, verifier.clone()).with_watch_config(&env.config.watch);
    let watches = api.watches();
    let hosted = HostedService::new(
        agora_proto::orders::v1::SERVICE_NAME,
        OrderServiceServer::new(api),
    )
    .with_token_verifier(verifier);
    let server = TestServer::start(vec![hosted]).await?;

    let user = uuid::Uuid::now_v7().to_string();
    let token = env.user_token(&user, "ada@example.com", &[])?;
    let mut orders = Vec::new();
    for _ in 0..501 {
        orders.push(store.create(new_order(&user)).await?);
    }
    let mut measured = Vec::new();
    for watchers in [1_usize, 10, 200, 501] {
        let channels = (0..watchers.div_ceil(STREAMS_PER_CONNECTION))
            .map(|_| server.channel().map(OrderServiceClient::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let opens = orders.iter().take(watchers).enumerate().map(|(n, order)| {
            let mut client = channels[n % channels.len()].clone();
            let token = token.clone();
            async move { open(&mut client, order, &token).await }
        });
        let streams: Vec<_> = futures::stream::iter(opens)
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, Status>>()?;
        assert_eq!(watches.stats().watched_orders, watchers);
        // Start counting at a poll boundary.
        let start = watches.stats().poll_rounds;
        let start = until(&watches, "a poll", |s| s.poll_rounds > start)
            .await?
            .poll_rounds;
        let (reads_before, full_before, since) =
            (counts.reads(), counts.full_orders(), Instant::now());
        let end = until(&watches, "the polls", |s| s.poll_rounds >= start + ROUNDS)
            .await?
            .poll_rounds;
        let (reads_after, full_after, elapsed) =
            (counts.reads(), counts.full_orders(), since.elapsed());
        let phase = Measured {
            watchers,
            rounds: end - start,
            reads: reads_after - reads_before,
            reads_per_sec: (reads_after - reads_before) as f64 / elapsed.as_secs_f64(),
            full_orders: full_after - full_before,
        };
        eprintln!(
            "watch reads: {} watchers, {} polls, {} reads, {:.1} reads/s, {} orders read in full",
            phase.watchers, phase.rounds, phase.reads, phase.reads_per_sec, phase.full_orders
        );
        assert_eq!(
            phase.full_orders, 0,
            "unchanged orders are read in full: {phase:?}"
        );
        let per_poll = watchers.div_ceil(MAX_IDS_PER_READ) as u64;
        // One statement per 500 watched orders per poll. The two counters
        // are read one after the other, so the first and the last poll may
        // each be counted on one side only.
        assert!(
            phase.reads >= (phase.rounds - 1) * per_poll,
            "the polls do not read: {phase:?}"
        );
        assert!(
            phase.reads <= (phase.rounds + 1) * per_poll,
            "reads grow with watchers: {phase:?}"
        );
        measured.push(phase);
        drop(streams);
        until(&watches, "the streams to close", |s| s.open_streams == 0).await?;
    }
    // Reads per poll are the same for 1 and for 200 watchers.
    let per_round = |m: &Measured| m.reads as f64 / m.rounds as f64;
    assert!(
        per_round(&measured[2]) <= per_round(&measured[0]) + 1.0,
        "{measured:?}"
    );

    // One of 10 watched orders changes on another replica (a store with a
    // notifier of its own: no notice reaches this hub). The poll finds it by
    // its stamp and reads that order, and only it, in full.
    let mut client = OrderServiceClient::new(server.channel()?);
    let mut streams = Vec::new();
    for order in orders.iter().take(10) {
        streams.push(open(&mut client, order, &token).await?);
    }
    // A poll that began while a watch was still being set up may read
    // that order in full once; count from the end of the next one.
    let start = watches.stats().poll_rounds;
    until(&watches, "a poll", |s| s.poll_rounds > start).await?;
    let full_before = counts.full_orders();
    let replica = SqlOrderStore::with_changes(store.outbox().clone(), OrderChanges::new());
    let completed = replica
        .transition(&orders[3].id, OrderStatus::Completed, "")
        .await?;
    assert_eq!(
        next_state(&mut streams[3]).await?,
        Some(to_proto(&completed))
    );
    assert_eq!(next_state(&mut streams[3]).await?, None);
    // A few more polls: the finished order is not looked at again, the
    // others were never read in full.
    let start = watches.stats().poll_rounds;
    until(&watches, "more polls", |s| s.poll_rounds >= start + 3).await?;
    assert_eq!(
        counts.full_orders() - full_before,
        1,
        "only the changed order"
    );
    drop(streams);
    server.stop().await
}

/// The poll's light read: each existing order's status and `updated_at`
/// as a full read gives them, unknown ids left out, at most
/// [`MAX_IDS_PER_READ`] ids at once.
async fn stamps_match_the_orders_and_leave_unknown_ids_out(backend: Backend) -> anyhow::Result<()> {
    let env = TestEnv::new(backend).await?;
    let db = Db::connect_and_migrate(&env.config.database_url("orders"), agora_orders::MIGRATIONS)
        .await?;
    agora_platform_events::migrate(&db).await?;
    let store = SqlOrderStore::new(agora_platform_events::Outbox::new(db));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(store.create(new_order("ada")).await?.id);
    }
    store
        .transition(&ids[1], OrderStatus::Failed, "declined")
        .await?;
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut asked = ids.clone();
    asked.push(unknown);
    let mut stamps = store.stamps(&asked).await?;
    stamps.sort_by(|a, b| a.id.cmp(&b.id));
    let mut expected = Vec::new();
    for order in store.get_many(&ids).await? {
        expected.push(OrderStamp {
            id: order.id,
            status: order.status,
            updated_at: order.updated_at,
        });
    }
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(stamps, expected);
    assert!(stamps.iter().any(|s| s.status == OrderStatus::Failed));
    assert!(store.stamps(&[]).await?.is_empty());
    let too_many = vec![ids[0].clone(); MAX_IDS_PER_READ + 1];
    let err = store.stamps(&too_many).await.expect_err("over the limit");
    assert_eq!(err.kind(), agora_platform::ErrorKind::InvalidArgument);
    assert_eq!(
        store.stamps(&too_many[..MAX_IDS_PER_READ]).await?.len(),
        1,
        "the limit itself is served"
    );
    Ok(())
}

backend_tests!(
    stamps_match_the_orders_and_leave_unknown_ids_out,
    a_thousand_watches_from_one_user_get_exactly_the_cap,
    the_replica_cap_holds_across_users,
    a_watch_ends_with_ok_after_its_lifetime,
    slots_come_back_however_a_stream_ends,
    database_reads_stay_flat_as_watchers_grow,
);
