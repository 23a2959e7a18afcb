//! RPC latency of the services over real gRPC on loopback, PostgreSQL and
//! SQLite side by side in one run (the machine is shared and noisy: compare
//! medians and the PostgreSQL/SQLite ratio, not absolute numbers across runs).
//!
//! `just bench` runs it (release build) and prints a Markdown table for
//! BENCHMARKS.md. `AGORA_BENCH_ITERATIONS` sets the calls per operation.
//! Under `cargo test` (no `--bench` argument) it runs as a quick smoke test
//! with a handful of calls, so the benchmark cannot rot unnoticed.

use std::time::{Duration, Instant};

use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::common::v1::Money;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_proto::payments::v1 as payments;
use agora_proto::payments::v1::payment_service_client::PaymentServiceClient;
use agora_proto::users::v1 as users;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use agora_testkit::{Backend, TestEnv, TestServer, with_token};

/// Latencies of one operation, in microseconds, sorted.
struct Samples(Vec<f64>);

impl Samples {
    fn percentile(&self, p: f64) -> f64 {
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0.get(index).copied().unwrap_or(f64::NAN)
    }
}

async fn measure<F, Fut>(iterations: usize, mut call: F) -> anyhow::Result<Samples>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    // Warm up connections, statement caches and the allocator first.
    for i in 0..iterations / 10 + 1 {
        call(usize::MAX - i).await?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let started = Instant::now();
        call(i).await?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok(Samples(samples))
}

type Results = Vec<(&'static str, Samples)>;

async fn run(backend: Backend, iterations: usize, products: i64) -> anyhow::Result<Results> {
    let env = TestEnv::per_service(backend).await?;
    let server = TestServer::start(vec![
        agora_users::hosted(&env.config).await?,
        agora_catalog::hosted(&env.config).await?,
        agora_inventory::hosted(&env.config).await?,
        agora_payments::hosted(&env.config).await?,
    ])
    .await?;
    let channel = server.channel()?;
    let admin = env.admin_token()?;

    let mut users_client = UserServiceClient::new(channel.clone());
    let user = users_client
        .create_user(users::CreateUserRequest {
            email: "bench@example.com".into(),
            name: "Bench".into(),
            password: "correct horse battery".into(),
        })
        .await?
        .into_inner()
        .user
        .unwrap_or_default();
    let user_token = env.user_token(&user.id, &user.email, &[])?;

    let mut catalog_client = CatalogServiceClient::new(channel.clone());
    let mut product_ids = Vec::new();
    for n in 0..products {
        let request = catalog::CreateProductRequest {
            sku: format!("BENCH-{n:04}"),
            name: format!("Bench product {n}"),
            description: "A product for the benchmark".into(),
            price: Some(Money {
                currency_code: "EUR".into(),
                amount_minor: 100 + n,
            }),
            categories: vec!["bench".into()],
        };
        let product = catalog_client
            .create_product(with_token(request, &admin))
            .await?
            .into_inner()
            .product
            .unwrap_or_default();
        product_ids.push(product.id);
    }
    let mut inventory_client = InventoryServiceClient::new(channel.clone());
    let stocked = product_ids.first().cloned().unwrap_or_default();
    inventory_client
        .set_stock(with_token(
            inventory::SetStockRequest {
                product_id: stocked.clone(),
                quantity: 1_000_000_000,
            },
            &admin,
        ))
        .await?;
    let payments_client = PaymentServiceClient::new(channel.clone());

    let mut results = Vec::new();
    let id = user.id.clone();
    results.push((
        "users.GetUser (token check + read)",
        measure(iterations, |_| {
            let mut client = users_client.clone();
            let request = with_token(users::GetUserRequest { id: id.clone() }, &user_token);
            async move { client.get_user(request).await.map(drop).map_err(Into::into) }
        })
        .await?,
    ));
    results.push((
        "catalog.GetProduct",
        measure(iterations, |i| {
            let mut client = catalog_client.clone();
            let id = product_ids
                .get(i % product_ids.len())
                .cloned()
                .unwrap_or_default();
            async move {
                client
                    .get_product(catalog::GetProductRequest { id })
                    .await
                    .map(drop)
                    .map_err(Into::into)
            }
        })
        .await?,
    ));
    results.push((
        "catalog.ListProducts (page of 50)",
        measure(iterations, |_| {
            let mut client = catalog_client.clone();
            async move {
                client
                    .list_products(catalog::ListProductsRequest {
                        page_size: 50,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                    .map_err(Into::into)
            }
        })
        .await?,
    ));
    results.push((
        "inventory.ReserveStock + ReleaseReservation",
        measure(iterations, |i| {
            let mut client = inventory_client.clone();
            // Per call, as the orders service does: service tokens live a
            // minute, and the signer hands out its cached one.
            let token = env.service_token("orders", "inventory");
            let product_id = stocked.clone();
            async move {
                let token = token?;
                let reservation_id = format!("bench-{backend:?}-{i}");
                let items = vec![inventory::ReservationItem {
                    product_id,
                    quantity: 1,
                }];
                let reserve = inventory::ReserveStockRequest {
                    reservation_id: reservation_id.clone(),
                    items,
                };
                client.reserve_stock(with_token(reserve, &token)).await?;
                let release = inventory::ReleaseReservationRequest { reservation_id };
                client
                    .release_reservation(with_token(release, &token))
                    .await?;
                Ok(())
            }
        })
        .await?,
    ));
    results.push((
        "payments.Charge (new payment)",
        measure(iterations, |i| {
            let mut client = payments_client.clone();
            let token = env.service_token("orders", "payments");
            let user_id = user.id.clone();
            async move {
                let token = token?;
                let request = payments::ChargeRequest {
                    payment_id: format!("bench-{backend:?}-{i}"),
                    user_id,
                    amount: Some(Money {
                        currency_code: "EUR".into(),
                        amount_minor: 1999,
                    }),
                    card_number: "4242424242424242".into(),
                };
                client
                    .charge(with_token(request, &token))
                    .await
                    .map(drop)
                    .map_err(Into::into)
            }
        })
        .await?,
    ));
    server.stop().await?;
    Ok(results)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let (iterations, products) = if benchmarking {
        let iterations = std::env::var("AGORA_BENCH_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        (iterations, 500)
    } else {
        (5, 60)
    };
    eprintln!("measuring {iterations} calls per operation on PostgreSQL, then SQLite ...");
    let started = Instant::now();
    let postgres = run(Backend::Postgres, iterations, products).await?;
    let sqlite = run(Backend::Sqlite, iterations, products).await?;
    println!("| operation | PostgreSQL p50 | p99 | SQLite p50 | p99 | PostgreSQL/SQLite (p50) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for ((name, pg), (_, lite)) in postgres.iter().zip(&sqlite) {
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.2} |",
            pg.percentile(0.5),
            pg.percentile(0.99),
            lite.percentile(0.5),
            lite.percentile(0.99),
            pg.percentile(0.5) / lite.percentile(0.5),
        );
    }
    eprintln!(
        "done in {:.1?}",
        Duration::from_secs_f64(started.elapsed().as_secs_f64())
    );
    Ok(())
}
