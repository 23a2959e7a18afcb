//! The orders service over real gRPC on loopback, against a fresh database.
//! Every test runs twice: on PostgreSQL and on SQLite.
//!
//! Orders are created and moved through the same store the running service
//! uses (`agora_orders::build`), as the checkout saga does, so watchers see
//! those changes through the shared notifier. The checkout itself, across
//! inventory and payments, is tested in `crates/agora/tests/checkout.rs`.

use agora_testkit::bad_fields;
use agora_testkit::with_token;
use std::time::Duration;

use agora_orders::domain::{NewOrder, Order, OrderItem, OrderStatus};
use agora_orders::grpc::to_proto;
use agora_orders::store::{OrderStore, SqlOrderStore};
use agora_platform::config::Secret;
use agora_platform::db::Db;
use agora_platform::error::ErrorKind;
use agora_platform::money::Money;
use agora_proto::orders::v1 as pb;
use agora_proto::orders::v1::order_service_client::OrderServiceClient;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests};
use anyhow::Context as _;
use sqlx::Row as _;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

/// Only a guard against a hang turning into a stuck test run; no test
/// asserts how fast anything is.
const HANG_GUARD: Duration = Duration::from_secs(30);

struct Harness {
    env: TestEnv,
    server: TestServer,
    client: OrderServiceClient<Channel>,
    /// The store the running service uses (same notifier).
    store: SqlOrderStore,
    /// The running service's `WatchOrder` hub.
    watches: agora_orders::watch::WatchHub<SqlOrderStore>,
}

async fn start(backend: Backend) -> anyhow::Result<Harness> {
    let env = TestEnv::new(backend).await?;
    let agora_orders::Orders {
        hosted,
        store,
        watches,
        ..
    } = agora_orders::build(&env.config).await?;
    let server = TestServer::start(vec![hosted]).await?;
    let client = OrderServiceClient::new(server.channel()?);
    Ok(Harness {
        env,
        server,
        client,
        store,
        watches,
    })
}

/// A signed-in user: their id and token.
struct Shopper {
    id: String,
    token: String,
}

fn shopper(env: &TestEnv, email: &str) -> anyhow::Result<Shopper> {
    let id = uuid::Uuid::now_v7().to_string();
    let token = env.user_token(&id, email, &[])?;
    Ok(Shopper { id, token })
}

fn eur(amount_minor: i64) -> Money {
    Money {
        currency_code: "EUR".into(),
        amount_minor,
    }
}

fn new_order(user_id: &str, request_id: &str) -> NewOrder {
    NewOrder {
        user_id: user_id.to_owned(),
        request_id: request_id.to_owned(),
        items: vec![
            OrderItem {
                product_id: "book".into(),
                quantity: 2,
                unit_price: eur(150),
            },
            OrderItem {
                product_id: "lamp".into(),
                quantity: 1,
                unit_price: eur(999),
            },
        ],
        currency: "EUR".into(),
    }
}

async fn place(store: &SqlOrderStore, user_id: &str) -> anyhow::Result<Order> {
    let request_id = uuid::Uuid::new_v4().to_string();
    Ok(store.create(new_order(user_id, &request_id)).await?)
}

fn get(id: &str, token: &str) -> Request<pb::GetOrderRequest> {
    with_token(pb::GetOrderRequest { id: id.to_owned() }, token)
}

fn watch(id: &str, token: &str) -> Request<pb::WatchOrderRequest> {
    with_token(pb::WatchOrderRequest { id: id.to_owned() }, token)
}

fn list(page_size: i32, page_token: &str, token: &str) -> Request<pb::ListOrdersRequest> {
    let message = pb::ListOrdersRequest {
        page_size,
        page_token: page_token.to_owned(),
    };
    with_token(message, token)
}

/// The next order a watch sends; `None` when the stream has ended.
async fn next_state(
    stream: &mut Streaming<pb::WatchOrderResponse>,
) -> anyhow::Result<Option<pb::Order>> {
    let message = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .context("watch stream hung")??;
    Ok(message.map(|m| m.order.expect("every message carries the order")))
}

async fn create_get_and_list_pages_through_own_orders(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let grace = shopper(&h.env, "grace@example.com")?;
    let mut adas = Vec::new();
    for _ in 0..7 {
        adas.push(place(&h.store, &ada.id).await?);
    }
    let graces = [
        place(&h.store, &grace.id).await?,
        place(&h.store, &grace.id).await?,
    ];

    let first = &adas[0];
    assert_eq!(first.status, OrderStatus::Pending);
    assert_eq!(first.total, eur(2 * 150 + 999));
    assert!(uuid::Uuid::parse_str(&first.id).is_ok());
    let read = h
        .client
        .get_order(get(&first.id, &ada.token))
        .await?
        .into_inner()
        .order
        .expect("order");
    assert_eq!(read, to_proto(first));
    assert_eq!(read.items.len(), 2);
    assert_eq!(read.items[0].product_id, "book");

    // Pages of 3: 3 + 3 + 1, newest first, each order exactly once.
    let mut seen: Vec<pb::Order> = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = h
            .client
            .list_orders(list(3, &token, &ada.token))
            .await?
            .into_inner();
        pages += 1;
        assert!(page.orders.len() <= 3);
        seen.extend(page.orders);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    let key = |o: &pb::Order| {
        let at = o.created_at.expect("created_at");
        (at.seconds, at.nanos, o.id.clone())
    };
    let mut newest_first = seen.clone();
    newest_first.sort_by_key(|o| std::cmp::Reverse(key(o)));
    assert_eq!(seen, newest_first);
    let mut seen_ids: Vec<_> = seen.iter().map(|o| o.id.clone()).collect();
    let mut ada_ids: Vec<_> = adas.iter().map(|o| o.id.clone()).collect();
    seen_ids.sort();
    ada_ids.sort();
    assert_eq!(seen_ids, ada_ids);
    assert!(
        seen.iter()
            .all(|o| o.user_id == ada.id && !o.items.is_empty())
    );

    // page_size 0 means the default (50): everything in one page.
    let all = h
        .client
        .list_orders(list(0, "", &ada.token))
        .await?
        .into_inner();
    assert_eq!((all.orders.len(), all.next_page_token.as_str()), (7, ""));
    assert_eq!(all.orders, seen);

    // Everyone lists only their own orders; admins too.
    let theirs = h
        .client
        .list_orders(list(0, "", &grace.token))
        .await?
        .into_inner()
        .orders;
    let mut their_ids: Vec<_> = theirs.iter().map(|o| o.id.clone()).collect();
    let mut grace_ids: Vec<_> = graces.iter().map(|o| o.id.clone()).collect();
    their_ids.sort();
    grace_ids.sort();
    assert_eq!(their_ids, grace_ids);
    let admins = h
        .client
        .list_orders(list(0, "", &h.env.admin_token()?))
        .await?
        .into_inner();
    assert!(admins.orders.is_empty());
    h.server.stop().await
}

async fn same_request_id_never_makes_two_orders(backend: Backend) -> anyhow::Result<()> {
    let h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let grace = shopper(&h.env, "grace@example.com")?;
    let original = h.store.create(new_order(&ada.id, "checkout-1")).await?;
    let mut retried = new_order(&ada.id, "checkout-1");
    retried.items.truncate(1);
    let again = h.store.create(retried).await?;
    assert_eq!(again, original);
    // Request ids are per user.
    let graces = h.store.create(new_order(&grace.id, "checkout-1")).await?;
    assert_ne!(graces.id, original.id);

    // Racing creates of one new request all get the one order.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let store = h.store.clone();
            let order = new_order(&ada.id, "checkout-2");
            tokio::spawn(async move { store.create(order).await })
        })
        .collect();
    let mut ids = Vec::new();
    for racer in racers {
        ids.push(racer.await??.id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let page = h.store.list_for_user(&ada.id, None, 50).await?;
    assert_eq!(page.orders.len(), 2);
    h.server.stop().await
}

async fn lifecycle_is_enforced(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let precondition = |result: agora_platform::Result<Order>| {
        let err = result.expect_err("move must be refused");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    };

    // Staying PENDING is a no-op; PENDING cannot be cancelled.
    let same = h
        .store
        .transition(&order.id, OrderStatus::Pending, "")
        .await?;
    assert_eq!(same, order);
    precondition(
        h.store
            .transition(&order.id, OrderStatus::Cancelled, "x")
            .await,
    );

    let completed = h
        .store
        .transition(&order.id, OrderStatus::Completed, "ignored")
        .await?;
    assert_eq!(completed.status, OrderStatus::Completed);
    assert_eq!(completed.failure_reason, "");
    assert!(completed.updated_at > order.updated_at);
    assert_eq!(completed.created_at, order.created_at);
    // Repeating it changes nothing, not even updated_at.
    let repeated = h
        .store
        .transition(&order.id, OrderStatus::Completed, "")
        .await?;
    assert_eq!(repeated, completed);
    precondition(
        h.store
            .transition(&order.id, OrderStatus::Failed, "x")
            .await,
    );
    precondition(
        h.store
            .transition(&order.id, OrderStatus::Pending, "")
            .await,
    );

    let cancelled = h
        .store
        .transition(&order.id, OrderStatus::Cancelled, "  changed my mind ")
        .await?;
    assert_eq!(cancelled.failure_reason, "changed my mind");
    for to in [
        OrderStatus::Pending,
        OrderStatus::Completed,
        OrderStatus::Failed,
    ] {
        precondition(h.store.transition(&order.id, to, "").await);
    }
    let read = h
        .client
        .get_order(get(&order.id, &ada.token))
        .await?
        .into_inner()
        .order
        .expect("order");
    assert_eq!(read, to_proto(&cancelled));
    assert_eq!(read.status(), pb::OrderStatus::Cancelled);

    // FAILED is final and keeps its reason.
    let failing = place(&h.store, &ada.id).await?;
    let failed = h
        .store
        .transition(&failing.id, OrderStatus::Failed, "card declined")
        .await?;
    assert_eq!(failed.failure_reason, "card declined");
    precondition(
        h.store
            .transition(&failing.id, OrderStatus::Completed, "")
            .await,
    );
    precondition(
        h.store
            .transition(&failing.id, OrderStatus::Cancelled, "")
            .await,
    );

    // Unknown orders are NOT_FOUND.
    let unknown = uuid::Uuid::now_v7().to_string();
    let err = h
        .store
        .transition(&unknown, OrderStatus::Completed, "")
        .await
        .expect_err("unknown");
    assert_eq!(err.kind(), ErrorKind::NotFound);

    // Racing COMPLETED against FAILED: exactly one kind of move wins, and the
    // racers that asked for the winning status all see the same single change.
    let racing = place(&h.store, &ada.id).await?;
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = h.store.clone();
            let id = racing.id.clone();
            let to = if i % 2 == 0 {
                OrderStatus::Completed
            } else {
                OrderStatus::Failed
            };
            tokio::spawn(async move { store.transition(&id, to, "lost the race").await })
        })
        .collect();
    let mut winners = Vec::new();
    for racer in racers {
        match racer.await? {
            Ok(order) => winners.push(order),
            Err(err) => assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}"),
        }
    }
    assert_eq!(winners.len(), 4, "the winning status's racers all succeed");
    let stored = h.store.get(&racing.id).await?.expect("order");
    assert!(winners.iter().all(|w| *w == stored));
    h.server.stop().await
}

async fn watch_streams_current_state_then_changes_and_ends(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let mut stream = h
        .client
        .watch_order(watch(&order.id, &ada.token))
        .await?
        .into_inner();
    let current = next_state(&mut stream).await?.expect("current state");
    assert_eq!(current, to_proto(&order));
    assert_eq!(current.status(), pb::OrderStatus::Pending);

    let completed = h
        .store
        .transition(&order.id, OrderStatus::Completed, "")
        .await?;
    let change = next_state(&mut stream).await?.expect("the change");
    assert_eq!(change, to_proto(&completed));
    assert_eq!(change.status(), pb::OrderStatus::Completed);
    assert_eq!(next_state(&mut stream).await?, None, "ends after COMPLETED");

    // A watch that sees the order fail gets the reason too.
    let failing = place(&h.store, &ada.id).await?;
    let mut stream = h
        .client
        .watch_order(watch(&failing.id, &ada.token))
        .await?
        .into_inner();
    assert_eq!(
        next_state(&mut stream).await?.map(|o| o.status()),
        Some(pb::OrderStatus::Pending)
    );
    h.store
        .transition(&failing.id, OrderStatus::Failed, "out of stock")
        .await?;
    let failed = next_state(&mut stream).await?.expect("the change");
    assert_eq!(
        (failed.status(), failed.failure_reason.as_str()),
        (pb::OrderStatus::Failed, "out of stock")
    );
    assert_eq!(next_state(&mut stream).await?, None);
    h.server.stop().await
}

async fn watch_on_a_finished_order_yields_it_once(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let failed = h
        .store
        .transition(&order.id, OrderStatus::Failed, "card declined")
        .await?;
    let mut stream = h
        .client
        .watch_order(watch(&order.id, &ada.token))
        .await?
        .into_inner();
    assert_eq!(next_state(&mut stream).await?, Some(to_proto(&failed)));
    assert_eq!(next_state(&mut stream).await?, None);
    h.server.stop().await
}

async fn watch_is_for_the_owner_only(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let grace = shopper(&h.env, "grace@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let refused = |result: Result<tonic::Response<Streaming<pb::WatchOrderResponse>>, Status>| {
        result.expect_err("watch must be refused").code()
    };

    let other_user = refused(h.client.watch_order(watch(&order.id, &grace.token)).await);
    let unknown_id = uuid::Uuid::now_v7().to_string();
    let unknown = refused(h.client.watch_order(watch(&unknown_id, &grace.token)).await);
    assert_eq!((other_user, unknown), (Code::NotFound, Code::NotFound));
    // Admins may read any order, but watching is for the owner.
    let admin = h.env.admin_token()?;
    assert_eq!(
        refused(h.client.watch_order(watch(&order.id, &admin)).await),
        Code::NotFound
    );
    let service = h.env.service_token("payments", "orders")?;
    assert_eq!(
        refused(h.client.watch_order(watch(&order.id, &service)).await),
        Code::PermissionDenied
    );
    let anonymous = pb::WatchOrderRequest {
        id: order.id.clone(),
    };
    assert_eq!(
        refused(h.client.watch_order(anonymous).await),
        Code::Unauthenticated
    );
    let status = h
        .client
        .watch_order(watch("not-a-uuid", &ada.token))
        .await
        .expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["id"]);

    // The owner may.
    let mut stream = h
        .client
        .watch_order(watch(&order.id, &ada.token))
        .await?
        .into_inner();
    assert_eq!(next_state(&mut stream).await?, Some(to_proto(&order)));
    drop(stream);
    h.server.stop().await
}

/// Watchers that never read cannot hold up writers: many transitions on many
/// orders all complete while several streams sit unread; the streams then
/// still deliver their order's final state.
async fn slow_readers_never_block_writers(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let mut orders = Vec::new();
    for _ in 0..40 {
        orders.push(place(&h.store, &ada.id).await?);
    }
    let mut unread = Vec::new();
    for order in orders.iter().take(6) {
        let stream = h
            .client
            .watch_order(watch(&order.id, &ada.token))
            .await?
            .into_inner();
        unread.push(stream);
    }

    let writes = async {
        for order in &orders {
            h.store
                .transition(&order.id, OrderStatus::Completed, "")
                .await?;
            h.store
                .transition(&order.id, OrderStatus::Cancelled, "changed my mind")
                .await?;
            // Retried saga steps are no-ops but still go through the store.
            h.store
                .transition(&order.id, OrderStatus::Cancelled, "")
                .await?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(HANG_GUARD, writes)
        .await
        .context("writers were held up by unread watch streams")??;
    for order in &orders {
        let stored = h.store.get(&order.id).await?.expect("order");
        assert_eq!(stored.status, OrderStatus::Cancelled);
    }

    // The first unread stream: its current state first, then whatever
    // changes it caught, ending at a terminal status no later than the final one.
    let watched = &orders[0];
    let mut stream = unread.swap_remove(0);
    let mut states = Vec::new();
    while let Some(state) = next_state(&mut stream).await? {
        states.push(state);
    }
    assert_eq!(states.first(), Some(&to_proto(watched)));
    let last = states.last().expect("at least the current state");
    assert!(matches!(
        last.status(),
        pb::OrderStatus::Completed | pb::OrderStatus::Cancelled
    ));
    assert_eq!(last.id, watched.id);
    let statuses: Vec<_> = states.iter().map(pb::Order::status).collect();
    assert!(statuses.windows(2).all(|w| w[0] != w[1]), "{statuses:?}");
    drop(unread);
    h.server.stop().await
}

/// Every change records its event with the order's version after it, in the
/// same transaction; an idempotent repeat records nothing.
async fn every_change_records_its_event(backend: Backend) -> anyhow::Result<()> {
    let h = start(backend).await?;
    let user = uuid::Uuid::now_v7().to_string();
    let kept = place(&h.store, &user).await?;
    h.store.create(new_order(&user, &kept.request_id)).await?;
    h.store
        .transition(&kept.id, OrderStatus::Completed, "")
        .await?;
    h.store
        .transition(&kept.id, OrderStatus::Completed, "")
        .await?;
    h.store
        .transition(&kept.id, OrderStatus::Cancelled, "changed my mind")
        .await?;
    let failed = place(&h.store, &user).await?;
    h.store
        .transition(&failed.id, OrderStatus::Failed, "out of stock")
        .await?;

    let db = Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    let rows = sqlx::query(
        "SELECT event_type, aggregate_id, aggregate_version, payload FROM event_outbox ORDER BY id",
    )
    .fetch_all(db.pool())
    .await?;
    let mut recorded = Vec::new();
    for row in &rows {
        let event_type: String = row.try_get("event_type")?;
        let aggregate: String = row.try_get("aggregate_id")?;
        let version: i64 = row.try_get("aggregate_version")?;
        let name = event_type.rsplit('.').next().unwrap_or_default().to_owned();
        recorded.push((name, aggregate == kept.id, version));
    }
    assert_eq!(
        recorded,
        [
            ("OrderPlaced".to_owned(), true, 1),
            ("OrderCompleted".to_owned(), true, 2),
            ("OrderCancelled".to_owned(), true, 3),
            ("OrderPlaced".to_owned(), false, 1),
            ("OrderFailed".to_owned(), false, 2),
        ]
    );
    let payload: Vec<u8> = rows[4].try_get("payload")?;
    let event: pb::OrderFailed = prost::Message::decode(payload.as_slice())?;
    assert_eq!(
        (
            event.order_id.as_str(),
            event.user_id.as_str(),
            event.reason.as_str()
        ),
        (failed.id.as_str(), user.as_str(), "out of stock")
    );
    let payload: Vec<u8> = rows[0].try_get("payload")?;
    let placed: pb::OrderPlaced = prost::Message::decode(payload.as_slice())?;
    assert_eq!(placed.items.len(), 2);
    assert_eq!(placed.total, Some(kept.total.to_proto()));
    h.server.stop().await
}

/// Another replica's writes send no notice to this process: the periodic
/// re-check finds them.
async fn watch_sees_changes_made_by_another_replica(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let replica = SqlOrderStore::new(agora_platform_events::Outbox::new(
        Db::connect(&Secret::new(h.env.database_url().to_owned())).await?,
    ));
    let mut stream = h
        .client
        .watch_order(watch(&order.id, &ada.token))
        .await?
        .into_inner();
    assert_eq!(next_state(&mut stream).await?, Some(to_proto(&order)));
    let completed = replica
        .transition(&order.id, OrderStatus::Completed, "")
        .await?;
    assert_eq!(next_state(&mut stream).await?, Some(to_proto(&completed)));
    assert_eq!(next_state(&mut stream).await?, None);
    h.server.stop().await
}

/// A client that goes away ends its watch (its slot and its place on the
/// order come back), even though the order never changes; with nothing
/// left to watch, the hub stops listening for notices.
async fn watch_task_ends_when_the_client_goes_away(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let before = h.store.changes().subscribers();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = h
            .client
            .watch_order(watch(&order.id, &ada.token))
            .await?
            .into_inner();
        next_state(&mut stream).await?;
        streams.push(stream);
    }
    let stats = h.watches.stats();
    assert_eq!((stats.open_streams, stats.watched_orders), (3, 1));
    // One listener for all the streams: the hub's.
    assert_eq!(h.store.changes().subscribers(), before + 1);
    drop(streams);
    let ended = async {
        loop {
            let stats = h.watches.stats();
            if stats.open_streams == 0
                && stats.watched_orders == 0
                && h.store.changes().subscribers() == before
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, ended)
        .await
        .context("watch tasks outlived their clients")?;
    h.server.stop().await
}

/// Shutting the server down ends open watches with UNAVAILABLE (so clients
/// watch again elsewhere) instead of holding the drain until its timeout.
async fn open_watches_end_when_the_server_shuts_down(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let mut stream = h
        .client
        .watch_order(watch(&order.id, &ada.token))
        .await?
        .into_inner();
    next_state(&mut stream).await?;
    // Well below the server's 30 s drain timeout: only a watch that ends on
    // the drain signal lets shutdown finish in time.
    tokio::time::timeout(Duration::from_secs(10), h.server.stop())
        .await
        .context("shutdown waited for the open watch")??;
    let status = stream
        .message()
        .await
        .expect_err("the watch ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    Ok(())
}

async fn checkout_and_cancel_check_the_caller_before_anything_else(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let grace = shopper(&h.env, "grace@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let place_request = pb::PlaceOrderRequest {
        request_id: "r1".into(),
        items: vec![pb::LineItem {
            product_id: "book".into(),
            quantity: 1,
        }],
        card_number: "4242424242424242".into(),
    };
    let status = h
        .client
        .place_order(place_request.clone())
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let service = h.env.service_token("inventory", "orders")?;
    let status = h
        .client
        .place_order(with_token(place_request, &service))
        .await
        .expect_err("a service places no orders");
    assert_eq!(status.code(), Code::PermissionDenied);
    let cancel = |token: &str| {
        with_token(
            pb::CancelOrderRequest {
                id: order.id.clone(),
            },
            token,
        )
    };
    // Someone else's order does not exist for them.
    let status = h
        .client
        .cancel_order(cancel(&grace.token))
        .await
        .expect_err("not theirs");
    assert_eq!(status.code(), Code::NotFound);
    // A checkout still running cannot be cancelled.
    let status = h
        .client
        .cancel_order(cancel(&ada.token))
        .await
        .expect_err("pending");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // Nothing was placed or cancelled.
    let page = h.store.list_for_user(&ada.id, None, 50).await?;
    assert_eq!(page.orders, [order]);
    h.server.stop().await
}

async fn access_rules_per_caller(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    let grace = shopper(&h.env, "grace@example.com")?;
    let order = place(&h.store, &ada.id).await?;
    let code = |result: Result<tonic::Response<pb::GetOrderResponse>, Status>| {
        result.expect_err("must be refused").code()
    };

    // Anonymous and forged tokens: UNAUTHENTICATED.
    let anonymous = pb::GetOrderRequest {
        id: order.id.clone(),
    };
    assert_eq!(
        code(h.client.get_order(anonymous).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            h.client
                .get_order(get(&order.id, "eyJhbGciOiJFZERTQSJ9.e30.AAAA"))
                .await
        ),
        Code::Unauthenticated
    );
    // Another user: NOT_FOUND, like an id that does not exist.
    assert_eq!(
        code(h.client.get_order(get(&order.id, &grace.token)).await),
        Code::NotFound
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        code(h.client.get_order(get(&unknown, &grace.token)).await),
        Code::NotFound
    );
    // Services do not read orders here.
    let service = h.env.service_token("payments", "orders")?;
    assert_eq!(
        code(h.client.get_order(get(&order.id, &service)).await),
        Code::PermissionDenied
    );
    // The owner and admins may.
    let own = h.client.get_order(get(&order.id, &ada.token)).await?;
    let admins = h
        .client
        .get_order(get(&order.id, &h.env.admin_token()?))
        .await?;
    assert_eq!(own.into_inner().order, Some(to_proto(&order)));
    assert_eq!(admins.into_inner().order, Some(to_proto(&order)));

    // ListOrders: a user's own list; anonymous and services are refused.
    let status = h
        .client
        .list_orders(pb::ListOrdersRequest::default())
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = h
        .client
        .list_orders(list(0, "", &service))
        .await
        .expect_err("service");
    assert_eq!(status.code(), Code::PermissionDenied);
    let graces = h
        .client
        .list_orders(list(0, "", &grace.token))
        .await?
        .into_inner();
    assert!(graces.orders.is_empty());
    h.server.stop().await
}

async fn invalid_input_names_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = shopper(&h.env, "ada@example.com")?;
    for bad_id in ["", "x'; DROP TABLE orders; --", &"9".repeat(100_000)] {
        let status = h
            .client
            .get_order(get(bad_id, &ada.token))
            .await
            .expect_err("bad id");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&status), ["id"]);
    }

    let status = h
        .client
        .list_orders(list(-1, "not*a*token", &ada.token))
        .await
        .expect_err("bad page");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["page_size", "page_token"]);
    let status = h
        .client
        .list_orders(list(10, &"A".repeat(50_000), &ada.token))
        .await
        .expect_err("oversized token");
    assert_eq!(bad_fields(&status), ["page_token"]);
    // Oversized page sizes are capped, not refused.
    let page = h
        .client
        .list_orders(list(i32::MAX, "", &ada.token))
        .await?
        .into_inner();
    assert!(page.orders.is_empty());

    // The store refuses bad new orders, naming every bad field.
    let mut bad = new_order(&ada.id, "");
    bad.items.push(OrderItem {
        product_id: "\u{0}".repeat(1000),
        quantity: -3,
        unit_price: Money {
            currency_code: "USD".into(),
            amount_minor: 100,
        },
    });
    let err = h.store.create(bad).await.expect_err("bad order");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let bad_fields: Vec<_> = err.violations().iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        bad_fields,
        [
            "request_id",
            "items[2].product_id",
            "items[2].quantity",
            "items[2].unit_price.currency_code",
        ]
    );
    assert!(
        h.store
            .list_for_user(&ada.id, None, 50)
            .await?
            .orders
            .is_empty()
    );
    h.server.stop().await
}

backend_tests!(
    create_get_and_list_pages_through_own_orders,
    same_request_id_never_makes_two_orders,
    lifecycle_is_enforced,
    every_change_records_its_event,
    watch_streams_current_state_then_changes_and_ends,
    watch_on_a_finished_order_yields_it_once,
    watch_is_for_the_owner_only,
    slow_readers_never_block_writers,
    watch_sees_changes_made_by_another_replica,
    watch_task_ends_when_the_client_goes_away,
    open_watches_end_when_the_server_shuts_down,
    checkout_and_cancel_check_the_caller_before_anything_else,
    access_rules_per_caller,
    invalid_input_names_every_bad_field,
);
