//! `agora.orders.v1.OrderService` over an [`OrderStore`]: decides who may see
//! which order, validates requests, streams order changes and maps orders to
//! protobuf. Placing and cancelling orders go to the [`Checkout`] saga.

use std::pin::Pin;
use std::sync::Arc;

use agora_platform::auth::{Caller, TokenVerifier};
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::pagination::{Cursor, page_size};
use agora_platform::time::micros_to_timestamp;
use agora_proto::orders::v1 as pb;
use agora_proto::orders::v1::order_service_server::OrderService;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::checkout::{Checkout, PlaceOrder};
use crate::domain::{Order, OrderItem, OrderStatus, parse_order_id};
use crate::store::OrderStore;
use crate::watch::{WatchHub, WatchLimits};
use agora_platform::config::WatchConfig;
use tokio_util::sync::CancellationToken;

/// The gRPC service.
pub struct OrderApi<S> {
    store: Arc<S>,
    /// Runs PlaceOrder and CancelOrder.
    checkout: Checkout,
    verifier: TokenVerifier,
    /// Open `WatchOrder` streams: their caps and the one shared re-read.
    watches: WatchHub<S>,
    /// Cancelled when the server starts shutting down: open watches end.
    drain: CancellationToken,
}

impl<S: OrderStore> OrderApi<S> {
    /// The service over `store`, checking callers with `verifier`, with the
    /// default `watch.*` limits. Watches follow the store's notifier, so
    /// writes through any clone of `store` reach them at once.
    pub fn new(store: S, checkout: Checkout, verifier: TokenVerifier) -> Self {
        let store = Arc::new(store);
        Self {
            watches: WatchHub::new(Arc::clone(&store), WatchLimits::default()),
            store,
            checkout,
            verifier,
            drain: CancellationToken::new(),
        }
    }

    /// Caps, lifetime and poll interval of `WatchOrder` streams from
    /// `config` (call before serving: it starts a new, empty hub).
    pub fn with_watch_config(mut self, config: &WatchConfig) -> Self {
        self.watches = WatchHub::new(Arc::clone(&self.store), WatchLimits::from_config(config));
        self
    }

    /// The hub of this service's `WatchOrder` streams (a handle on the same
    /// one), to observe it.
    pub fn watches(&self) -> WatchHub<S> {
        self.watches.clone()
    }

    /// Ends every open watch with UNAVAILABLE once `drain` is cancelled (pass
    /// the token also to `HostedService::with_drain_signal`).
    pub fn with_drain_signal(mut self, drain: CancellationToken) -> Self {
        self.drain = drain;
        self
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        self.verifier.caller_of(request)
    }
}

/// The user id of a user caller. Orders belong to users: anonymous callers
/// are UNAUTHENTICATED, service tokens PERMISSION_DENIED (decided before any
/// lookup, so it says nothing about any order).
fn require_user(caller: &Caller) -> Result<&str> {
    caller.require_authenticated()?;
    caller.user_id().ok_or_else(|| {
        Error::new(
            ErrorKind::PermissionDenied,
            "orders are read by the users who placed them, not by services",
        )
    })
}

fn parse_id(raw: &str) -> Result<String> {
    parse_order_id(raw).map_err(|reason| Error::invalid_field("id", reason))
}

fn not_found(id: &str) -> Error {
    Error::not_found(format_args!("order {id}"))
}

/// The response stream of `WatchOrder`.
pub type WatchOrderStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchOrderResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<S: OrderStore> OrderService for OrderApi<S> {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let caller = self.caller(&request)?;
        let user_id = require_user(&caller)?;
        let command = PlaceOrder::parse(request.into_inner())?;
        let order = self.checkout.place(user_id, command).await?;
        Ok(Response::new(pb::PlaceOrderResponse {
            order: Some(to_proto(&order)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let caller = self.caller(&request)?;
        require_user(&caller)?;
        let id = parse_id(&request.get_ref().id)?;
        let order = self
            .store
            .get(&id)
            .await?
            .filter(|order| caller.is_user(&order.user_id) || caller.is_admin())
            .ok_or_else(|| not_found(&id))?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(to_proto(&order)),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let caller = self.caller(&request)?;
        let user_id = require_user(&caller)?;
        let req = request.get_ref();
        let mut violations = Violations::default();
        let size = violations.absorb("page_size", page_size(req.page_size));
        let cursor = violations.absorb("page_token", Cursor::decode(&req.page_token));
        violations.finish()?;
        let (Some(size), Some(cursor)) = (size, cursor) else {
            return Err(Error::new(ErrorKind::Internal, "validation passed without values").into());
        };
        let page = self
            .store
            .list_for_user(user_id, cursor.as_ref(), size)
            .await?;
        Ok(Response::new(pb::ListOrdersResponse {
            orders: page.orders.iter().map(to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let caller = self.caller(&request)?;
        require_user(&caller)?;
        let id = parse_id(&request.get_ref().id)?;
        let order = self.checkout.cancel(&caller, &id).await?;
        Ok(Response::new(pb::CancelOrderResponse {
            order: Some(to_proto(&order)),
        }))
    }

    type WatchOrderStream = WatchOrderStream;

    async fn watch_order(
        &self,
        request: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let caller = self.caller(&request)?;
        let user_id = require_user(&caller)?;
        let id = parse_id(&request.get_ref().id)?;
        // The caps are checked first, before any database work. Following
        // the order before reading it means a change right after the read is
        // seen; the slot comes back with `following` on every early return.
        let following = self.watches.follow(user_id, &id)?;
        // Owner only: an admin watching someone else's order gets NOT_FOUND too.
        let order = self
            .store
            .get(&id)
            .await?
            .filter(|order| caller.is_user(&order.user_id))
            .ok_or_else(|| not_found(&id))?;
        following.offer(order);
        let states = following.into_stream(self.drain.clone());
        let responses = states.map(|state| {
            state
                .map(|order| pb::WatchOrderResponse {
                    order: Some(to_proto(&order)),
                })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

fn status_to_proto(status: OrderStatus) -> pb::OrderStatus {
    match status {
        OrderStatus::Pending => pb::OrderStatus::Pending,
        OrderStatus::Completed => pb::OrderStatus::Completed,
        OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
        OrderStatus::Failed => pb::OrderStatus::Failed,
    }
}

/// The protobuf view of an order; the client's request id stays internal.
pub fn to_proto(order: &Order) -> pb::Order {
    pb::Order {
        id: order.id.clone(),
        user_id: order.user_id.clone(),
        items: order.items.iter().map(OrderItem::to_proto).collect(),
        total: Some(order.total.to_proto()),
        status: status_to_proto(order.status) as i32,
        failure_reason: order.failure_reason.clone(),
        failure_code: order.failure_code.clone(),
        created_at: Some(micros_to_timestamp(order.created_at)),
        updated_at: Some(micros_to_timestamp(order.updated_at)),
    }
}
