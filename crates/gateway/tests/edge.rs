//! The gateway in front of real users and catalog services on loopback:
//! every protocol, the edge policy (tokens, access levels, rate limits,
//! CORS), health, metrics, and bad input from clients.

mod common;

use std::time::Duration;

use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::common::v1::Money;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_testkit::with_token;
use base64::Engine as _;
use common::{Mesh, bodyless, frame, frames, post, raw};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

const GET_PRODUCT: &str = "/agora.catalog.v1.CatalogService/GetProduct";
const LIST_PRODUCTS: &str = "/agora.catalog.v1.CatalogService/ListProducts";

/// Creates a product through the gateway as an admin; returns its id.
async fn create_product(mesh: &Mesh, sku: &str) -> anyhow::Result<String> {
    let mut client = CatalogServiceClient::new(mesh.channel().await?);
    let request = catalog::CreateProductRequest {
        sku: sku.into(),
        name: format!("Product {sku}"),
        description: "made by the gateway tests".into(),
        price: Some(Money {
            currency_code: "EUR".into(),
            amount_minor: 1250,
        }),
        categories: vec!["tests".into()],
    };
    let created = client
        .create_product(with_token(request, &mesh.env.admin_token()?))
        .await?
        .into_inner();
    Ok(created.product.map(|p| p.id).unwrap_or_default())
}

fn get_product(id: &str) -> catalog::GetProductRequest {
    catalog::GetProductRequest { id: id.into() }
}

#[tokio::test]
async fn native_grpc_reaches_the_services_through_the_gateway() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    let id = create_product(&mesh, "GW-1").await?;
    let mut client = CatalogServiceClient::new(mesh.channel().await?);
    let product = client.get_product(get_product(&id)).await?.into_inner();
    assert_eq!(product.product.map(|p| p.sku).as_deref(), Some("GW-1"));
    let listed = client
        .list_products(catalog::ListProductsRequest {
            page_size: 10,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.products.len(), 1);
    // A backend error keeps its code, message and details.
    let missing = client
        .get_product(get_product("0190b7a4-0000-7000-8000-000000000000"))
        .await
        .expect_err("unknown product");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    mesh.stop().await
}

#[tokio::test]
async fn unknown_services_and_methods_are_unimplemented() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    for (path, expected) in [
        ("/agora.catalog.v1.CatalogService/Nope", "unknown method"),
        ("/agora.nothing.v1.Nothing/Get", "unknown service"),
    ] {
        let response = raw(
            mesh.gateway,
            &post(
                path,
                &[("content-type", "application/grpc-web+proto")],
                &frame(0, &[]),
            ),
        )
        .await?;
        assert_eq!(response.status, 200);
        assert_eq!(response.header("grpc-status"), Some("12"), "{response:?}");
        assert!(
            response
                .header("grpc-message")
                .is_some_and(|m| m.contains(&expected.replace(' ', "%20"))),
            "{response:?}"
        );
        assert!(response.body.is_empty(), "trailers-only: {response:?}");
    }
    mesh.stop().await
}

#[tokio::test]
async fn service_level_rpcs_are_refused_from_outside_whatever_the_token() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    let mut client = InventoryServiceClient::new(mesh.channel().await?);
    let request = || inventory::ReserveStockRequest::default();
    let anonymous = client.reserve_stock(request()).await.expect_err("refused");
    assert_eq!(anonymous.code(), Code::PermissionDenied, "{anonymous:?}");
    let admin = client
        .reserve_stock(with_token(request(), &mesh.env.admin_token()?))
        .await
        .expect_err("refused");
    assert_eq!(admin.code(), Code::PermissionDenied, "{admin:?}");
    // Even a genuine service token: services call each other directly.
    let service = client
        .reserve_stock(with_token(
            request(),
            &mesh.env.service_token("orders", "inventory")?,
        ))
        .await
        .expect_err("refused");
    assert_eq!(service.code(), Code::PermissionDenied, "{service:?}");
    mesh.stop().await
}

#[tokio::test]
async fn tokens_and_access_levels_are_checked_at_the_edge() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    let id = create_product(&mesh, "GW-2").await?;
    let mut client = CatalogServiceClient::new(mesh.channel().await?);
    // Public: no token needed.
    client.get_product(get_product(&id)).await?;
    // A bad token is refused even on a public method.
    for token in ["garbage", "a.b.c"] {
        let status = client
            .get_product(with_token(get_product(&id), token))
            .await
            .expect_err("bad token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    // A token signed by a key the gateway does not know.
    let (stranger_key, _) = agora_platform::auth::generate_keypair_pem()?;
    let stranger = agora_platform::auth::TokenIssuer::from_pem(
        stranger_key.expose().as_bytes(),
        "agora",
        3600,
    )?
    .issue_user_token("u-1", "x@agora.test", &[])?
    .token;
    let status = client
        .get_product(with_token(get_product(&id), &stranger))
        .await
        .expect_err("unknown key");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // A service token is not a client's token.
    let status = client
        .get_product(with_token(
            get_product(&id),
            &mesh.env.service_token("orders", "catalog")?,
        ))
        .await
        .expect_err("service token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Admin level: anonymous is UNAUTHENTICATED, a user PERMISSION_DENIED.
    let update = || catalog::UpdateProductRequest {
        product: Some(catalog::Product {
            id: id.clone(),
            name: "Renamed".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["name".into()],
        }),
    };
    let status = client
        .update_product(update())
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let user = mesh.env.user_token("u-2", "u2@agora.test", &[])?;
    let status = client
        .update_product(with_token(update(), &user))
        .await
        .expect_err("not admin");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    mesh.stop().await
}

#[tokio::test]
async fn clients_over_their_rate_get_resource_exhausted_with_retry_info() -> anyhow::Result<()> {
    use tonic_types::StatusExt as _;
    let mesh = Mesh::start(|config| {
        config.gateway.rate_limit_per_sec = 1;
        config.gateway.rate_limit_burst = 2;
    })
    .await?;
    let mut client = CatalogServiceClient::new(mesh.channel().await?);
    let list = || catalog::ListProductsRequest::default();
    // The burst, then refusal (health checks of the harness went to the
    // gateway too, from the same IP: spend what is left first).
    let mut refused = None;
    for _ in 0..5 {
        if let Err(status) = client.list_products(list()).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the anonymous client is limited");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    let retry = details.retry_info().and_then(|r| r.retry_delay);
    assert!(
        retry.is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(1)),
        "{retry:?}"
    );
    // A logged-in user has a bucket of their own.
    let user = mesh.env.user_token("u-3", "u3@agora.test", &[])?;
    client.list_products(with_token(list(), &user)).await?;
    client.list_products(with_token(list(), &user)).await?;
    let status = client
        .list_products(with_token(list(), &user))
        .await
        .expect_err("the user's burst is 2");
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Connect sees HTTP 429.
    let response = raw(
        mesh.gateway,
        &post(
            LIST_PRODUCTS,
            &[("content-type", "application/json")],
            b"{}",
        ),
    )
    .await?;
    assert_eq!(response.status, 429, "{response:?}");
    mesh.stop().await
}

#[tokio::test]
async fn grpc_web_binary_and_text_carry_messages_and_trailer_frames() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    let id = create_product(&mesh, "GW-3").await?;
    let body = frame(0, &get_product(&id).encode_to_vec());

    let response = raw(
        mesh.gateway,
        &post(
            GET_PRODUCT,
            &[
                ("content-type", "application/grpc-web+proto"),
                ("x-grpc-web", "1"),
            ],
            &body,
        ),
    )
    .await?;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("application/grpc-web+proto")
    );
    let parts = frames(&response.body)?;
    assert_eq!(parts.len(), 2, "{parts:?}");
    let message = catalog::GetProductResponse::decode(parts[0].1.as_slice())?;
    assert_eq!(message.product.map(|p| p.sku).as_deref(), Some("GW-3"));
    assert_eq!(parts[1].0, 0x80);
    assert_eq!(parts[1].1, b"grpc-status:0\r\n");

    // Text: base64 in, base64 out, each frame padded on its own.
    let b64 = base64::engine::general_purpose::STANDARD;
    let response = raw(
        mesh.gateway,
        &post(
            GET_PRODUCT,
            &[("content-type", "application/grpc-web-text")],
            b64.encode(&body).as_bytes(),
        ),
    )
    .await?;
    assert_eq!(
        response.header("content-type"),
        Some("application/grpc-web-text+proto")
    );
    // Every frame is padded on its own: decode group by group.
    let mut decoded = Vec::new();
    anyhow::ensure!(
        response.body.len() % 4 == 0,
        "text body not in 4-byte groups"
    );
    for group in response.body.chunks(4) {
        decoded.extend(b64.decode(group)?);
    }
    let parts = frames(&decoded)?;
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[1], (0x80, b"grpc-status:0\r\n".to_vec()));

    // A trailers-only error stays headers-only: no empty 0x80 frame.
    let missing = frame(
        0,
        &get_product("0190b7a4-0000-7000-8000-000000000000").encode_to_vec(),
    );
    let response = raw(
        mesh.gateway,
        &post(
            GET_PRODUCT,
            &[("content-type", "application/grpc-web+proto")],
            &missing,
        ),
    )
    .await?;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("grpc-status"), Some("5"), "{response:?}");
    assert!(response.body.is_empty(), "{response:?}");
    mesh.stop().await
}

#[tokio::test]
async fn connect_json_unary_get_and_errors() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    let id = create_product(&mesh, "GW-4").await?;
    let json = [("content-type", "application/json")];

    let response = raw(
        mesh.gateway,
        &post(LIST_PRODUCTS, &json, br#"{"page_size": 3}"#),
    )
    .await?;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&response.body)?;
    assert_eq!(body["products"][0]["sku"], "GW-4", "{body}");
    assert_eq!(
        body["products"][0]["price"]["amountMinor"], "1250",
        "{body}"
    );

    // GET for a side-effect-free method.
    let message = serde_json::json!({ "id": id }).to_string();
    let query: String = url_encode(&message);
    let response = raw(
        mesh.gateway,
        &bodyless(
            "GET",
            &format!("{GET_PRODUCT}?connect=v1&encoding=json&message={query}"),
            &[],
        ),
    )
    .await?;
    assert_eq!(response.status, 200, "{response:?}");
    let body: serde_json::Value = serde_json::from_slice(&response.body)?;
    assert_eq!(body["product"]["id"], id.as_str());

    // Not found: HTTP 404 and Connect's error body.
    let response = raw(
        mesh.gateway,
        &post(
            GET_PRODUCT,
            &json,
            br#"{"id": "0190b7a4-0000-7000-8000-000000000000"}"#,
        ),
    )
    .await?;
    assert_eq!(response.status, 404, "{response:?}");
    let body: serde_json::Value = serde_json::from_slice(&response.body)?;
    assert_eq!(body["code"], "not_found", "{body}");

    // Invalid arguments carry their BadRequest details.
    let response = raw(
        mesh.gateway,
        &post(GET_PRODUCT, &json, br#"{"id": "not-a-uuid"}"#),
    )
    .await?;
    assert_eq!(response.status, 400, "{response:?}");
    let body: serde_json::Value = serde_json::from_slice(&response.body)?;
    assert_eq!(body["code"], "invalid_argument", "{body}");
    let types: Vec<&str> = body["details"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["type"].as_str()).collect())
        .unwrap_or_default();
    assert!(types.contains(&"google.rpc.BadRequest"), "{body}");

    // Malformed JSON, unknown fields, a mutation by GET, a streaming
    // content type on a unary method.
    for (request, status, code) in [
        (
            post(GET_PRODUCT, &json, b"{\"id\": "),
            400,
            "invalid_argument",
        ),
        (
            post(GET_PRODUCT, &json, br#"{"nope": 1}"#),
            400,
            "invalid_argument",
        ),
        (
            bodyless(
                "GET",
                "/agora.catalog.v1.CatalogService/CreateProduct?connect=v1&encoding=json&message=%7B%7D",
                &[],
            ),
            405,
            "unimplemented",
        ),
        (
            post(
                GET_PRODUCT,
                &[("content-type", "application/connect+json")],
                &frame(0, b"{}"),
            ),
            200,
            "invalid_argument",
        ),
    ] {
        let response = raw(mesh.gateway, &request).await?;
        assert_eq!(response.status, status, "{response:?}");
        let text = String::from_utf8_lossy(&response.body);
        assert!(text.contains(code), "{text}");
    }
    // An unknown content type is HTTP 415.
    let response = raw(
        mesh.gateway,
        &post(GET_PRODUCT, &[("content-type", "text/xml")], b"<x/>"),
    )
    .await?;
    assert_eq!(response.status, 415, "{response:?}");
    mesh.stop().await
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn connect_streaming_sends_envelopes_as_they_come() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    // The gateway's own health Watch: a stream that never ends by itself.
    let mut stream = tokio::net::TcpStream::connect(mesh.gateway).await?;
    let body = frame(0, br#"{"service": "agora.catalog.v1.CatalogService"}"#);
    stream
        .write_all(&post(
            "/grpc.health.v1.Health/Watch",
            &[("content-type", "application/connect+json")],
            &body,
        ))
        .await?;
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 1024];
        loop {
            let n = stream.read(&mut buffer).await?;
            anyhow::ensure!(n > 0, "closed before the first message");
            seen.extend_from_slice(&buffer[..n]);
            if String::from_utf8_lossy(&seen).contains(r#"{"status":"SERVING"}"#) {
                return Ok(());
            }
        }
    })
    .await;
    assert!(
        matches!(found, Ok(Ok(()))),
        "{found:?}: {}",
        String::from_utf8_lossy(&seen)
    );
    let head = String::from_utf8_lossy(&seen);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/connect+json"), "{head}");
    mesh.stop().await
}

#[tokio::test]
async fn cors_preflight_allows_configured_origins_only() -> anyhow::Result<()> {
    let mesh = Mesh::start(|config| {
        config.gateway.cors_allowed_origins = vec!["http://localhost:5173".into()];
    })
    .await?;
    let preflight = |origin: &'static str| {
        bodyless(
            "OPTIONS",
            GET_PRODUCT,
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "content-type,x-grpc-web,x-user-agent,authorization",
                ),
            ],
        )
    };
    let allowed = raw(mesh.gateway, &preflight("http://localhost:5173")).await?;
    assert_eq!(allowed.status, 204, "{allowed:?}");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("http://localhost:5173")
    );
    let allowed_headers = allowed
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(allowed_headers.contains("x-grpc-web"), "{allowed:?}");
    assert!(allowed_headers.contains("authorization"), "{allowed:?}");
    let refused = raw(mesh.gateway, &preflight("http://evil.example")).await?;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.header("access-control-allow-origin"), None);

    // The actual call exposes the gRPC status headers to the page.
    let response = raw(
        mesh.gateway,
        &post(
            GET_PRODUCT,
            &[
                ("content-type", "application/grpc-web+proto"),
                ("origin", "http://localhost:5173"),
            ],
            &frame(0, &get_product("x").encode_to_vec()),
        ),
    )
    .await?;
    let exposed = response
        .header("access-control-expose-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(name), "{response:?}");
    }
    mesh.stop().await
}

#[tokio::test]
async fn health_readiness_and_metrics_endpoints() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    let healthz = raw(mesh.gateway, &bodyless("GET", "/healthz", &[])).await?;
    assert_eq!(healthz.status, 200);
    // Ready once every backend's health was heard: here users and catalog
    // serve and the others are nowhere (heard as NOT_SERVING).
    let mut ready = None;
    for _ in 0..100 {
        let response = raw(mesh.gateway, &bodyless("GET", "/readyz", &[])).await?;
        if response.status == 200 {
            ready = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = ready.expect("ready");
    let text = String::from_utf8_lossy(&ready.body);
    assert!(
        text.contains("agora.catalog.v1.CatalogService SERVING"),
        "{text}"
    );
    assert!(
        text.contains("agora.orders.v1.OrderService NOT_SERVING"),
        "{text}"
    );

    let mut client = CatalogServiceClient::new(mesh.channel().await?);
    client
        .list_products(catalog::ListProductsRequest::default())
        .await?;
    let metrics = raw(mesh.gateway, &bodyless("GET", "/metrics", &[])).await?;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|line| line.starts_with("agora_gateway_requests_total{")
                && line.contains(LIST_PRODUCTS)
                && line.contains("grpc")),
        "{text}"
    );
    assert!(
        text.contains("agora_gateway_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|line| line.starts_with("agora_gateway_backend_breakers{")
                && line.contains("service=\"catalog\"")
                && line.contains("state=\"closed\"")),
        "{text}"
    );
    // Counts, not addresses: the public port does not list the backends.
    assert!(!text.contains("127.0.0.1"), "{text}");
    mesh.stop().await
}

#[tokio::test]
async fn bad_frames_and_bodies_get_clean_errors() -> anyhow::Result<()> {
    let mesh = Mesh::start(|config| config.gateway.max_request_bytes = 1024).await?;
    let web = [("content-type", "application/grpc-web+proto")];
    let text = [("content-type", "application/grpc-web-text")];
    let mut truncated = frame(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    truncated.truncate(8);
    let mut lying = vec![0, 0, 0, 0, 100];
    lying.extend_from_slice(&[0; 10]);
    let oversized = vec![0, 0xff, 0xff, 0xff, 0xff];
    let large = frame(0, &[b'x'; 2048]);
    for (name, request, codes) in [
        (
            "truncated frame",
            post(GET_PRODUCT, &web, &truncated),
            &["3"][..],
        ),
        ("length that lies", post(GET_PRODUCT, &web, &lying), &["3"]),
        (
            "oversized prefix",
            post(GET_PRODUCT, &web, &oversized),
            &["8"],
        ),
        (
            "message over the limit",
            post(GET_PRODUCT, &web, &large),
            &["8"],
        ),
        ("invalid base64", post(GET_PRODUCT, &text, b"!!!!"), &["3"]),
        (
            "base64 not a multiple of 4",
            post(GET_PRODUCT, &text, b"AAAAA"),
            &["3"],
        ),
    ] {
        let response = raw(mesh.gateway, &request).await?;
        assert_eq!(response.status, 200, "{name}: {response:?}");
        let status = response
            .header("grpc-status")
            .map(str::to_owned)
            .or_else(|| {
                // A status after a data frame comes in the trailer frame.
                frames(&response.body).ok().and_then(|frames| {
                    frames
                        .into_iter()
                        .find(|(flags, _)| *flags == 0x80)
                        .and_then(|(_, t)| {
                            String::from_utf8_lossy(&t).lines().find_map(|l| {
                                l.strip_prefix("grpc-status:").map(|s| s.trim().to_owned())
                            })
                        })
                })
            });
        assert!(
            status.as_deref().is_some_and(|s| codes.contains(&s)),
            "{name}: {status:?} {response:?}"
        );
    }
    // Connect: a body over the limit, garbage protobuf.
    let response = raw(
        mesh.gateway,
        &post(
            GET_PRODUCT,
            &[("content-type", "application/json")],
            &[b' '; 2048],
        ),
    )
    .await?;
    assert_eq!(response.status, 429, "{response:?}");
    let response = raw(
        mesh.gateway,
        &post(
            GET_PRODUCT,
            &[("content-type", "application/proto")],
            &[0xff; 16],
        ),
    )
    .await?;
    // The backend's request limits check refuses what does not decode:
    // INVALID_ARGUMENT (a client's mistake, not the server's), HTTP 400.
    assert_eq!(response.status, 400, "garbage protobuf: {response:?}");
    // The gateway still answers after all that.
    let mut client = CatalogServiceClient::new(mesh.channel().await?);
    client
        .list_products(catalog::ListProductsRequest::default())
        .await?;
    mesh.stop().await
}

#[tokio::test]
async fn huge_headers_and_slow_clients_are_cut_off() -> anyhow::Result<()> {
    let mesh = Mesh::start(|config| {
        config.gateway.max_header_bytes = 8192;
        config.gateway.header_read_timeout_ms = 500;
    })
    .await?;
    let huge = "x".repeat(64 * 1024);
    let response = raw(
        mesh.gateway,
        &bodyless("GET", "/healthz", &[("x-huge", &huge)]),
    )
    .await?;
    assert_eq!(response.status, 431, "{response:?}");

    // Slowloris: half a request head, then nothing. The gateway hangs up.
    let mut stream = tokio::net::TcpStream::connect(mesh.gateway).await?;
    stream.write_all(b"POST /x HTTP/1.1\r\nhost: g\r\n").await?;
    let mut buffer = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(8), stream.read_to_end(&mut buffer)).await;
    assert!(closed.is_ok(), "the slow connection stayed open");

    // An HTTP/2 connection that never sends a request is closed as well.
    let mut stream = tokio::net::TcpStream::connect(mesh.gateway).await?;
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await?;
    let mut buffer = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(8), stream.read_to_end(&mut buffer)).await;
    assert!(closed.is_ok(), "the idle HTTP/2 connection stayed open");
    mesh.stop().await
}

#[tokio::test]
async fn backend_health_follows_the_backends() -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let mesh = Mesh::start(|_| {}).await?;
    mesh.wait_serving("agora.users.v1.UserService").await?;
    let mut health = HealthClient::new(mesh.channel().await?);
    let status = |service: &str| {
        let mut health = health.clone();
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        async move { health.check(request).await.map(|r| r.into_inner().status) }
    };
    assert_eq!(
        status("agora.users.v1.UserService").await?,
        ServingStatus::Serving as i32
    );
    assert_eq!(
        status("agora.payments.v1.PaymentService").await?,
        ServingStatus::NotServing as i32
    );
    // Overall: not every backend serves.
    assert_eq!(status("").await?, ServingStatus::NotServing as i32);
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
    // The backends stop: the gateway hears it.
    let Mesh {
        env: _env,
        backends,
        gateway,
        stop,
        task,
    } = mesh;
    backends.stop().await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{gateway}"))?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    let mut last = None;
    for _ in 0..100 {
        last = Some(
            health
                .check(HealthCheckRequest {
                    service: "agora.catalog.v1.CatalogService".into(),
                })
                .await?
                .into_inner()
                .status,
        );
        if last == Some(ServingStatus::NotServing as i32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, Some(ServingStatus::NotServing as i32));
    stop.cancel();
    task.await??;
    Ok(())
}

#[tokio::test]
async fn with_a_certificate_the_port_speaks_tls_with_http2_by_alpn() -> anyhow::Result<()> {
    use tokio_rustls::rustls;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let dir = tempfile::tempdir()?;
    let cert_file = dir.path().join("gateway.crt");
    let key_file = dir.path().join("gateway.key");
    std::fs::write(&cert_file, certified.cert.pem())?;
    std::fs::write(&key_file, certified.signing_key.serialize_pem())?;
    let mesh = Mesh::start_tls(|config| {
        config.gateway.tls_cert_file = Some(cert_file.clone());
        config.gateway.tls_key_file = Some(key_file.clone());
    })
    .await?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let connect = |alpn: &[&[u8]]| -> anyhow::Result<tokio_rustls::TlsConnector> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            config,
        )))
    };
    let name = rustls::pki_types::ServerName::try_from("localhost")?;

    // HTTP/1.1 over TLS.
    let tcp = tokio::net::TcpStream::connect(mesh.gateway).await?;
    let mut tls = connect(&[b"http/1.1"])?.connect(name.clone(), tcp).await?;
    tls.write_all(&bodyless("GET", "/healthz", &[])).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A client offering h2 gets it.
    let tcp = tokio::net::TcpStream::connect(mesh.gateway).await?;
    let tls = connect(&[b"h2", b"http/1.1"])?.connect(name, tcp).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Cleartext is not served on a TLS port.
    let cleartext = raw(mesh.gateway, &bodyless("GET", "/healthz", &[])).await;
    assert!(
        cleartext.is_err() || cleartext.as_ref().is_ok_and(|r| r.status != 200),
        "{cleartext:?}"
    );
    mesh.stop().await
}

#[tokio::test]
async fn a_refused_http1_call_reads_the_body_and_keeps_the_connection() -> anyhow::Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    let mut stream = tokio::net::TcpStream::connect(mesh.gateway).await?;
    // The head first, the body later, as connect-node writes them: the
    // refusal (UNAUTHENTICATED: no token) must not cut the connection.
    let head = "POST /agora.orders.v1.OrderService/ListOrders HTTP/1.1\r\nhost: g\r\n\
                content-type: application/json\r\ncontent-length: 2\r\n\r\n";
    stream.write_all(head.as_bytes()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.write_all(b"{}").await?;
    // Then a second call on the same connection.
    stream.write_all(&bodyless("GET", "/healthz", &[])).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("\"code\":\"unauthenticated\""), "{answer}");
    assert!(answer.contains("HTTP/1.1 200 OK"), "second call: {answer}");
    mesh.stop().await
}

#[tokio::test]
async fn slow_bodies_and_long_streams_end_at_their_deadline() -> anyhow::Result<()> {
    let mesh = Mesh::start(|config| {
        config.gateway.header_read_timeout_ms = 300;
    })
    .await?;
    // A Connect body trickled slower than the read timeout.
    let mut stream = tokio::net::TcpStream::connect(mesh.gateway).await?;
    let head = "POST /agora.catalog.v1.CatalogService/ListProducts HTTP/1.1\r\nhost: g\r\n\
                connection: close\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{";
    stream.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("deadline_exceeded"), "{answer}");

    // A server stream asked to last 1 s ends then, with DEADLINE_EXCEEDED in
    // its end-of-stream envelope.
    let started = std::time::Instant::now();
    let response = raw(
        mesh.gateway,
        &post(
            "/grpc.health.v1.Health/Watch",
            &[
                ("content-type", "application/connect+json"),
                ("connect-timeout-ms", "1000"),
            ],
            &frame(0, br#"{"service": ""}"#),
        ),
    )
    .await?;
    assert!(started.elapsed() < Duration::from_secs(8));
    let envelopes = frames(&response.body)?;
    let (flags, end) = envelopes.last().cloned().unwrap_or_default();
    assert_eq!(flags, 0x02, "{envelopes:?}");
    let end: serde_json::Value = serde_json::from_slice(&end)?;
    assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");
    mesh.stop().await
}

#[tokio::test]
async fn a_saturated_gateway_sheds_calls_while_health_answers() -> anyhow::Result<()> {
    let mesh = Mesh::start(|config| {
        config.gateway.max_in_flight = 2;
        config.gateway.header_read_timeout_ms = 5_000;
    })
    .await?;
    // Two Connect calls whose bodies never finish hold both slots.
    let head = "POST /agora.catalog.v1.CatalogService/ListProducts HTTP/1.1\r\nhost: g\r\n\
                connection: close\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{";
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(mesh.gateway).await?;
        stream.write_all(head.as_bytes()).await?;
        holders.push(stream);
    }
    // The slots are taken once the gateway has read the heads: poll until a
    // third call is shed (bounded), rather than guess how long that takes.
    let shed = async {
        loop {
            let response = raw(
                mesh.gateway,
                &post(
                    LIST_PRODUCTS,
                    &[("content-type", "application/json")],
                    b"{}",
                ),
            )
            .await?;
            if response.status != 200 {
                return anyhow::Ok(response);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let response = tokio::time::timeout(Duration::from_secs(4), shed).await??;
    assert_eq!(response.status, 429, "{response:?}");
    let body: serde_json::Value = serde_json::from_slice(&response.body)?;
    assert_eq!(body["code"], "resource_exhausted", "{body}");
    let info = body["details"]
        .as_array()
        .and_then(|details| {
            details
                .iter()
                .find(|detail| detail["type"] == "google.rpc.ErrorInfo")
        })
        .and_then(|detail| detail["value"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no ErrorInfo in {body}"))?;
    let info = base64::engine::general_purpose::STANDARD_NO_PAD.decode(info)?;
    assert!(
        String::from_utf8_lossy(&info).contains("OVERLOADED"),
        "{body}"
    );
    // Native gRPC gets the same refusal, with RetryInfo; probes still answer.
    use tonic_types::StatusExt as _;
    let mut catalog = CatalogServiceClient::new(mesh.channel().await?);
    let status = catalog
        .list_products(catalog::ListProductsRequest::default())
        .await
        .expect_err("shed");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.get_details_retry_info().is_some(), "{status:?}");
    let healthz = raw(mesh.gateway, &bodyless("GET", "/healthz", &[])).await?;
    assert_eq!(healthz.status, 200);
    // The slots come back when the held calls end.
    drop(holders);
    let recovered = async {
        loop {
            if catalog
                .list_products(catalog::ListProductsRequest::default())
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(8), recovered).await?;
    mesh.stop().await
}

#[tokio::test]
async fn behind_a_proxy_the_client_is_the_address_it_appended() -> anyhow::Result<()> {
    let mesh = Mesh::start(|config| {
        config.gateway.trust_forwarded_for = true;
        config.gateway.rate_limit_per_sec = 1;
        config.gateway.rate_limit_burst = 1;
    })
    .await?;
    let call = |forwarded: &str| {
        post(
            LIST_PRODUCTS,
            &[
                ("content-type", "application/json"),
                ("x-forwarded-for", forwarded),
            ],
            b"{}",
        )
    };
    // The proxy appended 203.0.113.7; what comes before it is the client's
    // to forge, and changing it buys no new bucket.
    let first = raw(mesh.gateway, &call("198.51.100.1, 203.0.113.7")).await?;
    assert_eq!(first.status, 200, "{first:?}");
    let forged = raw(mesh.gateway, &call("198.51.100.2, 203.0.113.7")).await?;
    assert_eq!(forged.status, 429, "{forged:?}");
    // Another client behind the proxy has a bucket of its own.
    let other = raw(mesh.gateway, &call("203.0.113.8")).await?;
    assert_eq!(other.status, 200, "{other:?}");
    mesh.stop().await
}
