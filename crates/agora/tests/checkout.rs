//! The checkout saga end to end: real users, catalog, inventory, payments,
//! notifications and orders services on loopback, a private nats-server,
//! and each service's own database (PostgreSQL and SQLite).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use agora_orders::checkout::BreakerState;
use agora_platform::error::reason_of;
use agora_platform::server::{HostedService, Server};
use agora_platform::shutdown::CancellationToken;
use agora_platform_events::DomainEvent;
use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::common::v1::Money;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_proto::orders::v1 as orders;
use agora_proto::orders::v1::order_service_client::OrderServiceClient;
use agora_proto::payments::v1 as payments;
use agora_proto::payments::v1::payment_service_client::PaymentServiceClient;
use agora_proto::users::v1 as users;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use agora_testkit::{Backend, NatsServer, TestEnv, TestServer, backend_tests, with_token};
use anyhow::Context as _;
use futures::StreamExt as _;
use prost::Message as _;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

const GOOD_CARD: &str = "4242424242424242";
const DECLINED_CARD: &str = "4000000000000002";
/// Only a guard against a hang turning into a stuck test run.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The whole mesh: orders on its own server, the services it calls (and
/// users and notifications) on another.
struct Mesh {
    env: TestEnv,
    nats: NatsServer,
    _services: TestServer,
    orders_server: TestServer,
    checkout: agora_orders::checkout::Checkout,
    admin: String,
    users: UserServiceClient<Channel>,
    catalog: CatalogServiceClient<Channel>,
    inventory: InventoryServiceClient<Channel>,
    payments: PaymentServiceClient<Channel>,
    orders: OrderServiceClient<Channel>,
}

/// A customer with an account (so that emails find their address).
struct Shopper {
    email: String,
    token: String,
}

async fn mesh(backend: Backend) -> anyhow::Result<Mesh> {
    mesh_with(backend, |_| {}, None).await
}

/// The mesh with `adjust` applied to the configuration, payments served on
/// `payments_addr` by a server of the test's own when given.
async fn mesh_with(
    backend: Backend,
    adjust: impl FnOnce(&mut agora_platform::config::Config),
    payments_addr: Option<SocketAddr>,
) -> anyhow::Result<Mesh> {
    let mut env = TestEnv::per_service(backend).await?;
    let nats = NatsServer::start().await?;
    env.use_nats(&nats);
    adjust(&mut env.config);
    let mut hosted = vec![
        agora_users::hosted(&env.config).await?,
        agora_catalog::hosted(&env.config).await?,
        agora_inventory::hosted(&env.config).await?,
        agora_notifications::hosted(&env.config).await?,
    ];
    if payments_addr.is_none() {
        hosted.push(agora_payments::hosted(&env.config).await?);
    }
    let services = TestServer::start(hosted).await?;
    let url = format!("http://{}", services.addr());
    env.config.inventory.addresses = vec![url.clone()];
    env.config.catalog.addresses = vec![url.clone()];
    env.config.payments.addresses = vec![match payments_addr {
        Some(addr) => format!("http://{addr}"),
        None => url,
    }];
    let built = agora_orders::build(&env.config).await?;
    let orders_server = TestServer::start(vec![built.hosted]).await?;
    let channel = services.channel()?;
    let payments_channel = match payments_addr {
        Some(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy()
        }
        None => channel.clone(),
    };
    Ok(Mesh {
        admin: env.admin_token()?,
        users: UserServiceClient::new(channel.clone()),
        catalog: CatalogServiceClient::new(channel.clone()),
        inventory: InventoryServiceClient::new(channel),
        payments: PaymentServiceClient::new(payments_channel),
        orders: OrderServiceClient::new(orders_server.channel()?),
        checkout: built.checkout,
        orders_server,
        _services: services,
        env,
        nats,
    })
}

fn eur(amount_minor: i64) -> Money {
    Money {
        currency_code: "EUR".into(),
        amount_minor,
    }
}

impl Mesh {
    /// A new product priced `price` cents with `stock` units.
    async fn product(&mut self, price: i64, stock: i64) -> anyhow::Result<String> {
        let sku = format!("sku-{}", uuid::Uuid::now_v7().simple());
        let product = self
            .catalog
            .create_product(with_token(
                catalog::CreateProductRequest {
                    sku,
                    name: "Field notebook".into(),
                    description: "Dot grid, 80 pages".into(),
                    price: Some(eur(price)),
                    categories: vec!["stationery".into()],
                },
                &self.admin,
            ))
            .await?
            .into_inner()
            .product
            .context("no product")?;
        self.inventory
            .set_stock(with_token(
                inventory::SetStockRequest {
                    product_id: product.id.clone(),
                    quantity: stock,
                },
                &self.admin,
            ))
            .await?;
        Ok(product.id)
    }

    /// (available, reserved) of a product.
    async fn stock(&mut self, product_id: &str) -> anyhow::Result<(i64, i64)> {
        let level = self
            .inventory
            .get_stock(inventory::GetStockRequest {
                product_id: product_id.to_owned(),
            })
            .await?
            .into_inner()
            .stock
            .context("no stock level")?;
        Ok((level.available, level.reserved))
    }

    async fn shopper(&mut self, email: &str) -> anyhow::Result<Shopper> {
        let password = "correct horse battery";
        self.users
            .create_user(users::CreateUserRequest {
                email: email.into(),
                name: "Grace Hopper".into(),
                password: password.into(),
            })
            .await?;
        let token = self
            .users
            .authenticate(users::AuthenticateRequest {
                email: email.into(),
                password: password.into(),
            })
            .await?
            .into_inner()
            .access_token;
        Ok(Shopper {
            email: email.to_owned(),
            token,
        })
    }

    async fn place(
        &mut self,
        shopper: &Shopper,
        request_id: &str,
        items: &[(&str, i64)],
        card: &str,
    ) -> Result<orders::Order, tonic::Status> {
        let request = orders::PlaceOrderRequest {
            request_id: request_id.to_owned(),
            items: items
                .iter()
                .map(|(product_id, quantity)| orders::LineItem {
                    product_id: (*product_id).to_owned(),
                    quantity: *quantity,
                })
                .collect(),
            card_number: card.to_owned(),
        };
        let placed = tokio::time::timeout(
            HANG_GUARD,
            self.orders.place_order(with_token(request, &shopper.token)),
        )
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("test hang guard"))??;
        placed
            .into_inner()
            .order
            .ok_or_else(|| tonic::Status::internal("no order"))
    }

    async fn order(&mut self, shopper: &Shopper, id: &str) -> anyhow::Result<orders::Order> {
        self.orders
            .get_order(with_token(
                orders::GetOrderRequest { id: id.to_owned() },
                &shopper.token,
            ))
            .await?
            .into_inner()
            .order
            .context("no order")
    }

    /// The payment of an order's saga, as payments has it.
    async fn payment(&mut self, order_id: &str) -> Result<payments::Payment, tonic::Status> {
        self.payments
            .get_payment(with_token(
                payments::GetPaymentRequest {
                    id: format!("{order_id}:charge"),
                },
                &self.admin,
            ))
            .await?
            .into_inner()
            .payment
            .ok_or_else(|| tonic::Status::internal("no payment"))
    }

    /// Waits until the order leaves PENDING.
    async fn settled(&mut self, shopper: &Shopper, id: &str) -> anyhow::Result<orders::Order> {
        let until = tokio::time::Instant::now() + HANG_GUARD;
        loop {
            let order = self.order(shopper, id).await?;
            if order.status() != orders::OrderStatus::Pending {
                return Ok(order);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "order {id} stays PENDING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The subjects of the ORDERS stream's events about `order_id`, in order.
    async fn order_events(&self, order_id: &str) -> anyhow::Result<Vec<String>> {
        let client = async_nats::connect(self.nats.url()).await?;
        let jetstream = async_nats::jetstream::new(client);
        let stream = jetstream.get_stream("ORDERS").await?;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await?;
        let count = stream.get_info().await?.state.messages;
        let mut messages = consumer.messages().await?.take(usize::try_from(count)?);
        let mut subjects = Vec::new();
        while let Some(message) = tokio::time::timeout(HANG_GUARD, messages.next())
            .await?
            .transpose()
            .map_err(|err| anyhow::anyhow!("{err}"))?
        {
            let subject = message.subject.to_string();
            let about = match subject.as_str() {
                s if s == <orders::OrderPlaced as DomainEvent>::SUBJECT => {
                    orders::OrderPlaced::decode(message.payload.clone())?.order_id
                }
                s if s == <orders::OrderCompleted as DomainEvent>::SUBJECT => {
                    orders::OrderCompleted::decode(message.payload.clone())?.order_id
                }
                s if s == <orders::OrderFailed as DomainEvent>::SUBJECT => {
                    orders::OrderFailed::decode(message.payload.clone())?.order_id
                }
                s if s == <orders::OrderCancelled as DomainEvent>::SUBJECT => {
                    orders::OrderCancelled::decode(message.payload.clone())?.order_id
                }
                _ => String::new(),
            };
            if about == order_id {
                subjects.push(subject);
            }
        }
        Ok(subjects)
    }
}

/// Waits until `count` events about `order_id` are on the stream.
async fn wait_for_events(mesh: &Mesh, order_id: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let until = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        let events = match mesh.order_events(order_id).await {
            Ok(events) => events,
            // The stream is made once the services' event bus is up: a
            // fresh mesh may not have it yet.
            Err(_) if tokio::time::Instant::now() < until => Vec::new(),
            Err(err) => return Err(err),
        };
        if events.len() >= count || tokio::time::Instant::now() > until {
            return Ok(events);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `.eml` files to `email` whose subject contains `subject`.
async fn wait_for_email(data: &Path, email: &str, subject: &str) -> anyhow::Result<String> {
    let until = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        if let Ok(entries) = std::fs::read_dir(data.join("mail")) {
            for entry in entries.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                if text.contains(&format!("To: {email}")) && text.contains(subject) {
                    return Ok(text);
                }
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "no email to {email} about {subject:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn order_id_of(status: &tonic::Status) -> Option<String> {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("order_id").cloned())
}

async fn a_checkout_reserves_charges_and_completes_once(backend: Backend) -> anyhow::Result<()> {
    let mut mesh = mesh(backend).await?;
    let book = mesh.product(1250, 5).await?;
    let pen = mesh.product(300, 10).await?;
    let shopper = mesh.shopper("grace@example.com").await?;

    let order = mesh
        .place(&shopper, "req-1", &[(&book, 2), (&pen, 1)], GOOD_CARD)
        .await?;
    assert_eq!(order.status(), orders::OrderStatus::Completed, "{order:?}");
    assert_eq!(order.total, Some(eur(2 * 1250 + 300)));
    assert_eq!(order.failure_code, "");
    assert_eq!(mesh.stock(&book).await?, (3, 0));
    assert_eq!(mesh.stock(&pen).await?, (9, 0));
    let payment = mesh.payment(&order.id).await?;
    assert_eq!(payment.status(), payments::PaymentStatus::Succeeded);
    assert_eq!(payment.amount, Some(eur(2800)));

    // The same request again: the same order, nothing charged or reserved twice.
    let again = mesh
        .place(&shopper, "req-1", &[(&book, 2), (&pen, 1)], GOOD_CARD)
        .await?;
    assert_eq!(again.id, order.id);
    assert_eq!(again.status(), orders::OrderStatus::Completed);
    assert_eq!(mesh.stock(&book).await?, (3, 0));
    // The same request id with other items is another request: refused.
    let reused = mesh
        .place(&shopper, "req-1", &[(&book, 1)], GOOD_CARD)
        .await
        .expect_err("other items");
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert_eq!(reason_of(&reused).as_deref(), Some("REQUEST_ID_REUSED"));

    // Its steps, in order, each once.
    let steps: Vec<_> = mesh
        .checkout
        .sagas()
        .steps(&order.id)
        .await?
        .into_iter()
        .map(|s| (s.step, s.outcome))
        .collect();
    let ok = |step: &str| (step.to_owned(), "ok".to_owned());
    assert_eq!(
        steps,
        [
            ok("RESERVING"),
            ok("CHARGING"),
            ok("CONFIRMING"),
            ok("COMMITTING")
        ]
    );
    // Events OrderPlaced then OrderCompleted, and the confirmation email.
    let events = wait_for_events(&mesh, &order.id, 2).await?;
    assert_eq!(
        events,
        [
            <orders::OrderPlaced as DomainEvent>::SUBJECT,
            <orders::OrderCompleted as DomainEvent>::SUBJECT
        ]
    );
    let email = wait_for_email(&mesh.env.config.data_dir, &shopper.email, &order.id).await?;
    assert!(email.contains("confirmed"), "{email}");
    mesh.orders_server.stop().await
}

async fn a_declined_card_fails_the_order_and_releases_the_stock(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut mesh = mesh(backend).await?;
    let book = mesh.product(1250, 5).await?;
    let shopper = mesh.shopper("ada@example.com").await?;
    let status = mesh
        .place(&shopper, "req-1", &[(&book, 2)], DECLINED_CARD)
        .await
        .expect_err("declined");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("CARD_DECLINED"));
    let order_id = order_id_of(&status).context("order_id in ErrorInfo")?;
    let order = mesh.settled(&shopper, &order_id).await?;
    assert_eq!(order.status(), orders::OrderStatus::Failed);
    assert_eq!(order.failure_code, "CARD_DECLINED");
    assert!(order.failure_reason.contains("declined"), "{order:?}");
    assert_eq!(mesh.stock(&book).await?, (5, 0));
    let payment = mesh.payment(&order_id).await?;
    assert_eq!(payment.status(), payments::PaymentStatus::Declined);
    let events = wait_for_events(&mesh, &order_id, 2).await?;
    assert_eq!(
        events,
        [
            <orders::OrderPlaced as DomainEvent>::SUBJECT,
            <orders::OrderFailed as DomainEvent>::SUBJECT
        ]
    );
    // Asking again answers the same, without charging.
    let again = mesh
        .place(&shopper, "req-1", &[(&book, 2)], DECLINED_CARD)
        .await
        .expect_err("still declined");
    assert_eq!(reason_of(&again).as_deref(), Some("CARD_DECLINED"));
    assert_eq!(order_id_of(&again).as_deref(), Some(order_id.as_str()));
    mesh.orders_server.stop().await
}

async fn an_order_beyond_the_stock_fails_without_a_charge(backend: Backend) -> anyhow::Result<()> {
    let mut mesh = mesh(backend).await?;
    let book = mesh.product(1250, 5).await?;
    let shopper = mesh.shopper("alan@example.com").await?;
    let status = mesh
        .place(&shopper, "req-1", &[(&book, 6)], GOOD_CARD)
        .await
        .expect_err("short");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("INSUFFICIENT_STOCK"));
    let order_id = order_id_of(&status).context("order_id")?;
    let order = mesh.settled(&shopper, &order_id).await?;
    assert_eq!(order.status(), orders::OrderStatus::Failed);
    assert_eq!(order.failure_code, "INSUFFICIENT_STOCK");
    assert_eq!(mesh.stock(&book).await?, (5, 0));
    // Payments never heard of it.
    let missing = mesh.payment(&order_id).await.expect_err("never charged");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // A product the catalog does not know: refused before any order exists.
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = mesh
        .place(&shopper, "req-2", &[(&unknown, 1)], GOOD_CARD)
        .await
        .expect_err("unknown product");
    assert_eq!(reason_of(&status).as_deref(), Some("UNKNOWN_PRODUCT"));
    // Bad input never reaches the saga.
    let status = mesh
        .place(&shopper, "", &[(&book, 0)], "not a card")
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        agora_testkit::bad_fields(&status),
        ["card_number", "items[0].quantity", "request_id"]
    );
    // A mistyped card (the Luhn check fails) makes no order: the same
    // request id then goes through with the right number.
    let status = mesh
        .place(&shopper, "req-3", &[(&book, 1)], "4242 4242 4242 4241")
        .await
        .expect_err("mistyped card");
    assert_eq!(agora_testkit::bad_fields(&status), ["card_number"]);
    let order = mesh
        .place(&shopper, "req-3", &[(&book, 1)], "4242-4242-4242-4242")
        .await?;
    assert_eq!(order.status(), orders::OrderStatus::Completed);
    mesh.orders_server.stop().await
}

async fn cancelling_a_completed_order_refunds_and_restocks(backend: Backend) -> anyhow::Result<()> {
    let mut mesh = mesh(backend).await?;
    let book = mesh.product(1250, 5).await?;
    let shopper = mesh.shopper("barbara@example.com").await?;
    let order = mesh
        .place(&shopper, "req-1", &[(&book, 2)], GOOD_CARD)
        .await?;
    assert_eq!(mesh.stock(&book).await?, (3, 0));
    for _ in 0..2 {
        let cancelled = mesh
            .orders
            .cancel_order(with_token(
                orders::CancelOrderRequest {
                    id: order.id.clone(),
                },
                &shopper.token,
            ))
            .await?
            .into_inner()
            .order
            .context("no order")?;
        assert_eq!(cancelled.status(), orders::OrderStatus::Cancelled);
        assert_eq!(cancelled.failure_code, "CANCELLED_BY_CUSTOMER");
    }
    assert_eq!(mesh.stock(&book).await?, (5, 0));
    let payment = mesh.payment(&order.id).await?;
    assert_eq!(payment.status(), payments::PaymentStatus::Refunded);
    // Someone else's order is not theirs to cancel.
    let other = mesh.shopper("eve@example.com").await?;
    let status = mesh
        .orders
        .cancel_order(with_token(
            orders::CancelOrderRequest {
                id: order.id.clone(),
            },
            &other.token,
        ))
        .await
        .expect_err("not the owner");
    assert_eq!(status.code(), Code::NotFound);
    mesh.orders_server.stop().await
}

/// A payments server of the test's own on a fixed address, to stop and
/// start again.
struct Payments {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn serve_payments(hosted: HostedService, addr: SocketAddr) -> anyhow::Result<Payments> {
    let app = Server::new().host(hosted).bind(addr).await?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    Ok(Payments { stop, task })
}

impl Payments {
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

fn payments_breaker(mesh: &Mesh) -> Option<BreakerState> {
    mesh.checkout
        .breaker_states()
        .into_iter()
        .find(|(service, _, _)| *service == "payments")
        .map(|(_, _, state)| state)
}

async fn with_payments_down_the_breaker_opens_and_sagas_compensate(
    backend: Backend,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], agora_testkit::free_port()?));
    let mut mesh = mesh_with(
        backend,
        |config| {
            config.clients.breaker_failure_threshold = 2;
            config.clients.breaker_recovery_ms = 300;
            config.checkout.step_timeout_ms = 1_000;
        },
        Some(addr),
    )
    .await?;
    let book = mesh.product(1250, 50).await?;
    let shopper = mesh.shopper("katherine@example.com").await?;

    // Payments is not running: the first checkouts find it unreachable, the
    // breaker opens, and the ones after fail at once, without a call.
    let mut failed = Vec::new();
    for n in 0..4 {
        let status = mesh
            .place(&shopper, &format!("req-{n}"), &[(&book, 1)], GOOD_CARD)
            .await
            .expect_err("payments is down");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason_of(&status).as_deref(), Some("PAYMENT_UNAVAILABLE"));
        failed.push(order_id_of(&status).context("order_id")?);
    }
    assert_eq!(payments_breaker(&mesh), Some(BreakerState::Open));
    let started = tokio::time::Instant::now();
    let status = mesh
        .place(&shopper, "req-fast", &[(&book, 1)], GOOD_CARD)
        .await
        .expect_err("fails fast");
    assert_eq!(status.code(), Code::Unavailable);
    failed.push(order_id_of(&status).context("order_id")?);
    // Not a timing target: only far below the step deadline it would
    // otherwise have waited for.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // The stock does not wait for payments: the sagas release it while their
    // refunds cannot get through.
    let until = tokio::time::Instant::now() + HANG_GUARD;
    while mesh.stock(&book).await? != (50, 0) {
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "stock held while payments is down: {:?}",
            mesh.stock(&book).await?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Payments comes back: the breaker half-opens, a probe succeeds, it
    // closes, and every failed checkout finishes compensating.
    let payments = serve_payments(agora_payments::hosted(&mesh.env.config).await?, addr).await?;
    for id in &failed {
        let order = mesh.settled(&shopper, id).await?;
        assert_eq!(order.status(), orders::OrderStatus::Failed, "{order:?}");
        assert_eq!(order.failure_code, "PAYMENT_UNAVAILABLE");
        // Voided: never charged, and can never be.
        let payment = mesh.payment(id).await?;
        assert_eq!(payment.status(), payments::PaymentStatus::Voided);
    }
    assert_eq!(mesh.stock(&book).await?, (50, 0));
    let order = mesh
        .place(&shopper, "req-after", &[(&book, 1)], GOOD_CARD)
        .await?;
    assert_eq!(order.status(), orders::OrderStatus::Completed);
    assert_eq!(payments_breaker(&mesh), Some(BreakerState::Closed));
    payments.stop().await?;
    mesh.orders_server.stop().await
}

async fn a_checkout_past_its_deadline_is_undone_before_any_charge(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut mesh = mesh_with(backend, |config| config.checkout.saga_timeout_ms = 1, None).await?;
    let book = mesh.product(1250, 5).await?;
    let shopper = mesh.shopper("edsger@example.com").await?;
    let status = mesh
        .place(&shopper, "req-1", &[(&book, 1)], GOOD_CARD)
        .await
        .expect_err("too late");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("CHECKOUT_TIMEOUT"));
    let order_id = order_id_of(&status).context("order_id")?;
    let order = mesh.settled(&shopper, &order_id).await?;
    assert_eq!(order.status(), orders::OrderStatus::Failed);
    assert_eq!(order.failure_code, "CHECKOUT_TIMEOUT");
    assert_eq!(mesh.stock(&book).await?, (5, 0));
    let missing = mesh.payment(&order_id).await.expect_err("never charged");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    mesh.orders_server.stop().await
}

backend_tests!(
    a_checkout_reserves_charges_and_completes_once,
    a_checkout_past_its_deadline_is_undone_before_any_charge,
    a_declined_card_fails_the_order_and_releases_the_stock,
    an_order_beyond_the_stock_fails_without_a_charge,
    cancelling_a_completed_order_refunds_and_restocks,
    with_payments_down_the_breaker_opens_and_sagas_compensate,
);

/// A TCP proxy in front of one service instance that counts the bytes
/// callers send through it (how the test sees where calls went) and can die
/// like a crashed host: listener gone, open connections cut.
struct CountingProxy {
    addr: SocketAddr,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = std::sync::Arc::clone(&sent);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let counter = std::sync::Arc::clone(&counter);
                connections.spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_read, mut in_write) = inbound.split();
                    let (mut out_read, mut out_write) = outbound.split();
                    let upstream = async {
                        let mut buffer = vec![0_u8; 16 * 1024];
                        loop {
                            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                            let n = match in_read.read(&mut buffer).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                            if out_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let downstream = tokio::io::copy(&mut out_read, &mut in_write);
                    tokio::select! {
                        () = upstream => {}
                        _ = downstream => {}
                    }
                });
            }
        });
        Ok(Self { addr, sent, task })
    }

    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Dies at once: the accept loop and (with it) every connection task.
    fn kill(&self) {
        self.task.abort();
    }
}

/// Registers `address` as an instance of `service` in NATS, heartbeating
/// until the returned task is aborted (a crash: the key stays until it
/// expires) or its token cancelled (a shutdown: the key is deleted).
fn register(
    client: &async_nats::Client,
    config: &agora_platform::config::Config,
    service: &str,
    instance: &str,
    address: SocketAddr,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let settings = agora_platform_client::ClientSettings::from_config(&config.clients)?;
    let registration =
        agora_platform_client::registry::Registration::new(service, format!("http://{address}"))?
            .with_instance_id(instance)?;
    Ok(tokio::spawn(registration.run(
        client.clone(),
        settings,
        || async { agora_platform_client::registry::Health::Serving },
        CancellationToken::new(),
    )))
}

async fn checkouts_spread_over_two_inventory_instances_and_survive_losing_one(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut env = TestEnv::per_service(backend).await?;
    let nats = NatsServer::start().await?;
    env.use_nats(&nats);
    env.config.clients.discovery = agora_platform::config::DiscoveryMode::Nats;
    env.config.clients.heartbeat_secs = 1;
    env.config.clients.instance_ttl_secs = 3;
    let services = TestServer::start(vec![
        agora_users::hosted(&env.config).await?,
        agora_catalog::hosted(&env.config).await?,
        agora_payments::hosted(&env.config).await?,
    ])
    .await?;
    // Two inventory instances on one database, each behind a proxy that
    // counts what reaches it.
    let inventory_a = TestServer::start(vec![agora_inventory::hosted(&env.config).await?]).await?;
    let inventory_b = TestServer::start(vec![agora_inventory::hosted(&env.config).await?]).await?;
    let proxy_a = CountingProxy::start(inventory_a.addr()).await?;
    let proxy_b = CountingProxy::start(inventory_b.addr()).await?;
    let client = async_nats::connect(nats.url()).await?;
    let mut heartbeats = vec![
        register(&client, &env.config, "catalog", "main", services.addr())?,
        register(&client, &env.config, "payments", "main", services.addr())?,
        register(&client, &env.config, "inventory", "a", proxy_a.addr)?,
    ];
    let heartbeat_b = register(&client, &env.config, "inventory", "b", proxy_b.addr)?;
    let built = agora_orders::build(&env.config).await?;
    let orders_server = TestServer::start(vec![built.hosted]).await?;

    let admin = env.admin_token()?;
    let mut catalog = CatalogServiceClient::new(services.channel()?);
    let mut users = UserServiceClient::new(services.channel()?);
    let product = catalog
        .create_product(with_token(
            catalog::CreateProductRequest {
                sku: "spread-1".into(),
                name: "Spread".into(),
                description: String::new(),
                price: Some(eur(500)),
                categories: vec![],
            },
            &admin,
        ))
        .await?
        .into_inner()
        .product
        .context("no product")?
        .id;
    let mut inventory = InventoryServiceClient::new(inventory_a.channel()?);
    inventory
        .set_stock(with_token(
            inventory::SetStockRequest {
                product_id: product.clone(),
                quantity: 1_000,
            },
            &admin,
        ))
        .await?;
    users
        .create_user(users::CreateUserRequest {
            email: "lin@example.com".into(),
            name: "Lin".into(),
            password: "correct horse battery".into(),
        })
        .await?;
    let token = users
        .authenticate(users::AuthenticateRequest {
            email: "lin@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await?
        .into_inner()
        .access_token;
    let orders = OrderServiceClient::new(orders_server.channel()?);
    // Orders learns of both instances from the registry.
    let until = tokio::time::Instant::now() + HANG_GUARD;
    while built
        .checkout
        .breaker_states()
        .iter()
        .filter(|(service, _, _)| *service == "inventory")
        .count()
        < 2
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "orders never saw both instances"
        );
        let _ = place_one(&orders, &token, &product, "warm-up").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Checkouts four at a time: both instances get a fair share.
    let (a0, b0) = (proxy_a.sent(), proxy_b.sent());
    let failed = checkouts(&orders, &token, &product, "spread", 40, None).await?;
    assert!(
        failed.is_empty(),
        "checkouts failed with both instances up: {failed:?}"
    );
    let (a, b) = (proxy_a.sent() - a0, proxy_b.sent() - b0);
    assert!(
        a * 4 >= a + b && b * 4 >= a + b,
        "calls did not spread: {a} bytes to a, {b} to b"
    );

    // Instance b crashes in the middle of a run, while a batch is in flight
    // (its key stays registered until it expires): only the checkouts of
    // that batch may fail.
    let kill_b = || {
        proxy_b.kill();
        heartbeat_b.abort();
    };
    let failed = checkouts(
        &orders,
        &token,
        &product,
        "failover",
        40,
        Some((10, &kill_b)),
    )
    .await?;
    eprintln!(
        "spread: {a} bytes to a, {b} to b; failover: {} of 40 failed: {failed:?}",
        failed.len()
    );
    assert!(
        failed.len() <= 4,
        "{} checkouts failed, more than the 4 in flight: {failed:?}",
        failed.len()
    );
    let b_after = proxy_b.sent();
    let failed = checkouts(&orders, &token, &product, "after", 20, None).await?;
    assert!(
        failed.is_empty(),
        "checkouts failed after the failover: {failed:?}"
    );
    assert_eq!(proxy_b.sent(), b_after, "the dead instance still got calls");
    for heartbeat in heartbeats.drain(..) {
        heartbeat.abort();
    }
    proxy_a.kill();
    orders_server.stop().await
}

async fn place_one(
    orders: &OrderServiceClient<Channel>,
    token: &str,
    product: &str,
    request_id: &str,
) -> Result<orders::Order, tonic::Status> {
    let mut orders = orders.clone();
    orders
        .place_order(with_token(
            orders::PlaceOrderRequest {
                request_id: request_id.to_owned(),
                items: vec![orders::LineItem {
                    product_id: product.to_owned(),
                    quantity: 1,
                }],
                card_number: GOOD_CARD.into(),
            },
            token,
        ))
        .await?
        .into_inner()
        .order
        .ok_or_else(|| tonic::Status::internal("no order"))
}

/// Places `count` checkouts four at a time; returns the ones that did not
/// complete, each with what came back. With `event = (at, happen)`,
/// `happen` runs while the first batch starting at or after checkout `at`
/// is in flight: its calls are sent, and `happen` runs after a random pause
/// of a few milliseconds, before they are awaited.
async fn checkouts(
    orders: &OrderServiceClient<Channel>,
    token: &str,
    product: &str,
    prefix: &str,
    count: usize,
    event: Option<(usize, &dyn Fn())>,
) -> anyhow::Result<Vec<String>> {
    use rand::Rng as _;
    let mut failed = Vec::new();
    let mut started = 0;
    let mut event = event;
    while started < count {
        let first = started;
        let batch: Vec<_> = (first..(first + 4).min(count))
            .map(|n| {
                let (orders, token, product) =
                    (orders.clone(), token.to_owned(), product.to_owned());
                let request_id = format!("{prefix}-{n}");
                let call = tokio::spawn({
                    let request_id = request_id.clone();
                    async move { place_one(&orders, &token, &product, &request_id).await }
                });
                (request_id, call)
            })
            .collect();
        started += batch.len();
        if let Some((at, happen)) = event
            && first >= at
        {
            // A few milliseconds in, the batch's sagas are somewhere between
            // pricing and committing: the event hits calls in flight.
            let pause = rand::thread_rng().gen_range(1..=8);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let in_flight = batch.iter().filter(|(_, call)| !call.is_finished()).count();
            happen();
            event = None;
            eprintln!(
                "{prefix}: the event came {pause} ms in, with {in_flight} of {} checkouts \
                 in flight",
                batch.len()
            );
            anyhow::ensure!(in_flight > 0, "the event came after the batch had finished");
        }
        for (request_id, call) in batch {
            match tokio::time::timeout(HANG_GUARD, call).await?? {
                Ok(order) if order.status() == orders::OrderStatus::Completed => {}
                Ok(order) => failed.push(format!("{request_id}: {:?}", order.status())),
                Err(status) => failed.push(format!(
                    "{request_id}: {:?} {}",
                    status.code(),
                    status.message()
                )),
            }
        }
    }
    Ok(failed)
}

mod discovery {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkouts_spread_over_two_inventory_instances_and_survive_losing_one()
    -> anyhow::Result<()> {
        super::checkouts_spread_over_two_inventory_instances_and_survive_losing_one(
            Backend::Postgres,
        )
        .await
    }
}
