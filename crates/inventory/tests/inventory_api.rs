//! The inventory service over real gRPC on loopback, against a fresh database.
//! Every test runs twice: on PostgreSQL and on SQLite.

use std::time::Duration;

use agora_inventory::domain::reason;
use agora_platform::config::{Config, Secret};
use agora_platform::db::Db;
use agora_platform::error::reason_of;
use agora_proto::inventory::v1 as pb;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_testkit::bad_fields;
use agora_testkit::with_token;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Harness {
    env: TestEnv,
    server: TestServer,
    client: InventoryServiceClient<Channel>,
    admin: String,
    service: String,
}

async fn start(backend: Backend) -> anyhow::Result<Harness> {
    start_with(backend, |_| {}).await
}

/// A harness whose configuration `adjust` changed first.
async fn start_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> anyhow::Result<Harness> {
    let mut env = TestEnv::new(backend).await?;
    adjust(&mut env.config);
    let server = TestServer::start(vec![agora_inventory::hosted(&env.config).await?]).await?;
    let client = InventoryServiceClient::new(server.channel()?);
    let admin = env.admin_token()?;
    let service = env.service_token("orders", "inventory")?;
    Ok(Harness {
        env,
        server,
        client,
        admin,
        service,
    })
}

fn new_product() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn item(product_id: &str, quantity: i64) -> pb::ReservationItem {
    pb::ReservationItem {
        product_id: product_id.to_owned(),
        quantity,
    }
}

fn reserve_request(id: &str, items: Vec<pb::ReservationItem>) -> pb::ReserveStockRequest {
    pb::ReserveStockRequest {
        reservation_id: id.to_owned(),
        items,
    }
}

fn release_request(id: &str) -> pb::ReleaseReservationRequest {
    pb::ReleaseReservationRequest {
        reservation_id: id.to_owned(),
    }
}

fn commit_request(id: &str) -> pb::CommitReservationRequest {
    pb::CommitReservationRequest {
        reservation_id: id.to_owned(),
    }
}

impl Harness {
    async fn set_stock(
        &mut self,
        product_id: &str,
        quantity: i64,
    ) -> anyhow::Result<pb::StockLevel> {
        let request = with_token(
            pb::SetStockRequest {
                product_id: product_id.to_owned(),
                quantity,
            },
            &self.admin,
        );
        Ok(self
            .client
            .set_stock(request)
            .await?
            .into_inner()
            .stock
            .expect("stock"))
    }

    /// (available, reserved) of a product.
    async fn stock(&mut self, product_id: &str) -> anyhow::Result<(i64, i64)> {
        let stock = self
            .client
            .get_stock(pb::GetStockRequest {
                product_id: product_id.to_owned(),
            })
            .await?
            .into_inner()
            .stock
            .expect("stock");
        Ok((stock.available, stock.reserved))
    }

    async fn reserve(
        &mut self,
        id: &str,
        items: Vec<pb::ReservationItem>,
    ) -> Result<pb::Reservation, Status> {
        let request = with_token(reserve_request(id, items), &self.service);
        Ok(self
            .client
            .reserve_stock(request)
            .await?
            .into_inner()
            .reservation
            .expect("reservation"))
    }

    async fn release(&mut self, id: &str) -> Result<(), Status> {
        let request = with_token(release_request(id), &self.service);
        self.client.release_reservation(request).await.map(drop)
    }

    async fn commit(&mut self, id: &str) -> Result<(), Status> {
        let request = with_token(commit_request(id), &self.service);
        self.client.commit_reservation(request).await.map(drop)
    }
}

async fn stock_is_set_by_admins_and_read_by_anyone(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    let set = h.set_stock(&product.to_uppercase(), 7).await?;
    // The id comes back in its one normalized spelling.
    assert_eq!(
        set,
        pb::StockLevel {
            product_id: product.clone(),
            available: 7,
            reserved: 0
        }
    );
    // Anonymous callers read it, whatever spelling they use.
    let read = h
        .client
        .get_stock(pb::GetStockRequest {
            product_id: format!("  {}  ", product.to_uppercase()),
        })
        .await?
        .into_inner()
        .stock
        .expect("stock");
    assert_eq!(read, set);
    // Users and services may read too.
    for token in [
        h.env.user_token(&new_product(), "ada@example.com", &[])?,
        h.service.clone(),
    ] {
        let request = with_token(
            pb::GetStockRequest {
                product_id: product.clone(),
            },
            &token,
        );
        assert_eq!(
            h.client.get_stock(request).await?.into_inner().stock,
            Some(set.clone())
        );
    }

    // Setting again replaces `available` and leaves `reserved` alone.
    h.reserve("saga-1", vec![item(&product, 3)]).await?;
    assert_eq!(h.stock(&product).await?, (4, 3));
    let reset = h.set_stock(&product, 10).await?;
    assert_eq!((reset.available, reset.reserved), (10, 3));
    assert_eq!(h.set_stock(&product, 0).await?.available, 0);
    assert_eq!(h.stock(&product).await?, (0, 3));

    // A product whose stock was never set is NOT_FOUND.
    let status = h
        .client
        .get_stock(pb::GetStockRequest {
            product_id: new_product(),
        })
        .await
        .expect_err("never set");
    assert_eq!(status.code(), Code::NotFound);
    h.server.stop().await
}

async fn set_stock_is_for_admins_only(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    let request = |token: Option<&str>| {
        let message = pb::SetStockRequest {
            product_id: product.clone(),
            quantity: 5,
        };
        match token {
            Some(token) => with_token(message, token),
            None => Request::new(message),
        }
    };
    let status = h
        .client
        .set_stock(request(None))
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = h
        .client
        .set_stock(request(Some("eyJhbGciOiJFZERTQSJ9.e30.AAAA")))
        .await
        .expect_err("forged");
    assert_eq!(status.code(), Code::Unauthenticated);
    let user = h.env.user_token(&new_product(), "ada@example.com", &[])?;
    let status = h
        .client
        .set_stock(request(Some(&user)))
        .await
        .expect_err("user");
    assert_eq!(status.code(), Code::PermissionDenied);
    let service = h.service.clone();
    let status = h
        .client
        .set_stock(request(Some(&service)))
        .await
        .expect_err("service");
    assert_eq!(status.code(), Code::PermissionDenied);
    // None of the refused calls created the stock level.
    let status = h
        .client
        .get_stock(pb::GetStockRequest {
            product_id: product.clone(),
        })
        .await
        .expect_err("not set yet");
    assert_eq!(status.code(), Code::NotFound);

    let admin = h.admin.clone();
    h.client.set_stock(request(Some(&admin))).await?;
    assert_eq!(h.stock(&product).await?, (5, 0));
    h.server.stop().await
}

async fn reservation_calls_are_for_services_only(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 10).await?;
    let user = h.env.user_token(&new_product(), "ada@example.com", &[])?;
    let admin = h.admin.clone();
    let service = h.service.clone();

    for (token, want) in [
        (None, Code::Unauthenticated),
        (Some(user.as_str()), Code::PermissionDenied),
        (Some(admin.as_str()), Code::PermissionDenied),
    ] {
        let request = |message| match token {
            Some(token) => with_token(message, token),
            None => Request::new(message),
        };
        let status = h
            .client
            .reserve_stock(request(reserve_request("saga-1", vec![item(&product, 2)])))
            .await
            .expect_err("not a service");
        assert_eq!(status.code(), want, "reserve with {token:?}");
        let message = release_request("saga-1");
        let request = match token {
            Some(token) => with_token(message, token),
            None => Request::new(message),
        };
        let status = h
            .client
            .release_reservation(request)
            .await
            .expect_err("not a service");
        assert_eq!(status.code(), want, "release with {token:?}");
        let message = commit_request("saga-1");
        let request = match token {
            Some(token) => with_token(message, token),
            None => Request::new(message),
        };
        let status = h
            .client
            .commit_reservation(request)
            .await
            .expect_err("not a service");
        assert_eq!(status.code(), want, "commit with {token:?}");
    }
    // Nothing was reserved, and no tombstone was left by the refused releases.
    assert_eq!(h.stock(&product).await?, (10, 0));

    // A service token may do all three.
    let request = with_token(reserve_request("saga-1", vec![item(&product, 2)]), &service);
    h.client.reserve_stock(request).await?;
    h.client
        .commit_reservation(with_token(commit_request("saga-1"), &service))
        .await?;
    let request = with_token(reserve_request("saga-2", vec![item(&product, 1)]), &service);
    h.client.reserve_stock(request).await?;
    h.client
        .release_reservation(with_token(release_request("saga-2"), &service))
        .await?;
    assert_eq!(h.stock(&product).await?, (8, 0));
    h.server.stop().await
}

async fn reserve_moves_units_and_merges_duplicates(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (a, b) = (new_product(), new_product());
    h.set_stock(&a, 10).await?;
    h.set_stock(&b, 10).await?;
    let reservation = h
        .reserve(
            "saga-1",
            vec![item(&b, 1), item(&a.to_uppercase(), 2), item(&b, 3)],
        )
        .await?;
    assert_eq!(reservation.reservation_id, "saga-1");
    assert_eq!(reservation.status(), pb::ReservationStatus::Reserved);
    let mut expected = vec![item(&a, 2), item(&b, 4)];
    expected.sort_by(|x, y| x.product_id.cmp(&y.product_id));
    assert_eq!(reservation.items, expected);
    assert!(reservation.created_at.is_some());
    assert_eq!(reservation.created_at, reservation.updated_at);
    assert_eq!(h.stock(&a).await?, (8, 2));
    assert_eq!(h.stock(&b).await?, (6, 4));

    // Taking the last unit is allowed; one more is not.
    h.reserve("saga-2", vec![item(&a, 8)]).await?;
    assert_eq!(h.stock(&a).await?, (0, 10));
    let status = h
        .reserve("saga-3", vec![item(&a, 1)])
        .await
        .expect_err("sold out");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        reason_of(&status).as_deref(),
        Some(reason::INSUFFICIENT_STOCK)
    );
    assert!(status.message().contains(&a), "{status:?}");
    h.server.stop().await
}

async fn reserve_is_all_or_nothing(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (plenty, scarce, unknown) = (new_product(), new_product(), new_product());
    h.set_stock(&plenty, 100).await?;
    h.set_stock(&scarce, 2).await?;

    let status = h
        .reserve(
            "saga-1",
            vec![item(&plenty, 5), item(&scarce, 3), item(&unknown, 1)],
        )
        .await
        .expect_err("one short, one unknown");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // The answer names the short products (unknown counts as short), only them.
    assert!(status.message().contains(&scarce), "{status:?}");
    assert!(status.message().contains(&unknown), "{status:?}");
    assert!(!status.message().contains(&plenty), "{status:?}");
    // Waiting for stock will not help a product inventory does not know:
    // that decides the reason.
    assert_eq!(reason_of(&status).as_deref(), Some(reason::UNKNOWN_PRODUCT));
    let status = h
        .reserve("saga-2", vec![item(&unknown, 1)])
        .await
        .expect_err("unknown only");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some(reason::UNKNOWN_PRODUCT))
    );
    let status = h
        .reserve("saga-2", vec![item(&scarce, 3)])
        .await
        .expect_err("short only");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some(reason::INSUFFICIENT_STOCK))
    );
    assert_eq!(
        status.message(),
        format!("insufficient stock for products {scarce}")
    );
    // Every stock level is untouched, including the one that had enough.
    assert_eq!(h.stock(&plenty).await?, (100, 0));
    assert_eq!(h.stock(&scarce).await?, (2, 0));
    let status = h
        .client
        .get_stock(pb::GetStockRequest {
            product_id: unknown.clone(),
        })
        .await
        .expect_err("still unknown");
    assert_eq!(status.code(), Code::NotFound);

    // The failed attempt left no reservation behind: committing it is
    // NOT_FOUND, and the same id can reserve once stock allows.
    let status = h.commit("saga-1").await.expect_err("never made");
    assert_eq!(status.code(), Code::NotFound);
    h.set_stock(&scarce, 3).await?;
    h.set_stock(&unknown, 1).await?;
    h.reserve(
        "saga-1",
        vec![item(&plenty, 5), item(&scarce, 3), item(&unknown, 1)],
    )
    .await?;
    assert_eq!(h.stock(&plenty).await?, (95, 5));
    assert_eq!(h.stock(&scarce).await?, (0, 3));
    assert_eq!(h.stock(&unknown).await?, (0, 1));
    h.server.stop().await
}

/// Twenty reservations with distinct ids race for five units: exactly five
/// win, the rest are FAILED_PRECONDITION, and nothing is oversold.
async fn racing_reservations_never_oversell(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 5).await?;
    let racers: Vec<_> = (0..20)
        .map(|n| {
            let mut client = h.client.clone();
            let request = with_token(
                reserve_request(&format!("saga-{n}"), vec![item(&product, 1)]),
                &h.service,
            );
            tokio::spawn(async move { client.reserve_stock(request).await })
        })
        .collect();
    let mut wins = 0;
    for racer in racers {
        match racer.await? {
            Ok(_) => wins += 1,
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert_eq!(wins, 5);
    assert_eq!(h.stock(&product).await?, (0, 5));
    h.server.stop().await
}

/// The same reservation sent many times at once (a retrying client) reserves
/// once; every copy gets the one reservation. Many items make each
/// transaction long enough that copies overlap with it (on PostgreSQL they
/// then wait on the reservation's primary key and read the winner's row).
async fn racing_identical_retries_reserve_once(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let products: Vec<String> = (0..50).map(|_| new_product()).collect();
    for product in &products {
        h.set_stock(product, 100).await?;
    }
    let items: Vec<_> = products.iter().map(|p| item(p, 3)).collect();
    let start_line = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let racers: Vec<_> = (0..20)
        .map(|_| {
            let mut client = h.client.clone();
            let request = with_token(reserve_request("saga-1", items.clone()), &h.service);
            let start_line = start_line.clone();
            tokio::spawn(async move {
                start_line.wait().await;
                client.reserve_stock(request).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for racer in racers {
        let reservation = racer.await??.into_inner().reservation.expect("reservation");
        answers.push(reservation);
    }
    assert!(answers.iter().all(|r| r == &answers[0]), "{answers:?}");
    for product in &products {
        assert_eq!(h.stock(product).await?, (97, 3), "{product}");
    }
    h.server.stop().await
}

async fn retries_are_idempotent_and_other_items_are_refused(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (a, b) = (new_product(), new_product());
    h.set_stock(&a, 10).await?;
    h.set_stock(&b, 10).await?;
    let first = h.reserve("saga-1", vec![item(&a, 2), item(&b, 1)]).await?;
    // The same items, listed in another order and split differently.
    let again = h
        .reserve("saga-1", vec![item(&b, 1), item(&a, 1), item(&a, 1)])
        .await?;
    assert_eq!(again, first);
    assert_eq!(h.stock(&a).await?, (8, 2));

    // Other items under the same id: ALREADY_EXISTS, stock untouched.
    for other in [
        vec![item(&a, 3), item(&b, 1)],
        vec![item(&a, 2)],
        vec![item(&a, 2), item(&b, 1), item(&new_product(), 1)],
    ] {
        let status = h.reserve("saga-1", other).await.expect_err("other items");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(
            status.message(),
            "reservation saga-1 exists with different items"
        );
    }
    assert_eq!(h.stock(&a).await?, (8, 2));
    assert_eq!(h.stock(&b).await?, (9, 1));

    // After a commit, the retry still gets the reservation (now COMMITTED),
    // and nothing is reserved again.
    h.commit("saga-1").await?;
    let after_commit = h.reserve("saga-1", vec![item(&a, 2), item(&b, 1)]).await?;
    assert_eq!(after_commit.status(), pb::ReservationStatus::Committed);
    assert_eq!(after_commit.created_at, first.created_at);
    assert_eq!(h.stock(&a).await?, (8, 0));

    // After a release too: nothing is taken again.
    h.reserve("saga-2", vec![item(&a, 5)]).await?;
    h.release("saga-2").await?;
    let after_release = h.reserve("saga-2", vec![item(&a, 5)]).await?;
    assert_eq!(after_release.status(), pb::ReservationStatus::Released);
    assert_eq!(h.stock(&a).await?, (8, 0));
    // Even when the stock would no longer cover it, a retry is answered
    // from the stored reservation, not from the stock.
    h.reserve("saga-3", vec![item(&a, 8)]).await?;
    let retry = h.reserve("saga-1", vec![item(&a, 2), item(&b, 1)]).await?;
    assert_eq!(retry.status(), pb::ReservationStatus::Committed);
    h.server.stop().await
}

async fn release_returns_units_once(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (a, b) = (new_product(), new_product());
    h.set_stock(&a, 10).await?;
    h.set_stock(&b, 10).await?;
    h.reserve("saga-1", vec![item(&a, 4), item(&b, 6)]).await?;
    h.release("saga-1").await?;
    assert_eq!(h.stock(&a).await?, (10, 0));
    assert_eq!(h.stock(&b).await?, (10, 0));
    // Releasing again is fine and returns nothing twice.
    h.release("saga-1").await?;
    assert_eq!(h.stock(&a).await?, (10, 0));
    // A released reservation cannot be committed.
    let status = h.commit("saga-1").await.expect_err("released");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some(reason::RESERVATION_RELEASED)
    );
    assert_eq!(h.stock(&b).await?, (10, 0));

    // Releasing a committed reservation (a cancelled order) returns its sold
    // units to stock, once.
    h.reserve("saga-2", vec![item(&a, 3)]).await?;
    h.commit("saga-2").await?;
    assert_eq!(h.stock(&a).await?, (7, 0));
    h.release("saga-2").await?;
    assert_eq!(h.stock(&a).await?, (10, 0));
    h.release("saga-2").await?;
    assert_eq!(h.stock(&a).await?, (10, 0));
    // It cannot be committed again.
    let status = h.commit("saga-2").await.expect_err("returned");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    h.server.stop().await
}

async fn commit_sells_units_once(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 10).await?;
    h.reserve("saga-1", vec![item(&product, 4)]).await?;
    h.reserve("saga-2", vec![item(&product, 1)]).await?;
    h.commit("saga-1").await?;
    assert_eq!(h.stock(&product).await?, (5, 1));
    h.commit("saga-1").await?;
    assert_eq!(h.stock(&product).await?, (5, 1));
    // Unknown reservations cannot be committed.
    let status = h.commit("saga-never").await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    h.server.stop().await
}

/// Releases and commits of one reservation racing each other: exactly one
/// of the two transitions happens, and its units move exactly once.
async fn racing_release_and_commit_move_units_once(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 10).await?;
    h.reserve("saga-1", vec![item(&product, 4)]).await?;
    let racers: Vec<_> = (0..10)
        .map(|n| {
            let mut client = h.client.clone();
            let service = h.service.clone();
            tokio::spawn(async move {
                if n % 2 == 0 {
                    let request = with_token(release_request("saga-1"), &service);
                    client.release_reservation(request).await.map(drop)
                } else {
                    let request = with_token(commit_request("saga-1"), &service);
                    client.commit_reservation(request).await.map(drop)
                }
            })
        })
        .collect();
    for racer in racers {
        if let Err(status) = racer.await? {
            // The loser of the race learns the other transition happened.
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        }
    }
    let stock = h.stock(&product).await?;
    assert!(
        stock == (10, 0) || stock == (6, 0),
        "released (10, 0) or committed (6, 0), got {stock:?}"
    );
    h.server.stop().await
}

/// A release that overtakes its reservation (a saga compensating a reserve
/// call that timed out but is still in flight) leaves a tombstone: the late
/// reservation is refused instead of holding stock forever.
async fn release_before_reserve_leaves_a_tombstone(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 10).await?;
    h.release("saga-1").await?;
    let status = h
        .reserve("saga-1", vec![item(&product, 2)])
        .await
        .expect_err("tombstone");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some(reason::RESERVATION_RELEASED)
    );
    assert_eq!(h.stock(&product).await?, (10, 0));
    // The tombstone behaves as a released reservation.
    h.release("saga-1").await?;
    let status = h.commit("saga-1").await.expect_err("released");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(h.stock(&product).await?, (10, 0));
    h.server.stop().await
}

async fn invalid_input_names_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 10).await?;
    let admin = h.admin.clone();

    let status = h
        .client
        .set_stock(with_token(
            pb::SetStockRequest {
                product_id: "not-a-uuid".into(),
                quantity: -1,
            },
            &admin,
        ))
        .await
        .expect_err("two bad fields");
    assert_eq!(bad_fields(&status), ["product_id", "quantity"]);
    let status = h
        .client
        .set_stock(with_token(
            pb::SetStockRequest {
                product_id: product.clone(),
                quantity: i64::MAX,
            },
            &admin,
        ))
        .await
        .expect_err("too many units");
    assert_eq!(bad_fields(&status), ["quantity"]);

    let status = h
        .client
        .get_stock(pb::GetStockRequest {
            product_id: "x'; DROP TABLE stock; --".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(bad_fields(&status), ["product_id"]);

    let status = h
        .reserve(
            "saga 1",
            vec![
                item(&product, 1),
                item("nope", 0),
                item(&product, -5),
                item("", i64::MIN),
            ],
        )
        .await
        .expect_err("bad reservation");
    assert_eq!(
        bad_fields(&status),
        [
            "items[1].product_id",
            "items[1].quantity",
            "items[2].quantity",
            "items[3].product_id",
            "items[3].quantity",
            "reservation_id",
        ]
    );
    let status = h.reserve("", vec![]).await.expect_err("empty");
    assert_eq!(bad_fields(&status), ["items", "reservation_id"]);
    // Duplicates that add up past the maximum are caught after merging.
    let status = h
        .reserve(
            "saga-1",
            vec![item(&product, 1_000_000_000), item(&product, 1_000_000_000)],
        )
        .await
        .expect_err("merged too large");
    assert_eq!(bad_fields(&status), ["items"]);

    let status = h.release("saga/1").await.expect_err("bad id");
    assert_eq!(bad_fields(&status), ["reservation_id"]);
    let status = h.commit("").await.expect_err("empty id");
    assert_eq!(bad_fields(&status), ["reservation_id"]);
    // Nothing was touched by any of it.
    assert_eq!(h.stock(&product).await?, (10, 0));
    h.server.stop().await
}

async fn oversized_and_garbage_input_is_refused(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 10).await?;
    let huge = "x".repeat(100_000);

    let status = h
        .reserve(&huge, vec![item(&product, 1)])
        .await
        .expect_err("long id");
    assert_eq!(bad_fields(&status), ["reservation_id"]);
    let status = h
        .reserve(&"é".repeat(64), vec![item(&product, 1)])
        .await
        .expect_err("non-ascii id");
    assert_eq!(bad_fields(&status), ["reservation_id"]);
    // Longest allowed id works.
    h.reserve(&"x".repeat(128), vec![item(&product, 1)]).await?;
    let status = h
        .reserve(&"x".repeat(129), vec![item(&product, 1)])
        .await
        .expect_err("129 characters");
    assert_eq!(bad_fields(&status), ["reservation_id"]);

    // 100 distinct items are fine; 101 are refused as a whole.
    let hundred: Vec<_> = (0..100).map(|_| item(&new_product(), 1)).collect();
    let status = h
        .reserve("saga-100", hundred)
        .await
        .expect_err("unknown products");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let too_many: Vec<_> = (0..5_000).map(|_| item(&huge[..40], 0)).collect();
    let status = h
        .reserve("saga-many", too_many)
        .await
        .expect_err("too many");
    assert_eq!(bad_fields(&status), ["items"]);

    let status = h
        .client
        .get_stock(pb::GetStockRequest {
            product_id: huge.clone(),
        })
        .await
        .expect_err("huge id");
    assert_eq!(bad_fields(&status), ["product_id"]);
    let status = h
        .client
        .set_stock(with_token(
            pb::SetStockRequest {
                // Within the contract's 64 bytes, so that the handler, not
                // the server's length check, sees (and names) both fields.
                product_id: "\u{0}".repeat(64),
                quantity: i64::MIN,
            },
            &h.admin,
        ))
        .await
        .expect_err("garbage");
    assert_eq!(bad_fields(&status), ["product_id", "quantity"]);
    let status = h.release(&huge).await.expect_err("huge id");
    assert_eq!(bad_fields(&status), ["reservation_id"]);
    let status = h
        .commit("\u{0}\u{1}")
        .await
        .expect_err("control characters");
    assert_eq!(bad_fields(&status), ["reservation_id"]);
    assert_eq!(h.stock(&product).await?, (9, 1));
    h.server.stop().await
}

/// The database itself refuses negative stock, whatever code writes to it.
async fn the_schema_refuses_negative_stock(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = new_product();
    h.set_stock(&product, 1).await?;
    let db = Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    for statement in [
        "UPDATE stock SET available = available - 2 WHERE product_id = $1",
        "UPDATE stock SET reserved = reserved - 1 WHERE product_id = $1",
    ] {
        let result = sqlx::query(statement)
            .bind(&product)
            .execute(db.pool())
            .await;
        assert!(result.is_err(), "{statement} went through");
    }
    db.close().await;
    assert_eq!(h.stock(&product).await?, (1, 0));
    h.server.stop().await
}

/// Health follows the database check: the service turns SERVING once its
/// database answered (it starts NOT_SERVING until the first check).
async fn health_reports_the_service_serving(backend: Backend) -> anyhow::Result<()> {
    let h = start(backend).await?;
    let mut health = HealthClient::new(h.server.channel()?);
    let mut status = ServingStatus::Unknown;
    for _ in 0..100 {
        status = health
            .check(HealthCheckRequest {
                service: pb::SERVICE_NAME.into(),
            })
            .await?
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::Serving);
    h.server.stop().await
}

/// Reservations that expire after one second, swept every 100 ms.
fn short_lived_reservations(config: &mut Config) {
    config.checkout.reservation_ttl_secs = 1;
    config.checkout.sweep_interval_ms = 100;
}

impl Harness {
    /// Waits (up to 10 s) until `product`'s stock is `want`.
    async fn await_stock(&mut self, product: &str, want: (i64, i64)) -> anyhow::Result<()> {
        let mut seen = self.stock(product).await?;
        for _ in 0..100 {
            if seen == want {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen = self.stock(product).await?;
        }
        anyhow::bail!("stock of {product} is {seen:?}, expected {want:?}")
    }
}

/// An uncommitted reservation past its lifetime is released by the sweeper
/// and its units come back; a committed one never expires.
async fn uncommitted_reservations_expire(backend: Backend) -> anyhow::Result<()> {
    let mut h = start_with(backend, short_lived_reservations).await?;
    let (a, b) = (new_product(), new_product());
    h.set_stock(&a, 10).await?;
    h.set_stock(&b, 10).await?;
    let made = h
        .reserve("saga-open", vec![item(&a, 3), item(&b, 1)])
        .await?;
    h.reserve("saga-sold", vec![item(&a, 2)]).await?;
    h.commit("saga-sold").await?;
    assert_eq!(h.stock(&a).await?, (5, 3));

    h.await_stock(&a, (8, 0)).await?;
    assert_eq!(h.stock(&b).await?, (10, 0));
    // Well past the lifetime of both, the committed units stay sold.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.stock(&a).await?, (8, 0));
    h.commit("saga-sold").await?;

    // The expired reservation answers as released: a retried ReserveStock
    // gets it (taking nothing), a release is a no-op.
    let retried = h
        .reserve("saga-open", vec![item(&a, 3), item(&b, 1)])
        .await?;
    assert_eq!(retried.status(), pb::ReservationStatus::Released);
    assert_eq!(retried.created_at, made.created_at);
    h.release("saga-open").await?;
    assert_eq!(h.stock(&a).await?, (8, 0));
    assert_eq!(h.stock(&b).await?, (10, 0));
    h.server.stop().await
}

/// A commit that arrives after its reservation expired takes the units
/// again when they are there, and is RESERVATION_EXPIRED when they are not;
/// a reservation released on request stays released.
async fn commit_after_expiry_reserves_again_or_fails(backend: Backend) -> anyhow::Result<()> {
    let mut h = start_with(backend, short_lived_reservations).await?;
    let product = new_product();
    h.set_stock(&product, 5).await?;

    h.reserve("saga-late", vec![item(&product, 3)]).await?;
    h.await_stock(&product, (5, 0)).await?;
    h.commit("saga-late").await?;
    assert_eq!(h.stock(&product).await?, (2, 0));
    // Committed now: idempotent, and it does not expire again.
    h.commit("saga-late").await?;
    let committed = h.reserve("saga-late", vec![item(&product, 3)]).await?;
    assert_eq!(committed.status(), pb::ReservationStatus::Committed);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(h.stock(&product).await?, (2, 0));

    // Expired, and the stock went to someone else meanwhile.
    h.reserve("saga-too-late", vec![item(&product, 2)]).await?;
    h.await_stock(&product, (2, 0)).await?;
    h.set_stock(&product, 1).await?;
    for _ in 0..2 {
        let status = h.commit("saga-too-late").await.expect_err("short");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some(reason::RESERVATION_EXPIRED)
        );
        assert!(status.message().contains(&product), "{status:?}");
        assert_eq!(h.stock(&product).await?, (1, 0));
    }
    // The saga then compensates: releasing it is fine.
    h.release("saga-too-late").await?;
    assert_eq!(h.stock(&product).await?, (1, 0));

    // Released on request (not expired): never committed, stock or not.
    h.set_stock(&product, 10).await?;
    h.reserve("saga-released", vec![item(&product, 1)]).await?;
    h.release("saga-released").await?;
    let status = h.commit("saga-released").await.expect_err("released");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some(reason::RESERVATION_RELEASED))
    );
    assert_eq!(h.stock(&product).await?, (10, 0));
    h.server.stop().await
}

/// A reservation committed after it expired, then released by a cancelled
/// order: its sold units come back once, and a late or retried commit is
/// RESERVATION_RELEASED (the cancel wins) instead of selling them again.
async fn cancel_of_a_commit_after_expiry_is_final(backend: Backend) -> anyhow::Result<()> {
    let mut h = start_with(backend, short_lived_reservations).await?;
    let product = new_product();
    h.set_stock(&product, 5).await?;
    h.reserve("order-1:reserve", vec![item(&product, 3)])
        .await?;
    h.await_stock(&product, (5, 0)).await?;
    h.commit("order-1:reserve").await?;
    assert_eq!(h.stock(&product).await?, (2, 0));
    // CancelOrder: the sold units return to stock.
    h.release("order-1:reserve").await?;
    assert_eq!(h.stock(&product).await?, (5, 0));
    let cancelled = h
        .reserve("order-1:reserve", vec![item(&product, 3)])
        .await?;
    assert_eq!(cancelled.status(), pb::ReservationStatus::Released);
    for _ in 0..2 {
        let status = h.commit("order-1:reserve").await.expect_err("cancelled");
        assert_eq!(
            (status.code(), reason_of(&status).as_deref()),
            (Code::FailedPrecondition, Some(reason::RESERVATION_RELEASED)),
            "{status:?}"
        );
        assert_eq!(h.stock(&product).await?, (5, 0));
    }
    // Releasing again returns nothing twice.
    h.release("order-1:reserve").await?;
    assert_eq!(h.stock(&product).await?, (5, 0));
    h.server.stop().await
}

/// Two replicas sweeping one database, with commits racing the expiry:
/// every unit is returned or sold exactly once.
async fn replicas_expire_each_reservation_once(backend: Backend) -> anyhow::Result<()> {
    let mut h = start_with(backend, short_lived_reservations).await?;
    let replica = TestServer::start(vec![agora_inventory::hosted(&h.env.config).await?]).await?;
    let product = new_product();
    h.set_stock(&product, 40).await?;
    for n in 0..40 {
        h.reserve(&format!("saga-{n}"), vec![item(&product, 1)])
            .await?;
    }
    // On a busy machine the first reservations may expire already: what
    // matters is that no unit is lost or made.
    let (available, reserved) = h.stock(&product).await?;
    assert_eq!(available + reserved, 40);
    // Commits racing the sweepers, just as the reservations expire.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let committers: Vec<_> = (0..10)
        .map(|n| {
            let mut client = h.client.clone();
            let request = with_token(commit_request(&format!("saga-{n}")), &h.service);
            tokio::spawn(async move { client.commit_reservation(request).await })
        })
        .collect();
    for committer in committers {
        // Committed before or after its expiry: either way its unit is sold.
        committer.await??;
    }
    h.await_stock(&product, (30, 0)).await?;
    replica.stop().await?;
    h.server.stop().await
}

backend_tests!(
    stock_is_set_by_admins_and_read_by_anyone,
    set_stock_is_for_admins_only,
    reservation_calls_are_for_services_only,
    reserve_moves_units_and_merges_duplicates,
    reserve_is_all_or_nothing,
    racing_reservations_never_oversell,
    racing_identical_retries_reserve_once,
    retries_are_idempotent_and_other_items_are_refused,
    release_returns_units_once,
    commit_sells_units_once,
    racing_release_and_commit_move_units_once,
    release_before_reserve_leaves_a_tombstone,
    invalid_input_names_every_bad_field,
    oversized_and_garbage_input_is_refused,
    the_schema_refuses_negative_stock,
    health_reports_the_service_serving,
    uncommitted_reservations_expire,
    commit_after_expiry_reserves_again_or_fails,
    cancel_of_a_commit_after_expiry_is_final,
    replicas_expire_each_reservation_once,
);
