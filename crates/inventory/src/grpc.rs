//! `agora.inventory.v1.InventoryService` over an [`InventoryStore`]:
//! validates requests, decides who may do what, and maps stock levels and
//! reservations to protobuf.
//!
//! Who may call what: SetStock is for admins, GetStock for anyone (no token
//! needed, and a token is not even looked at), and the reservation calls are
//! internal to the mesh (a service token only: the orders service's checkout
//! saga). Authorization is checked before the input, so a caller that may not
//! make a call learns nothing about what it would have accepted.

use std::sync::Arc;

use agora_platform::auth::{Caller, TokenVerifier};
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::time::micros_to_timestamp;
use agora_proto::inventory::v1 as pb;
use agora_proto::inventory::v1::inventory_service_server::InventoryService;
use tonic::{Request, Response, Status};

use crate::domain::{
    MAX_RESERVATION_ITEMS, ProductId, Reservation, ReservationId, ReservationItems,
    ReservationStatus, StockLevel, parse_item_quantity, parse_stock_quantity,
};
use crate::store::InventoryStore;

/// The services that may reserve, commit and release stock: the checkout
/// saga runs in orders, and nothing else needs to.
const RESERVATION_CALLERS: &[&str] = &["orders"];

/// The gRPC service.
pub struct InventoryApi<S> {
    store: Arc<S>,
    verifier: TokenVerifier,
}

impl<S: InventoryStore> InventoryApi<S> {
    /// The service over `store`, checking callers with `verifier`.
    pub fn new(store: S, verifier: TokenVerifier) -> Self {
        Self {
            store: Arc::new(store),
            verifier,
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        self.verifier.caller_of(request)
    }
}

#[tonic::async_trait]
impl<S: InventoryStore> InventoryService for InventoryApi<S> {
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        self.caller(&request)?.require_admin()?;
        let req = request.into_inner();
        let mut violations = Violations::default();
        let product_id = violations.check("product_id", ProductId::parse(&req.product_id));
        let quantity = violations.check("quantity", parse_stock_quantity(req.quantity));
        violations.finish()?;
        let (Some(product_id), Some(quantity)) = (product_id, quantity) else {
            return Err(validated_without_values().into());
        };
        let stock = self.store.set_stock(&product_id, quantity).await?;
        tracing::info!(product_id = %product_id, available = quantity, "stock set");
        Ok(Response::new(pb::SetStockResponse {
            stock: Some(stock_to_proto(&stock)),
        }))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let product_id = ProductId::parse(&request.get_ref().product_id)
            .map_err(|reason| Error::invalid_field("product_id", reason))?;
        let stock = self
            .store
            .get_stock(&product_id)
            .await?
            .ok_or_else(|| Error::not_found(format_args!("stock of product {product_id}")))?;
        Ok(Response::new(pb::GetStockResponse {
            stock: Some(stock_to_proto(&stock)),
        }))
    }

    async fn reserve_stock(
        &self,
        request: Request<pb::ReserveStockRequest>,
    ) -> Result<Response<pb::ReserveStockResponse>, Status> {
        self.caller(&request)?
            .require_service_from(RESERVATION_CALLERS)?;
        let req = request.into_inner();
        let (id, items) = parse_reserve_request(&req)?;
        let reservation = self.store.reserve(&id, &items).await?;
        Ok(Response::new(pb::ReserveStockResponse {
            reservation: Some(reservation_to_proto(&reservation)),
        }))
    }

    async fn release_reservation(
        &self,
        request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        self.caller(&request)?
            .require_service_from(RESERVATION_CALLERS)?;
        let id = parse_reservation_id(&request.get_ref().reservation_id)?;
        self.store.release(&id).await?;
        Ok(Response::new(pb::ReleaseReservationResponse {}))
    }

    async fn commit_reservation(
        &self,
        request: Request<pb::CommitReservationRequest>,
    ) -> Result<Response<pb::CommitReservationResponse>, Status> {
        self.caller(&request)?
            .require_service_from(RESERVATION_CALLERS)?;
        let id = parse_reservation_id(&request.get_ref().reservation_id)?;
        self.store.commit(&id).await?;
        Ok(Response::new(pb::CommitReservationResponse {}))
    }
}

/// Validates a ReserveStock request, naming every bad field, and merges its
/// items into their normalized form.
fn parse_reserve_request(
    req: &pb::ReserveStockRequest,
) -> Result<(ReservationId, ReservationItems)> {
    let mut violations = Violations::default();
    let id = violations.check("reservation_id", ReservationId::parse(&req.reservation_id));
    let mut items = Vec::with_capacity(req.items.len().min(MAX_RESERVATION_ITEMS));
    if req.items.is_empty() {
        violations.add("items", "must not be empty");
    } else if req.items.len() > MAX_RESERVATION_ITEMS {
        // Not looked at one by one: an oversized request gets one short answer.
        violations.add("items", "must have at most 100 items");
    } else {
        for (index, item) in req.items.iter().enumerate() {
            let product_id = violations.check(
                &format!("items[{index}].product_id"),
                ProductId::parse(&item.product_id),
            );
            let quantity = violations.check(
                &format!("items[{index}].quantity"),
                parse_item_quantity(item.quantity),
            );
            if let (Some(product_id), Some(quantity)) = (product_id, quantity) {
                items.push((product_id, quantity));
            }
        }
    }
    violations.finish()?;
    let id = id.ok_or_else(validated_without_values)?;
    let items =
        ReservationItems::merge(items).map_err(|reason| Error::invalid_field("items", reason))?;
    Ok((id, items))
}

fn parse_reservation_id(raw: &str) -> Result<ReservationId> {
    ReservationId::parse(raw).map_err(|reason| Error::invalid_field("reservation_id", reason))
}

fn validated_without_values() -> Error {
    Error::new(ErrorKind::Internal, "validation passed without values")
}

/// The protobuf view of a stock level.
pub fn stock_to_proto(stock: &StockLevel) -> pb::StockLevel {
    pb::StockLevel {
        product_id: stock.product_id.as_str().to_owned(),
        available: stock.available,
        reserved: stock.reserved,
    }
}

fn status_to_proto(status: ReservationStatus) -> pb::ReservationStatus {
    match status {
        ReservationStatus::Reserved => pb::ReservationStatus::Reserved,
        ReservationStatus::Committed => pb::ReservationStatus::Committed,
        // The contract knows one way units go back: expiry is a release.
        ReservationStatus::Released | ReservationStatus::Expired => pb::ReservationStatus::Released,
    }
}

/// The protobuf view of a reservation, items in product id order.
pub fn reservation_to_proto(reservation: &Reservation) -> pb::Reservation {
    pb::Reservation {
        reservation_id: reservation.id.as_str().to_owned(),
        items: reservation
            .items
            .iter()
            .map(|(product_id, quantity)| pb::ReservationItem {
                product_id: product_id.as_str().to_owned(),
                quantity,
            })
            .collect(),
        status: status_to_proto(reservation.status) as i32,
        created_at: Some(micros_to_timestamp(reservation.created_at)),
        updated_at: Some(micros_to_timestamp(reservation.updated_at)),
    }
}
