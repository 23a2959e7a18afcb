//! Who may call the reservation RPCs, over real gRPC on loopback: the orders
//! service only, with a token it signed with its own key for inventory.
//! Every test runs twice: on PostgreSQL and on SQLite.

use agora_platform::auth::{ServiceTokenSigner, generate_keypair_pem};
use agora_proto::inventory::v1 as pb;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests, with_token};
use tonic::Code;
use tonic::transport::Channel;

fn reserve(reservation_id: &str, product_id: &str) -> pb::ReserveStockRequest {
    pb::ReserveStockRequest {
        reservation_id: reservation_id.to_owned(),
        items: vec![pb::ReservationItem {
            product_id: product_id.to_owned(),
            quantity: 2,
        }],
    }
}

/// (available, reserved) of a product.
async fn stock(
    client: &mut InventoryServiceClient<Channel>,
    product_id: &str,
) -> anyhow::Result<(i64, i64)> {
    let stock = client
        .get_stock(pb::GetStockRequest {
            product_id: product_id.to_owned(),
        })
        .await?
        .into_inner()
        .stock
        .unwrap_or_default();
    Ok((stock.available, stock.reserved))
}

async fn only_orders_may_reserve_stock(backend: Backend) -> anyhow::Result<()> {
    let env = TestEnv::new(backend).await?;
    let server = TestServer::start(vec![agora_inventory::hosted(&env.config).await?]).await?;
    let mut client = InventoryServiceClient::new(server.channel()?);
    let product = uuid::Uuid::now_v7().to_string();
    client
        .set_stock(with_token(
            pb::SetStockRequest {
                product_id: product.clone(),
                quantity: 5,
            },
            &env.admin_token()?,
        ))
        .await?;

    // A valid token of a service that has no business reserving stock.
    let catalog = env.service_token("catalog", "inventory")?;
    let status = client
        .reserve_stock(with_token(reserve("by-catalog", &product), &catalog))
        .await
        .expect_err("catalog may not reserve");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        "catalog may not call this; allowed: orders"
    );
    for status in [
        client
            .release_reservation(with_token(
                pb::ReleaseReservationRequest {
                    reservation_id: "by-catalog".into(),
                },
                &catalog,
            ))
            .await
            .expect_err("catalog may not release"),
        client
            .commit_reservation(with_token(
                pb::CommitReservationRequest {
                    reservation_id: "by-catalog".into(),
                },
                &catalog,
            ))
            .await
            .expect_err("catalog may not commit"),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // Users, even admins, may not either.
    let status = client
        .reserve_stock(with_token(
            reserve("by-admin", &product),
            &env.admin_token()?,
        ))
        .await
        .expect_err("users may not reserve");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Tokens in the name of orders that inventory must not believe.
    let (stranger_key, _) = generate_keypair_pem()?;
    let stranger = ServiceTokenSigner::from_pem(
        stranger_key.expose().as_bytes(),
        &env.config.auth.issuer,
        "orders",
        60,
    )?;
    for (why, token) in [
        (
            "meant for payments",
            env.service_token("orders", "payments")?,
        ),
        ("expired", env.expired_service_token("orders", "inventory")?),
        ("signed by an unknown key", stranger.token_for("inventory")?),
    ] {
        let status = client
            .reserve_stock(with_token(reserve(why, &product), &token))
            .await
            .expect_err(why);
        assert_eq!(status.code(), Code::Unauthenticated, "{why}: {status:?}");
    }
    let status = client
        .reserve_stock(reserve("anonymous", &product))
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(stock(&mut client, &product).await?, (5, 0), "nothing moved");

    // The orders service, for inventory: reserved.
    let orders = env.service_token("orders", "inventory")?;
    let reservation = client
        .reserve_stock(with_token(reserve("by-orders", &product), &orders))
        .await?
        .into_inner()
        .reservation
        .unwrap_or_default();
    assert_eq!(reservation.reservation_id, "by-orders");
    assert_eq!(stock(&mut client, &product).await?, (3, 2));
    client
        .release_reservation(with_token(
            pb::ReleaseReservationRequest {
                reservation_id: "by-orders".into(),
            },
            &orders,
        ))
        .await?;
    assert_eq!(stock(&mut client, &product).await?, (5, 0));
    server.stop().await
}

backend_tests!(only_orders_may_reserve_stock);
