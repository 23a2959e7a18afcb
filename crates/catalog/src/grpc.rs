//! `agora.catalog.v1.CatalogService` over a [`CatalogStore`]: validates
//! requests (naming every bad field), decides who may do what, and maps
//! products to protobuf.
//!
//! Reads are public and ignore any token they carry, so that an expired token
//! in a browser never breaks browsing; writes need an admin token.

use std::sync::Arc;

use agora_platform::auth::{Caller, TokenVerifier};
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::money::Money;
use agora_platform::pagination::{Cursor, next_page, page_size};
use agora_platform::time::micros_to_timestamp;
use agora_proto::catalog::v1 as pb;
use agora_proto::catalog::v1::catalog_service_server::CatalogService;
use tonic::{Request, Response, Status};

use crate::domain::{
    Categories, CategoriesError, Category, Description, NewProduct, Product, ProductChanges,
    ProductName, SearchQuery, Sku,
};
use crate::store::{CatalogStore, ProductFilter};

/// The gRPC service.
pub struct CatalogApi<S> {
    store: Arc<S>,
    verifier: TokenVerifier,
}

impl<S: CatalogStore> CatalogApi<S> {
    /// The service over `store`, checking callers of admin RPCs with `verifier`.
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
impl<S: CatalogStore> CatalogService for CatalogApi<S> {
    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::CreateProductResponse>, Status> {
        // Authorization first: an anonymous caller learns nothing about the
        // validation rules of an RPC it may not use.
        self.caller(&request)?.require_admin()?;
        let new = parse_new_product(request.get_ref())?;
        let product = self.store.create(new).await?;
        tracing::info!(product_id = %product.id, sku = %product.sku, "product created");
        Ok(Response::new(pb::CreateProductResponse {
            product: Some(to_proto(&product)),
        }))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::GetProductResponse>, Status> {
        let id = parse_product_id(&request.get_ref().id)
            .map_err(|reason| Error::invalid_field("id", reason))?;
        let product = self
            .store
            .get(&id)
            .await?
            .ok_or_else(|| Error::not_found(format_args!("product {id}")))?;
        Ok(Response::new(pb::GetProductResponse {
            product: Some(to_proto(&product)),
        }))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let req = request.into_inner();
        let mut violations = Violations::default();
        let size = violations.absorb("page_size", page_size(req.page_size));
        let after = violations.absorb("page_token", Cursor::decode(&req.page_token));
        let query = violations.check("query", SearchQuery::parse(&req.query));
        let category = if req.category.is_empty() {
            Some(None)
        } else {
            violations
                .check("category", Category::parse(&req.category))
                .map(Some)
        };
        violations.finish()?;
        let (Some(size), Some(after), Some(query), Some(category)) = (size, after, query, category)
        else {
            return Err(validated_without_values().into());
        };
        let filter = ProductFilter { query, category };
        // One row more than the page tells whether another page follows.
        let rows = self
            .store
            .list(&filter, after.as_ref(), size.saturating_add(1))
            .await?;
        let (products, next_page_token) = next_page(rows, size, |product| Cursor {
            key: product.created_at,
            id: product.id.clone(),
        });
        Ok(Response::new(pb::ListProductsResponse {
            products: products.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_product(
        &self,
        request: Request<pb::UpdateProductRequest>,
    ) -> Result<Response<pb::UpdateProductResponse>, Status> {
        self.caller(&request)?.require_admin()?;
        let (id, changes) = parse_update(request.get_ref())?;
        let updated = self.store.update(&id, &changes).await?;
        if let Some(change) = &updated.price_change {
            tracing::info!(
                product_id = %id,
                old_currency = %change.old.currency_code,
                old_amount_minor = change.old.amount_minor,
                new_currency = %change.new.currency_code,
                new_amount_minor = change.new.amount_minor,
                "product price changed"
            );
        }
        Ok(Response::new(pb::UpdateProductResponse {
            product: Some(to_proto(&updated.product)),
        }))
    }
}

/// Validates every field of a `CreateProduct` request.
fn parse_new_product(req: &pb::CreateProductRequest) -> Result<NewProduct> {
    let mut violations = Violations::default();
    let sku = violations.check("sku", Sku::parse(&req.sku));
    let name = violations.check("name", ProductName::parse(&req.name));
    let description = violations.check("description", Description::parse(&req.description));
    let price = Money::check_positive(&mut violations, "price", req.price.as_ref());
    let categories = check_categories(&mut violations, "categories", &req.categories);
    violations.finish()?;
    match (sku, name, description, price, categories) {
        (Some(sku), Some(name), Some(description), Some(price), Some(categories)) => {
            Ok(NewProduct {
                sku,
                name,
                description,
                price,
                categories,
            })
        }
        _ => Err(validated_without_values()),
    }
}

/// The fields of a product an update mask may name.
const UPDATABLE_FIELDS: [&str; 4] = ["name", "description", "price", "categories"];

/// Validates an `UpdateProduct` request: the id, the mask, and the fields the
/// mask names (and only those).
fn parse_update(req: &pb::UpdateProductRequest) -> Result<(String, ProductChanges)> {
    let mut violations = Violations::default();
    let paths: &[String] = match &req.update_mask {
        None => {
            violations.add("update_mask", "is required");
            &[]
        }
        Some(mask) if mask.paths.is_empty() => {
            violations.add("update_mask", "must name at least one field");
            &[]
        }
        Some(mask) => &mask.paths,
    };
    if paths
        .iter()
        .any(|path| !UPDATABLE_FIELDS.contains(&path.as_str()))
    {
        violations.add(
            "update_mask",
            "paths must be among name, description, price, categories",
        );
    }
    let masked = |field: &str| paths.iter().any(|path| path == field);

    let Some(product) = &req.product else {
        violations.add("product", "is required");
        violations.finish()?;
        return Err(validated_without_values());
    };
    let id = violations.check("product.id", parse_product_id(&product.id));
    let mut changes = ProductChanges::default();
    if masked("name") {
        changes.name = violations.check("product.name", ProductName::parse(&product.name));
    }
    if masked("description") {
        changes.description = violations.check(
            "product.description",
            Description::parse(&product.description),
        );
    }
    if masked("price") {
        changes.price =
            Money::check_positive(&mut violations, "product.price", product.price.as_ref());
    }
    if masked("categories") {
        changes.categories =
            check_categories(&mut violations, "product.categories", &product.categories);
    }
    violations.finish()?;
    let id = id.ok_or_else(validated_without_values)?;
    Ok((id, changes))
}

/// A product id in its canonical form (lower-case, hyphenated), as stored.
fn parse_product_id(raw: &str) -> Result<String, &'static str> {
    if raw.trim().is_empty() {
        return Err("is required");
    }
    uuid::Uuid::parse_str(raw.trim())
        .map(|id| id.to_string())
        .map_err(|_| "must be a product id (UUID)")
}

/// Records category violations under `field` (too many) or `field[i]` (the
/// bad entries).
fn check_categories(
    violations: &mut Violations,
    field: &str,
    raw: &[String],
) -> Option<Categories> {
    match Categories::parse(raw) {
        Ok(categories) => Some(categories),
        Err(CategoriesError::TooMany) => {
            violations.add(field, "must have at most 20 distinct categories");
            None
        }
        Err(CategoriesError::Invalid(entries)) => {
            for (index, reason) in entries {
                violations.add(format!("{field}[{index}]"), reason);
            }
            None
        }
    }
}

fn validated_without_values() -> Error {
    Error::new(ErrorKind::Internal, "validation passed without values")
}

/// The protobuf view of a product.
pub fn to_proto(product: &Product) -> pb::Product {
    pb::Product {
        id: product.id.clone(),
        sku: product.sku.clone(),
        name: product.name.clone(),
        description: product.description.clone(),
        price: Some(product.price.to_proto()),
        categories: product.categories.clone(),
        created_at: Some(micros_to_timestamp(product.created_at)),
        updated_at: Some(micros_to_timestamp(product.updated_at)),
    }
}
