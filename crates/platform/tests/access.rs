//! The access level each RPC declares in the contract, enforced by the
//! server before any handler runs, over real gRPC on loopback: one server
//! hosting three services (monolith mode), each with its own verifier.
//!
//! The doubles answer with the caller their handler saw through
//! `TokenVerifier::caller_of`, using a verifier that trusts no key at all:
//! a caller only reaches them as the one the server verified.

use std::net::SocketAddr;

use agora_platform::auth::{
    Caller, ServiceTokenSigner, TokenIssuer, TokenVerifier, generate_keypair_pem,
};
use agora_platform::server::{HostedService, Server};
use agora_platform::shutdown::CancellationToken;
use agora_proto::catalog::v1 as catalog_pb;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::catalog::v1::catalog_service_server::{CatalogService, CatalogServiceServer};
use agora_proto::inventory::v1 as pb;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_proto::inventory::v1::inventory_service_server::{
    InventoryService, InventoryServiceServer,
};
use agora_proto::notifications::v1 as notifications_pb;
use agora_proto::notifications::v1::notification_service_client::NotificationServiceClient;
use agora_proto::notifications::v1::notification_service_server::{
    NotificationService, NotificationServiceServer,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const ISSUER: &str = "agora";

/// How a double names the caller its handler saw.
fn describe(caller: &Caller) -> String {
    match caller {
        Caller::Anonymous => "anonymous".to_owned(),
        Caller::User { id, .. } => format!("user:{id}"),
        Caller::Service { name } => format!("service:{name}"),
    }
}

/// Answers every call, naming its caller: in `product_id` or
/// `reservation_id`.
struct Inventory {
    /// Trusts no key: only the server's verified caller gets through.
    blind: TokenVerifier,
}

impl Inventory {
    fn seen<T>(&self, request: &Request<T>) -> Result<String, Status> {
        Ok(describe(&self.blind.caller_of(request)?))
    }
}

#[tonic::async_trait]
impl InventoryService for Inventory {
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        Ok(Response::new(pb::SetStockResponse {
            stock: Some(pb::StockLevel {
                product_id: self.seen(&request)?,
                ..Default::default()
            }),
        }))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        Ok(Response::new(pb::GetStockResponse {
            stock: Some(pb::StockLevel {
                product_id: request.into_inner().product_id,
                ..Default::default()
            }),
        }))
    }

    async fn reserve_stock(
        &self,
        request: Request<pb::ReserveStockRequest>,
    ) -> Result<Response<pb::ReserveStockResponse>, Status> {
        Ok(Response::new(pb::ReserveStockResponse {
            reservation: Some(pb::Reservation {
                reservation_id: self.seen(&request)?,
                ..Default::default()
            }),
        }))
    }

    async fn release_reservation(
        &self,
        _request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        Ok(Response::new(pb::ReleaseReservationResponse {}))
    }

    async fn commit_reservation(
        &self,
        _request: Request<pb::CommitReservationRequest>,
    ) -> Result<Response<pb::CommitReservationResponse>, Status> {
        Ok(Response::new(pb::CommitReservationResponse {}))
    }
}

/// `ListNotifications` (user level) names its caller in the page token.
struct Notifications {
    blind: TokenVerifier,
}

#[tonic::async_trait]
impl NotificationService for Notifications {
    async fn list_notifications(
        &self,
        request: Request<notifications_pb::ListNotificationsRequest>,
    ) -> Result<Response<notifications_pb::ListNotificationsResponse>, Status> {
        Ok(Response::new(notifications_pb::ListNotificationsResponse {
            notifications: Vec::new(),
            next_page_token: describe(&self.blind.caller_of(&request)?),
        }))
    }
}

/// A catalog hosted without a token verifier: only its public RPCs can be
/// served.
struct Catalog;

#[tonic::async_trait]
impl CatalogService for Catalog {
    async fn create_product(
        &self,
        _request: Request<catalog_pb::CreateProductRequest>,
    ) -> Result<Response<catalog_pb::CreateProductResponse>, Status> {
        Ok(Response::new(catalog_pb::CreateProductResponse::default()))
    }

    async fn get_product(
        &self,
        _request: Request<catalog_pb::GetProductRequest>,
    ) -> Result<Response<catalog_pb::GetProductResponse>, Status> {
        Ok(Response::new(catalog_pb::GetProductResponse::default()))
    }

    async fn list_products(
        &self,
        _request: Request<catalog_pb::ListProductsRequest>,
    ) -> Result<Response<catalog_pb::ListProductsResponse>, Status> {
        Ok(Response::new(catalog_pb::ListProductsResponse::default()))
    }

    async fn update_product(
        &self,
        _request: Request<catalog_pb::UpdateProductRequest>,
    ) -> Result<Response<catalog_pb::UpdateProductResponse>, Status> {
        Ok(Response::new(catalog_pb::UpdateProductResponse::default()))
    }
}

/// The server, and tokens of every kind of caller.
struct Mesh {
    channel: Channel,
    stop: CancellationToken,
    user: String,
    admin: String,
    /// orders is the one service listed for the reservation RPCs.
    orders: ServiceTokenSigner,
    catalog: ServiceTokenSigner,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> anyhow::Result<Mesh> {
    let (user_private, user_public) = generate_keypair_pem()?;
    let (orders_private, orders_public) = generate_keypair_pem()?;
    let (catalog_private, catalog_public) = generate_keypair_pem()?;
    let verifier = |service: &str| -> anyhow::Result<TokenVerifier> {
        Ok(
            TokenVerifier::from_pem(user_public.as_bytes(), ISSUER, service)?
                .with_service_key("orders", orders_public.as_bytes())?
                .with_service_key("catalog", catalog_public.as_bytes())?,
        )
    };
    let (_, stranger_public) = generate_keypair_pem()?;
    let blind = TokenVerifier::from_pem(stranger_public.as_bytes(), ISSUER, "nobody")?;

    let app = Server::new()
        .host(
            HostedService::new(
                pb::SERVICE_NAME,
                InventoryServiceServer::new(Inventory {
                    blind: blind.clone(),
                }),
            )
            .with_token_verifier(verifier("inventory")?),
        )
        .host(
            HostedService::new(
                notifications_pb::SERVICE_NAME,
                NotificationServiceServer::new(Notifications { blind }),
            )
            .with_token_verifier(verifier("notifications")?),
        )
        .host(HostedService::new(
            catalog_pb::SERVICE_NAME,
            CatalogServiceServer::new(Catalog),
        ))
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));

    let issuer = TokenIssuer::from_pem(user_private.expose().as_bytes(), ISSUER, 60)?;
    let signer = |private: &agora_platform::config::Secret<String>, service: &str| {
        ServiceTokenSigner::from_pem(private.expose().as_bytes(), ISSUER, service, 60)
    };
    Ok(Mesh {
        channel: Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy(),
        stop,
        user: issuer
            .issue_user_token("ada", "ada@example.com", &[])?
            .token,
        admin: issuer
            .issue_user_token("root", "root@example.com", &["admin".to_owned()])?
            .token,
        orders: signer(&orders_private, "orders")?,
        catalog: signer(&catalog_private, "catalog")?,
    })
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("ascii token");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The caller the handler saw, or the refusal's code and message.
type Outcome = Result<String, (Code, String)>;

fn refused(status: &Status) -> (Code, String) {
    (status.code(), status.message().to_owned())
}

async fn set_stock(mesh: &Mesh, token: Option<&str>) -> Outcome {
    InventoryServiceClient::new(mesh.channel.clone())
        .set_stock(with_token(pb::SetStockRequest::default(), token))
        .await
        .map(|r| r.into_inner().stock.unwrap_or_default().product_id)
        .map_err(|s| refused(&s))
}

async fn reserve(mesh: &Mesh, token: Option<&str>) -> Outcome {
    InventoryServiceClient::new(mesh.channel.clone())
        .reserve_stock(with_token(pb::ReserveStockRequest::default(), token))
        .await
        .map(|r| {
            r.into_inner()
                .reservation
                .unwrap_or_default()
                .reservation_id
        })
        .map_err(|s| refused(&s))
}

async fn list_notifications(mesh: &Mesh, token: Option<&str>) -> Outcome {
    NotificationServiceClient::new(mesh.channel.clone())
        .list_notifications(with_token(
            notifications_pb::ListNotificationsRequest::default(),
            token,
        ))
        .await
        .map(|r| r.into_inner().next_page_token)
        .map_err(|s| refused(&s))
}

fn code(outcome: &Outcome) -> Option<Code> {
    outcome.as_ref().err().map(|(code, _)| *code)
}

const NO_TOKEN: &str = "this call needs an access token (authorization: Bearer <token>)";

#[tokio::test]
async fn public_rpcs_take_anyone_and_ignore_tokens() -> anyhow::Result<()> {
    let mesh = start().await?;
    let mut client = InventoryServiceClient::new(mesh.channel.clone());
    for token in [None, Some("not-a-jwt"), Some(mesh.user.as_str())] {
        let stock = client
            .get_stock(with_token(
                pb::GetStockRequest {
                    product_id: "p1".into(),
                },
                token,
            ))
            .await?
            .into_inner();
        assert_eq!(stock.stock.unwrap_or_default().product_id, "p1");
    }
    // Paths outside the contract pass untouched.
    let health = HealthClient::new(mesh.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
    Ok(())
}

#[tokio::test]
async fn user_rpcs_take_users_and_admins_not_services() -> anyhow::Result<()> {
    let mesh = start().await?;
    assert_eq!(
        list_notifications(&mesh, Some(&mesh.user)).await,
        Ok("user:ada".to_owned())
    );
    assert_eq!(
        list_notifications(&mesh, Some(&mesh.admin)).await,
        Ok("user:root".to_owned())
    );
    assert_eq!(
        list_notifications(&mesh, None).await,
        Err((Code::Unauthenticated, NO_TOKEN.to_owned()))
    );
    // ListNotifications lists no service.
    let orders = mesh.orders.token_for("notifications")?;
    assert_eq!(
        list_notifications(&mesh, Some(&orders)).await,
        Err((
            Code::PermissionDenied,
            "orders may not call this; allowed: no service".to_owned()
        ))
    );
    // A forged token is refused before the handler, whatever the level.
    assert_eq!(
        code(&list_notifications(&mesh, Some("eyJhbGciOiJFZERTQSJ9.e30.AAAA")).await),
        Some(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test]
async fn admin_rpcs_take_admins_only() -> anyhow::Result<()> {
    let mesh = start().await?;
    assert_eq!(
        set_stock(&mesh, Some(&mesh.admin)).await,
        Ok("user:root".to_owned())
    );
    assert_eq!(
        set_stock(&mesh, Some(&mesh.user)).await,
        Err((Code::PermissionDenied, "admin role required".to_owned()))
    );
    assert_eq!(
        code(&set_stock(&mesh, None).await),
        Some(Code::Unauthenticated)
    );
    // SetStock lists no service, not even orders.
    let orders = mesh.orders.token_for("inventory")?;
    assert_eq!(
        code(&set_stock(&mesh, Some(&orders)).await),
        Some(Code::PermissionDenied)
    );
    Ok(())
}

#[tokio::test]
async fn service_rpcs_take_the_listed_services_only() -> anyhow::Result<()> {
    let mesh = start().await?;
    let orders = mesh.orders.token_for("inventory")?;
    assert_eq!(
        reserve(&mesh, Some(&orders)).await,
        Ok("service:orders".to_owned())
    );
    let catalog = mesh.catalog.token_for("inventory")?;
    assert_eq!(
        reserve(&mesh, Some(&catalog)).await,
        Err((
            Code::PermissionDenied,
            "catalog may not call this; allowed: orders".to_owned()
        ))
    );
    for user in [&mesh.user, &mesh.admin] {
        assert_eq!(
            reserve(&mesh, Some(user)).await,
            Err((
                Code::PermissionDenied,
                "this call is internal to Agora services; allowed: orders".to_owned()
            ))
        );
    }
    assert_eq!(
        reserve(&mesh, None).await,
        Err((Code::Unauthenticated, NO_TOKEN.to_owned()))
    );
    // Each hosted service verifies with its own audience: an orders token
    // for notifications is no good for inventory, on the same server.
    let elsewhere = mesh.orders.token_for("notifications")?;
    let outcome = reserve(&mesh, Some(&elsewhere)).await;
    assert_eq!(code(&outcome), Some(Code::Unauthenticated), "{outcome:?}");
    Ok(())
}

#[tokio::test]
async fn a_service_hosted_without_verifier_serves_only_its_public_rpcs() -> anyhow::Result<()> {
    let mesh = start().await?;
    let mut client = CatalogServiceClient::new(mesh.channel.clone());
    client
        .get_product(with_token(catalog_pb::GetProductRequest::default(), None))
        .await?;
    for token in [None, Some(mesh.admin.as_str())] {
        let status = client
            .create_product(with_token(
                catalog_pb::CreateProductRequest::default(),
                token,
            ))
            .await
            .expect_err("no verifier, no protected call");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    Ok(())
}
