//! Persistence of orders.
//!
//! [`OrderStore`] is what the service (and, later, the checkout saga) needs;
//! [`SqlOrderStore`] implements it on PostgreSQL and SQLite with the same SQL.
//! An order is one `orders` row plus its `order_items`, written in one
//! transaction. Status changes are conditional updates (`WHERE status = <the
//! status just read>`), so of two racing writers exactly one moves the order
//! and the other re-reads and decides again; after each committed change the
//! store tells [`OrderChanges`] so that watchers re-read at once. Each change
//! records its event (`OrderPlaced`, `OrderCompleted`, `OrderCancelled`,
//! `OrderFailed`) in the outbox in the same transaction, with the order's
//! version after it.

use std::future::Future;

use agora_platform::db::{Db, is_unique_violation};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::money::Money;
use agora_platform::pagination::{Cursor, next_page};
use agora_platform::time::now_micros;
use agora_platform_events::{Outbox, UnitOfWork};
use agora_proto::orders::v1 as pb;
use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use crate::changes::OrderChanges;
use crate::domain::{NewOrder, Order, OrderItem, OrderStatus, failure_reason};

/// The most order ids [`OrderStore::get_many`] and [`OrderStore::stamps`]
/// take at once: one bound parameter each, far below PostgreSQL's 65,535
/// and SQLite's 32,766.
pub const MAX_IDS_PER_READ: usize = 500;

/// What the `WatchOrder` poll reads of a watched order every interval: one
/// narrow row, no items. Every status change moves `updated_at` strictly
/// forward, so an order whose stamp is the one the hub last read in full
/// has not changed, and only the others are read in full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderStamp {
    /// The order's id.
    pub id: String,
    /// Its status now.
    pub status: OrderStatus,
    /// When it last changed, in microseconds since the epoch.
    pub updated_at: i64,
}

/// How often a status change re-reads and retries after a concurrent writer
/// moved the order first (each retry decides again on the fresh status).
const TRANSITION_ATTEMPTS: usize = 5;

/// One page of a user's orders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderPage {
    /// Newest first.
    pub orders: Vec<Order>,
    /// Token for the next page; empty when this is the last one.
    pub next_page_token: String,
}

/// Storage of orders and their lifecycle.
pub trait OrderStore: Send + Sync + 'static {
    /// Creates a PENDING order with a new UUIDv7 id and the total of its
    /// items. Idempotent: when the user already has an order with this
    /// `request_id`, that order is returned unchanged (whatever the items).
    /// INVALID_ARGUMENT naming every bad field of `new`.
    fn create(&self, new: NewOrder) -> impl Future<Output = Result<Order>> + Send;

    /// The order `id`, whoever owns it.
    fn get(&self, id: &str) -> impl Future<Output = Result<Option<Order>>> + Send;

    /// The orders among `ids` that exist, in one query (in no particular
    /// order; unknown ids are left out). For the `WatchOrder` hub, which
    /// re-reads every watched order at once: callers keep `ids` to at most
    /// [`MAX_IDS_PER_READ`] (INVALID_ARGUMENT beyond), so that one
    /// statement stays within every backend's limit on bound parameters.
    fn get_many(&self, ids: &[String]) -> impl Future<Output = Result<Vec<Order>>> + Send;

    /// The [`OrderStamp`]s (id, status, `updated_at`) of the orders among
    /// `ids` that exist, in one query that reads one row per order and no
    /// items (in no particular order; unknown ids are left out). What the
    /// `WatchOrder` poll reads every interval, so that it reads in full
    /// ([`OrderStore::get_many`]) only the orders that changed. At most
    /// [`MAX_IDS_PER_READ`] ids, as for `get_many`.
    fn stamps(&self, ids: &[String]) -> impl Future<Output = Result<Vec<OrderStamp>>> + Send;

    /// The user's orders, newest first by `(created_at, id)`, starting after
    /// `cursor` (or at the newest), at most `size` of them.
    fn list_for_user(
        &self,
        user_id: &str,
        cursor: Option<&Cursor>,
        size: i64,
    ) -> impl Future<Output = Result<OrderPage>> + Send;

    /// Moves the order to `to`: PENDING -> COMPLETED | FAILED, COMPLETED ->
    /// CANCELLED. `reason` is kept for FAILED and CANCELLED and ignored
    /// otherwise. Moving to the status the order already has changes nothing
    /// and returns it (so retried saga steps are harmless); any other move is
    /// FAILED_PRECONDITION; an unknown order is NOT_FOUND.
    fn transition(
        &self,
        id: &str,
        to: OrderStatus,
        reason: &str,
    ) -> impl Future<Output = Result<Order>> + Send;

    /// The notifier this store signals after each committed status change.
    fn changes(&self) -> &OrderChanges;
}

/// [`OrderStore`] on a SQL database (PostgreSQL or SQLite). Clones share the
/// pool and the notifier.
#[derive(Clone, Debug)]
pub struct SqlOrderStore {
    db: Db,
    outbox: Outbox,
    changes: OrderChanges,
}

impl SqlOrderStore {
    /// A store on a migrated database, with its outbox and a notifier of
    /// its own.
    pub fn new(outbox: Outbox) -> Self {
        Self::with_changes(outbox, OrderChanges::new())
    }

    /// A store on a migrated database that signals `changes`.
    pub fn with_changes(outbox: Outbox, changes: OrderChanges) -> Self {
        Self {
            db: outbox.db().clone(),
            outbox,
            changes,
        }
    }
}

/// Orders joined with their items: one row per item, the order's columns
/// repeated. `$source` is the table or a subquery aliased `o`.
macro_rules! select_orders {
    ($source:literal, $tail:literal) => {
        concat!(
            "SELECT o.id, o.user_id, o.request_id, o.status, o.failure_reason, o.failure_code, \
             o.currency, o.total_minor, o.created_at, o.updated_at, \
             i.product_id, i.quantity, i.unit_price_minor FROM ",
            $source,
            " o LEFT JOIN order_items i ON i.order_id = o.id ",
            $tail
        )
    };
}

/// One page in one statement (one snapshot on both backends), so an order's
/// items can never be missing because of a concurrent insert. Without a cursor
/// the caller binds `(i64::MAX, "")`, which every row comes before.
const LIST_FOR_USER: &str = select_orders!(
    "(SELECT id, user_id, request_id, status, failure_reason, failure_code, currency, \
     total_minor, created_at, updated_at FROM orders WHERE user_id = $1 \
     AND (created_at < $2 OR (created_at = $2 AND id < $3)) \
     ORDER BY created_at DESC, id DESC LIMIT $4)",
    "ORDER BY o.created_at DESC, o.id DESC, i.line"
);

const GET_BY_ID: &str = select_orders!("orders", "WHERE o.id = $1 ORDER BY i.line");

/// `$1, $2, ..., $count`: only numbered placeholders are generated into a
/// statement, every id is bound.
fn placeholders(count: usize) -> String {
    let mut placeholders = String::with_capacity(count * 5);
    for n in 1..=count {
        if n > 1 {
            placeholders.push_str(", ");
        }
        placeholders.push('$');
        placeholders.push_str(&n.to_string());
    }
    placeholders
}

/// The statement of [`OrderStore::get_many`] for `count` ids. Ordered by id
/// so that each order's rows are adjacent, as [`orders_from_rows`] needs.
fn get_many_sql(count: usize) -> String {
    format!(
        select_orders!("orders", "WHERE o.id IN ({}) ORDER BY o.id, i.line"),
        placeholders(count)
    )
}

/// The statement of [`OrderStore::stamps`] for `count` ids: the primary
/// key's index finds each row; no join, no items.
fn stamps_sql(count: usize) -> String {
    format!(
        "SELECT id, status, updated_at FROM orders WHERE id IN ({})",
        placeholders(count)
    )
}

/// INVALID_ARGUMENT when `ids` is more than one statement may bind.
fn check_batch(ids: &[String]) -> Result<()> {
    if ids.len() > MAX_IDS_PER_READ {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "at most {MAX_IDS_PER_READ} orders are read at once, not {}",
                ids.len()
            ),
        ));
    }
    Ok(())
}

const GET_BY_REQUEST: &str = select_orders!(
    "orders",
    "WHERE o.user_id = $1 AND o.request_id = $2 ORDER BY i.line"
);

impl SqlOrderStore {
    /// The rows of `sql` (made for `ids.len()` placeholders) with `ids`
    /// bound: at most [`MAX_IDS_PER_READ`] ids, none read for none.
    async fn rows_by_ids(&self, ids: &[String], sql: fn(usize) -> String) -> Result<Vec<AnyRow>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        check_batch(ids)?;
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql(ids.len())));
        for id in ids {
            query = query.bind(id);
        }
        Ok(query.fetch_all(self.db.pool()).await?)
    }

    /// The outbox the store records its events in (the saga writes through
    /// it too, so that a saga step and its order change commit together).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The user's order placed with `request_id`, if any.
    pub async fn find_by_request(&self, user_id: &str, request_id: &str) -> Result<Option<Order>> {
        find_by_request(self.db.pool(), user_id, request_id).await
    }

    /// [`OrderStore::create`], also starting the order's checkout saga in the
    /// same transaction when `saga` is given. Returns the order and whether
    /// this call created it (`false`: the request id was used before).
    pub(crate) async fn create_order(
        &self,
        new: NewOrder,
        saga: Option<&crate::saga_store::SagaStart>,
    ) -> Result<(Order, bool)> {
        let total = new.validate()?;
        let mut work = self.outbox.begin().await?;
        if let Some(existing) = find_by_request(work.tx(), &new.user_id, &new.request_id).await? {
            return Ok((existing, false));
        }
        let now = now_micros();
        let order = Order {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: new.user_id,
            request_id: new.request_id,
            items: new.items,
            total,
            status: OrderStatus::Pending,
            failure_reason: String::new(),
            failure_code: String::new(),
            created_at: now,
            updated_at: now,
        };
        match insert_order(&mut work, &order).await {
            Ok(()) => {
                if let Some(saga) = saga {
                    crate::saga_store::insert_saga(&mut work, &order.id, saga, now).await?;
                }
                work.record(&pb::OrderPlaced {
                    order_id: order.id.clone(),
                    user_id: order.user_id.clone(),
                    items: order.items.iter().map(OrderItem::to_proto).collect(),
                    total: Some(order.total.to_proto()),
                    version: 1,
                    ..Default::default()
                })
                .await?;
                work.commit().await?;
                Ok((order, true))
            }
            // PostgreSQL: a concurrent create with the same request id
            // committed between our check and our insert. It made the order.
            Err(err) if is_unique_violation(&err) => {
                work.rollback().await?;
                let existing = find_by_request(self.db.pool(), &order.user_id, &order.request_id)
                    .await?
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Conflict, "order was created concurrently: retry")
                    })?;
                Ok((existing, false))
            }
            Err(err) => Err(err.into()),
        }
    }
}

impl OrderStore for SqlOrderStore {
    async fn create(&self, new: NewOrder) -> Result<Order> {
        Ok(self.create_order(new, None).await?.0)
    }

    async fn get(&self, id: &str) -> Result<Option<Order>> {
        let rows = sqlx::query(GET_BY_ID)
            .bind(id)
            .fetch_all(self.db.pool())
            .await?;
        Ok(orders_from_rows(&rows)?.into_iter().next())
    }

    async fn get_many(&self, ids: &[String]) -> Result<Vec<Order>> {
        let rows = self.rows_by_ids(ids, get_many_sql).await?;
        orders_from_rows(&rows)
    }

    async fn stamps(&self, ids: &[String]) -> Result<Vec<OrderStamp>> {
        let rows = self.rows_by_ids(ids, stamps_sql).await?;
        rows.iter()
            .map(|row| {
                Ok(OrderStamp {
                    id: row.try_get("id")?,
                    status: parse_status(&row.try_get::<String, _>("status")?)?,
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }

    async fn list_for_user(
        &self,
        user_id: &str,
        cursor: Option<&Cursor>,
        size: i64,
    ) -> Result<OrderPage> {
        let size = size.max(1);
        let (after_key, after_id) = cursor.map_or((i64::MAX, ""), |c| (c.key, c.id.as_str()));
        let rows = sqlx::query(LIST_FOR_USER)
            .bind(user_id)
            .bind(after_key)
            .bind(after_id)
            // One more than asked: whether it exists says if there is a next page.
            .bind(size.saturating_add(1))
            .fetch_all(self.db.pool())
            .await?;
        let (orders, next_page_token) = next_page(orders_from_rows(&rows)?, size, |order| Cursor {
            key: order.created_at,
            id: order.id.clone(),
        });
        Ok(OrderPage {
            orders,
            next_page_token,
        })
    }

    async fn transition(&self, id: &str, to: OrderStatus, reason: &str) -> Result<Order> {
        for _ in 0..TRANSITION_ATTEMPTS {
            let mut work = self.outbox.begin().await?;
            match move_order(&mut work, id, to, &Failure::new("", reason)).await? {
                Moved::Changed(next) => {
                    work.commit().await?;
                    self.changes.notify(&next.id);
                    return Ok(next);
                }
                Moved::Already(current) => return Ok(current),
                // Another writer moved the order after we read it: read again.
                Moved::Raced => {}
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("order {id} keeps changing concurrently: re-read and retry"),
        ))
    }

    fn changes(&self) -> &OrderChanges {
        &self.changes
    }
}

/// Why an order failed or was cancelled: a stable code for programs and a
/// message for people (both empty for COMPLETED).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failure {
    /// `CARD_DECLINED`, `INSUFFICIENT_STOCK` ...
    pub code: String,
    /// What a customer reads.
    pub message: String,
}

impl Failure {
    /// A failure with `code` and `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// What [`move_order`] did.
pub(crate) enum Moved {
    /// The order moved; the transaction holds the change and its event.
    Changed(Order),
    /// The order already had the status: nothing was written.
    Already(Order),
    /// Another writer moved the order between the read and the write.
    Raced,
}

/// Moves order `id` to `to` inside `work` (with its event), keeping
/// `failure` when the new status carries a reason. The caller commits, then
/// notifies the watchers. NOT_FOUND for an unknown order,
/// FAILED_PRECONDITION for a move the lifecycle does not allow.
pub(crate) async fn move_order(
    work: &mut UnitOfWork,
    id: &str,
    to: OrderStatus,
    failure: &Failure,
) -> Result<Moved> {
    let rows = sqlx::query(GET_BY_ID).bind(id).fetch_all(work.tx()).await?;
    let current = orders_from_rows(&rows)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::not_found(format_args!("order {id}")))?;
    if current.status == to {
        return Ok(Moved::Already(current));
    }
    if !current.status.can_become(to) {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!("order {id} is {} and cannot become {to}", current.status),
        ));
    }
    let (failure_reason, failure_code) = if to.has_reason() {
        (failure_reason(&failure.message), failure.code.clone())
    } else {
        (String::new(), String::new())
    };
    let next = Order {
        status: to,
        failure_reason,
        failure_code,
        // Strictly later than the last change even if the clock is coarse
        // or stepped back: watchers compare it.
        updated_at: now_micros().max(current.updated_at.saturating_add(1)),
        ..current.clone()
    };
    let version: Option<i64> = sqlx::query_scalar(
        "UPDATE orders SET status = $1, failure_reason = $2, failure_code = $3, \
         updated_at = $4, version = version + 1 WHERE id = $5 AND status = $6 \
         RETURNING version",
    )
    .bind(next.status.as_str())
    .bind(&next.failure_reason)
    .bind(&next.failure_code)
    .bind(next.updated_at)
    .bind(&next.id)
    .bind(current.status.as_str())
    .fetch_optional(work.tx())
    .await?;
    match version {
        Some(version) => {
            record_status_change(work, &next, version).await?;
            Ok(Moved::Changed(next))
        }
        None => Ok(Moved::Raced),
    }
}

pub(crate) async fn find_by_request<'c>(
    executor: impl sqlx::Executor<'c, Database = Any>,
    user_id: &str,
    request_id: &str,
) -> Result<Option<Order>> {
    let rows = sqlx::query(GET_BY_REQUEST)
        .bind(user_id)
        .bind(request_id)
        .fetch_all(executor)
        .await?;
    Ok(orders_from_rows(&rows)?.into_iter().next())
}

/// The event of `order` having become what it is now, at `version`.
async fn record_status_change(work: &mut UnitOfWork, order: &Order, version: i64) -> Result<()> {
    let (order_id, user_id) = (order.id.clone(), order.user_id.clone());
    match order.status {
        OrderStatus::Completed => {
            work.record(&pb::OrderCompleted {
                order_id,
                user_id,
                total: Some(order.total.to_proto()),
                version,
                ..Default::default()
            })
            .await?
        }
        OrderStatus::Cancelled => {
            work.record(&pb::OrderCancelled {
                order_id,
                user_id,
                reason: order.failure_reason.clone(),
                version,
                ..Default::default()
            })
            .await?
        }
        OrderStatus::Failed => {
            work.record(&pb::OrderFailed {
                order_id,
                user_id,
                reason: order.failure_reason.clone(),
                version,
                code: order.failure_code.clone(),
            })
            .await?
        }
        // Only a new order is PENDING, and OrderPlaced says so.
        OrderStatus::Pending => return Ok(()),
    };
    Ok(())
}

async fn insert_order(
    work: &mut UnitOfWork,
    order: &Order,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO orders (id, user_id, request_id, status, failure_reason, currency, \
         total_minor, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&order.id)
    .bind(&order.user_id)
    .bind(&order.request_id)
    .bind(order.status.as_str())
    .bind(&order.failure_reason)
    .bind(&order.total.currency_code)
    .bind(order.total.amount_minor)
    .bind(order.created_at)
    .bind(order.updated_at)
    .execute(work.tx())
    .await?;
    for (line, item) in (0_i64..).zip(&order.items) {
        sqlx::query(
            "INSERT INTO order_items (order_id, line, product_id, quantity, unit_price_minor) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&order.id)
        .bind(line)
        .bind(&item.product_id)
        .bind(item.quantity)
        .bind(item.unit_price.amount_minor)
        .execute(work.tx())
        .await?;
    }
    Ok(())
}

/// Folds joined rows (one per item, grouped by order, in order) into orders.
fn orders_from_rows(rows: &[AnyRow]) -> Result<Vec<Order>> {
    let mut orders: Vec<Order> = Vec::new();
    for row in rows {
        let id: String = row.try_get("id")?;
        let order = match orders.last_mut() {
            Some(order) if order.id == id => order,
            _ => {
                orders.push(order_from_row(row, id)?);
                orders
                    .last_mut()
                    .ok_or_else(|| Error::new(ErrorKind::Internal, "order vanished"))?
            }
        };
        let product_id: Option<String> = row.try_get("product_id")?;
        let quantity: Option<i64> = row.try_get("quantity")?;
        let unit_price_minor: Option<i64> = row.try_get("unit_price_minor")?;
        // A LEFT JOIN row without an item: an order whose items are missing.
        if let (Some(product_id), Some(quantity), Some(amount_minor)) =
            (product_id, quantity, unit_price_minor)
        {
            order.items.push(OrderItem {
                product_id,
                quantity,
                unit_price: Money {
                    currency_code: order.total.currency_code.clone(),
                    amount_minor,
                },
            });
        }
    }
    Ok(orders)
}

/// A stored status; INTERNAL for one this version does not know.
fn parse_status(status: &str) -> Result<OrderStatus> {
    OrderStatus::parse(status).ok_or_else(|| {
        Error::new(
            ErrorKind::Internal,
            format!("unknown stored order status {status:?}"),
        )
    })
}

fn order_from_row(row: &AnyRow, id: String) -> Result<Order> {
    let status: String = row.try_get("status")?;
    Ok(Order {
        id,
        user_id: row.try_get("user_id")?,
        request_id: row.try_get("request_id")?,
        items: Vec::new(),
        total: Money {
            currency_code: row.try_get("currency")?,
            amount_minor: row.try_get("total_minor")?,
        },
        status: parse_status(&status)?,
        failure_reason: row.try_get("failure_reason")?,
        failure_code: row.try_get("failure_code")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
