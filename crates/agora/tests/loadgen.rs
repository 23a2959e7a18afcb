//! `agora loadgen` against the seeded monolith: the checkouts it reports are
//! real ones, visible in the stock they sold.

mod common;

use std::process::Command;

use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use common::{AGORA, AgoraProcess};

/// Units `agora loadgen` gives every product before its run.
const STOCK: i64 = 1_000;

#[test]
fn loadgen_places_the_checkouts_it_was_asked_for_and_reports_them() -> anyhow::Result<()> {
    let admin = "admin@agora.localhost";
    let admin_emails = format!("[\"{admin}\"]");
    let agora = AgoraProcess::start(&["all"], &[("AGORA_AUTH__ADMIN_EMAILS", &admin_emails)])?;
    let (seeded, output) = agora.seed(admin)?;
    assert!(seeded, "seed failed:\n{output}");

    let dir = tempfile::tempdir()?;
    let json_path = dir.path().join("loadgen.json");
    let output = Command::new(AGORA)
        .arg("loadgen")
        .args(["--checkouts", "5", "--concurrency", "2"])
        .args(["--stock", &STOCK.to_string()])
        .args(["--admin-email", admin])
        .arg("--data-dir")
        .arg(&agora.data)
        .arg("--json")
        .arg(&json_path)
        .args(["--users", &format!("http://{}", agora.addr("users"))])
        .args(["--catalog", &format!("http://{}", agora.addr("catalog"))])
        .args([
            "--inventory",
            &format!("http://{}", agora.addr("inventory")),
        ])
        .args(["--orders", &format!("http://{}", agora.addr("orders"))])
        .env_remove("AGORA_CONFIG")
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loadgen failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("checkouts: 5 completed"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("errors: none"), "{stdout}\n{stderr}");

    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path)?)?;
    assert_eq!(summary["checkouts"], 5, "{summary:#}");
    assert_eq!(
        summary["operations"]["PlaceOrder"]["calls"], 5,
        "{summary:#}"
    );
    assert_eq!(summary["all"]["errors"], 0, "{summary:#}");
    // The default mix browses too, and every successful call has a latency.
    let calls = summary["all"]["calls"].as_u64().unwrap_or_default();
    assert!(calls >= 5, "{summary:#}");
    assert!(
        summary["operations"]["PlaceOrder"]["latency_ms"]["p50"]
            .as_f64()
            .unwrap_or_default()
            > 0.0,
        "{summary:#}"
    );

    // Five orders of one to three products, one unit each: 5 to 15 units
    // taken from the stock the load generator set.
    let sold = tokio::runtime::Runtime::new()?.block_on(async {
        let mut catalog =
            CatalogServiceClient::connect(format!("http://{}", agora.addr("catalog"))).await?;
        let mut inventory =
            InventoryServiceClient::connect(format!("http://{}", agora.addr("inventory"))).await?;
        let products = catalog
            .list_products(catalog::ListProductsRequest {
                page_size: 500,
                ..Default::default()
            })
            .await?
            .into_inner()
            .products;
        let mut sold = 0;
        for product in products {
            let stock = inventory
                .get_stock(inventory::GetStockRequest {
                    product_id: product.id,
                })
                .await?
                .into_inner()
                .stock
                .unwrap_or_default();
            // Reserved or already committed: gone from the shelf either way.
            sold += STOCK - stock.available;
        }
        anyhow::Ok(sold)
    })?;
    assert!((5..=15).contains(&sold), "{sold} units sold");
    Ok(())
}
