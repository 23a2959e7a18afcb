//! Persistence of products.
//!
//! [`CatalogStore`] is what the service needs; [`SqlCatalogStore`] implements
//! it on PostgreSQL and SQLite with the same SQL. A product is one `products`
//! row plus one `product_categories` row per category, written in one
//! transaction; reads join the two and fold the rows back into products.
//!
//! A listing with a text query is `search_text LIKE '%<query>%'`, which no
//! B-tree serves. On PostgreSQL a trigram index (`pg_trgm`, migration
//! `20261126000004`) answers it, and each such search runs in a read-only
//! transaction with `SET LOCAL statement_timeout` ([`SEARCH_TIMEOUT`] by
//! default), so no query text can keep a connection busy for long: past it
//! the search fails with DEADLINE_EXCEEDED and the reason `SEARCH_TIMED_OUT`
//! (not UNAVAILABLE: retry policies would send the same expensive search
//! again at once, which is what the timeout is there to stop). Where the
//! database user may not create the `pg_trgm` extension, the migration
//! skips the index and searches are bounded by the timeout alone. SQLite
//! has neither (see that migration): a search there walks the products
//! newest first until the page is full.

use std::future::Future;
use std::time::Duration;

use agora_platform::db::{Backend, Db, DbFailure, is_unique_violation};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::money::Money;
use agora_platform::pagination::Cursor;
use agora_platform::time::now_micros;
use agora_platform_events::{Outbox, UnitOfWork};
use agora_proto::catalog::v1::ProductPriceChanged;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::domain::{
    Category, NewProduct, PriceChange, Product, ProductChanges, SearchQuery, UpdatedProduct,
    search_text,
};

/// Which products a listing returns, besides the page position.
#[derive(Clone, Debug, Default)]
pub struct ProductFilter {
    /// Only products whose name or description contains this text.
    pub query: Option<SearchQuery>,
    /// Only products in this category.
    pub category: Option<Category>,
}

/// Storage of products.
pub trait CatalogStore: Send + Sync + 'static {
    /// Stores a new product with a fresh id and timestamps. ALREADY_EXISTS
    /// when the SKU is taken.
    fn create(&self, product: NewProduct) -> impl Future<Output = Result<Product>> + Send;

    /// The product `id`, if it exists.
    fn get(&self, id: &str) -> impl Future<Output = Result<Option<Product>>> + Send;

    /// At most `limit` products matching `filter`, newest first (by
    /// `created_at`, then id, both descending), starting after `after`.
    fn list(
        &self,
        filter: &ProductFilter,
        after: Option<&Cursor>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Product>>> + Send;

    /// Applies `changes` to the product `id`; NOT_FOUND when it does not
    /// exist. `updated_at` moves forward only when something changed, and the
    /// outcome says whether the price did (old and new), for
    /// `ProductPriceChanged`.
    fn update(
        &self,
        id: &str,
        changes: &ProductChanges,
    ) -> impl Future<Output = Result<UpdatedProduct>> + Send;
}

/// How long one text search may run on PostgreSQL before the database
/// cancels it. With the trigram index a search takes milliseconds; this only
/// stops the worst case (a short, rare query on a huge catalog) from holding
/// a connection.
pub const SEARCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The ErrorInfo reason of a search the database cancelled for taking too
/// long (DEADLINE_EXCEEDED, without RetryInfo: the same search would time
/// out again; a longer, more specific query is what helps).
pub const SEARCH_TIMED_OUT: &str = "SEARCH_TIMED_OUT";

/// [`CatalogStore`] on a SQL database (PostgreSQL or SQLite), recording
/// `ProductPriceChanged` in the same database's outbox.
#[derive(Clone, Debug)]
pub struct SqlCatalogStore {
    db: Db,
    outbox: Outbox,
    /// The statement timeout of a text search (PostgreSQL only).
    search_timeout: Duration,
}

impl SqlCatalogStore {
    /// A store on a migrated database, with its outbox.
    pub fn new(outbox: Outbox) -> Self {
        Self {
            db: outbox.db().clone(),
            outbox,
            search_timeout: SEARCH_TIMEOUT,
        }
    }

    /// Text searches time out after `timeout` instead of [`SEARCH_TIMEOUT`]
    /// (at least 1 ms: PostgreSQL reads 0 as "no timeout").
    pub fn with_search_timeout(mut self, timeout: Duration) -> Self {
        self.search_timeout = timeout.max(Duration::from_millis(1));
        self
    }
}

/// The columns [`products_from_rows`] reads, from a source aliased `$p`, with
/// the categories joined as `c`.
macro_rules! product_columns {
    ($p:literal) => {
        concat!(
            $p,
            ".id, ",
            $p,
            ".sku, ",
            $p,
            ".name, ",
            $p,
            ".description, ",
            $p,
            ".price_currency, ",
            $p,
            ".price_amount_minor, ",
            $p,
            ".created_at, ",
            $p,
            ".updated_at, c.category"
        )
    };
}

const SELECT_PRODUCT: &str = concat!(
    "SELECT ",
    product_columns!("p"),
    " FROM products p LEFT JOIN product_categories c ON c.product_id = p.id \
     WHERE p.id = $1 ORDER BY c.position"
);

/// One page of products: the inner query picks the page (so LIMIT counts
/// products, not category rows), the outer one attaches the categories.
/// `$1`, `$2` are the cursor (created_at, id), `$3` the limit; `$join` and
/// `$filter` narrow the page and use `$4` (and `$5`).
macro_rules! product_page {
    ($join:literal, $filter:literal) => {
        concat!(
            "SELECT ",
            product_columns!("page"),
            " FROM (SELECT p.id, p.sku, p.name, p.description, p.price_currency, \
             p.price_amount_minor, p.created_at, p.updated_at FROM products p ",
            $join,
            " WHERE (p.created_at, p.id) < ($1, $2)",
            $filter,
            " ORDER BY p.created_at DESC, p.id DESC LIMIT $3) page \
             LEFT JOIN product_categories c ON c.product_id = page.id \
             ORDER BY page.created_at DESC, page.id DESC, c.position"
        )
    };
}

// One static statement per filter combination, rather than `($4 = '' OR ...)`
// conditions, so that each gets a plan that uses its index.
const PAGE_ALL: &str = product_page!("", "");
const PAGE_MATCHING: &str = product_page!("", " AND p.search_text LIKE $4 ESCAPE '\\'");
const PAGE_IN_CATEGORY: &str = product_page!(
    "JOIN product_categories f ON f.product_id = p.id AND f.category = $4",
    ""
);
const PAGE_IN_CATEGORY_MATCHING: &str = product_page!(
    "JOIN product_categories f ON f.product_id = p.id AND f.category = $4",
    " AND p.search_text LIKE $5 ESCAPE '\\'"
);

/// The statement a listing runs, with or without a text query and a
/// category: public so that tests can EXPLAIN exactly what runs. Binds `$1`
/// and `$2` to the cursor (`created_at`, id: `i64::MAX` and `""` for the
/// first page), `$3` to the limit, then the category, then the `LIKE`
/// pattern (`SearchQuery::like_pattern`).
pub fn page_statement(with_query: bool, with_category: bool) -> &'static str {
    match (with_query, with_category) {
        (false, false) => PAGE_ALL,
        (true, false) => PAGE_MATCHING,
        (false, true) => PAGE_IN_CATEGORY,
        (true, true) => PAGE_IN_CATEGORY_MATCHING,
    }
}

impl CatalogStore for SqlCatalogStore {
    async fn create(&self, new: NewProduct) -> Result<Product> {
        let mut work = self.outbox.begin().await?;
        // Taken inside the transaction: on SQLite (one writer at a time) the
        // creation times then follow the commit order.
        let now = now_micros();
        let product = Product {
            id: uuid::Uuid::now_v7().to_string(),
            sku: new.sku.as_str().to_owned(),
            name: new.name.as_str().to_owned(),
            description: new.description.as_str().to_owned(),
            price: new.price,
            categories: new.categories.to_strings(),
            created_at: now,
            updated_at: now,
        };
        sqlx::query(
            "INSERT INTO products (id, sku, name, description, price_currency, \
             price_amount_minor, search_text, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&product.id)
        .bind(&product.sku)
        .bind(&product.name)
        .bind(&product.description)
        .bind(&product.price.currency_code)
        .bind(product.price.amount_minor)
        .bind(search_text(&product.name, &product.description))
        .bind(product.created_at)
        .bind(product.updated_at)
        .execute(work.tx())
        .await
        .map_err(|err| sku_taken_or(err, &product.sku))?;
        insert_categories(&mut work, &product.id, &product.categories).await?;
        work.commit().await?;
        Ok(product)
    }

    async fn get(&self, id: &str) -> Result<Option<Product>> {
        let rows = sqlx::query(SELECT_PRODUCT)
            .bind(id)
            .fetch_all(self.db.pool())
            .await?;
        Ok(products_from_rows(&rows)?.into_iter().next())
    }

    async fn list(
        &self,
        filter: &ProductFilter,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<Product>> {
        // The first page starts "after" a position newer than any product.
        let (after_key, after_id) = after.map_or((i64::MAX, ""), |c| (c.key, c.id.as_str()));
        let pattern = filter.query.as_ref().map(SearchQuery::like_pattern);
        let category = filter.category.as_ref().map(Category::as_str);
        let query = sqlx::query(page_statement(pattern.is_some(), category.is_some()));
        // Binds follow the placeholder numbers: category before pattern.
        let mut query = query.bind(after_key).bind(after_id).bind(limit);
        if let Some(category) = category {
            query = query.bind(category);
        }
        let searching = pattern.is_some();
        if let Some(pattern) = pattern {
            query = query.bind(pattern);
        }
        let rows = if searching && self.db.backend() == Backend::Postgres {
            // SET LOCAL holds for this transaction only: the pooled
            // connection goes back without a timeout of its own.
            let mut tx = self.db.pool().begin().await?;
            let millis = u64::try_from(self.search_timeout.as_millis()).unwrap_or(u64::MAX);
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET LOCAL statement_timeout = {millis}"
            )))
            .execute(&mut *tx)
            .await?;
            let rows = query.fetch_all(&mut *tx).await.map_err(search_failed)?;
            tx.commit().await?;
            rows
        } else {
            query.fetch_all(self.db.pool()).await?
        };
        products_from_rows(&rows)
    }

    async fn update(&self, id: &str, changes: &ProductChanges) -> Result<UpdatedProduct> {
        let mut work = self.outbox.begin().await?;
        // A no-op write takes the row lock on PostgreSQL before the read, so
        // concurrent updates queue and each sees the price the previous one
        // left (SQLite's BEGIN IMMEDIATE already serializes writers).
        let locked = sqlx::query("UPDATE products SET updated_at = updated_at WHERE id = $1")
            .bind(id)
            .execute(work.tx())
            .await?;
        if locked.rows_affected() == 0 {
            return Err(Error::not_found(format_args!("product {id}")));
        }
        let rows = sqlx::query(SELECT_PRODUCT)
            .bind(id)
            .fetch_all(work.tx())
            .await?;
        let current = products_from_rows(&rows)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::not_found(format_args!("product {id}")))?;
        let mut next = changes.apply_to(&current);
        if next == current {
            // Nothing to change: the transaction rolls back when dropped.
            return Ok(UpdatedProduct {
                product: current,
                price_change: None,
            });
        }
        // Strictly later than before, even if the clock is coarse or stepped back.
        next.updated_at = now_micros().max(current.updated_at.saturating_add(1));
        let version: i64 = sqlx::query_scalar(
            "UPDATE products SET name = $1, description = $2, price_currency = $3, \
             price_amount_minor = $4, search_text = $5, updated_at = $6, version = version + 1 \
             WHERE id = $7 RETURNING version",
        )
        .bind(&next.name)
        .bind(&next.description)
        .bind(&next.price.currency_code)
        .bind(next.price.amount_minor)
        .bind(search_text(&next.name, &next.description))
        .bind(next.updated_at)
        .bind(id)
        .fetch_one(work.tx())
        .await?;
        if next.categories != current.categories {
            sqlx::query("DELETE FROM product_categories WHERE product_id = $1")
                .bind(id)
                .execute(work.tx())
                .await?;
            insert_categories(&mut work, id, &next.categories).await?;
        }
        // Decided inside the transaction, from the row it locked: of two
        // concurrent updates each reports the price the other left.
        let price_change = (next.price != current.price).then(|| PriceChange {
            old: current.price.clone(),
            new: next.price.clone(),
        });
        if let Some(change) = &price_change {
            work.record(&ProductPriceChanged {
                product_id: next.id.clone(),
                sku: next.sku.clone(),
                old_price: Some(change.old.to_proto()),
                new_price: Some(change.new.to_proto()),
                version,
            })
            .await?;
        }
        work.commit().await?;
        Ok(UpdatedProduct {
            product: next,
            price_change,
        })
    }
}

async fn insert_categories(
    work: &mut UnitOfWork,
    product_id: &str,
    categories: &[String],
) -> Result<()> {
    for (position, category) in (0_i64..).zip(categories) {
        sqlx::query(
            "INSERT INTO product_categories (product_id, position, category) VALUES ($1, $2, $3)",
        )
        .bind(product_id)
        .bind(position)
        .bind(category)
        .execute(work.tx())
        .await?;
    }
    Ok(())
}

/// A search's database error, with a message that says what to do when the
/// statement timeout cancelled it (the gRPC code stays the platform's:
/// DEADLINE_EXCEEDED; the database error stays the source, for the log).
fn search_failed(err: sqlx::Error) -> Error {
    if DbFailure::of(&err) == DbFailure::TimedOut {
        let kind = DbFailure::TimedOut.kind();
        Error::new(
            kind,
            "the search took too long: use a longer, more specific query",
        )
        .with_reason(SEARCH_TIMED_OUT)
        .with_source(err)
    } else {
        err.into()
    }
}

/// The only unique constraint of `products` a caller can hit is the SKU (ids
/// are fresh UUIDv7s).
fn sku_taken_or(err: sqlx::Error, sku: &str) -> Error {
    if is_unique_violation(&err) {
        Error::new(
            ErrorKind::AlreadyExists,
            format!("sku {sku} is already in the catalog"),
        )
    } else {
        err.into()
    }
}

/// Folds rows of [`product_columns!`] (one per category, or one with a NULL
/// category for a product without any), ordered by product and then category
/// position, into products.
fn products_from_rows(rows: &[AnyRow]) -> Result<Vec<Product>> {
    let mut products: Vec<Product> = Vec::new();
    for row in rows {
        let id: String = row.try_get("id")?;
        let category: Option<String> = row.try_get("category")?;
        match products.last_mut() {
            Some(last) if last.id == id => last.categories.extend(category),
            _ => {
                let mut product = Product {
                    id,
                    sku: row.try_get("sku")?,
                    name: row.try_get("name")?,
                    description: row.try_get("description")?,
                    price: Money {
                        currency_code: row.try_get("price_currency")?,
                        amount_minor: row.try_get("price_amount_minor")?,
                    },
                    categories: Vec::new(),
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                };
                product.categories.extend(category);
                products.push(product);
            }
        }
    }
    Ok(products)
}
