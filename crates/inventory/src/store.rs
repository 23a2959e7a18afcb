//! Persistence of stock levels and reservations.
//!
//! [`InventoryStore`] is what the service needs; [`SqlInventoryStore`]
//! implements it on PostgreSQL and SQLite with the same SQL. Every change is
//! one write transaction, and every write that moves units is guarded in SQL
//! rather than decided from an earlier read:
//! - a reservation takes units with `available >= $q` in the `WHERE` clause,
//!   so concurrent reservations can never oversell (and the `CHECK`
//!   constraints stop anything that slipped past);
//! - a status change is `UPDATE .. WHERE status = 'reserved'`, so of two
//!   concurrent releases or commits only one moves units;
//! - the reservation row is inserted before any stock is touched, so an
//!   identical request racing this one waits on its primary key and then
//!   finds it, instead of reserving a second time.
//!
//! Locks are always taken in the same order (the reservation row, then stock
//! rows by product id) so that transactions never deadlock on PostgreSQL.

use std::future::Future;

use agora_platform::db::{Db, is_unique_violation};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::time::now_micros;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::domain::{
    ProductId, Reservation, ReservationId, ReservationItems, ReservationStatus, StockLevel,
    check_commit_of, check_release_of, check_reserve_retry,
};

/// How often a write that lost a race (a concurrent insert of the same
/// reservation id) starts over before giving up with ABORTED. One retry is
/// enough in practice: after the race the row exists and is simply read.
const RACE_ATTEMPTS: usize = 3;

/// Storage of stock levels and reservations.
pub trait InventoryStore: Send + Sync + 'static {
    /// Sets the available units of a product (creating its stock level with
    /// nothing reserved), leaving the reserved units as they are.
    fn set_stock(
        &self,
        product_id: &ProductId,
        available: i64,
    ) -> impl Future<Output = Result<StockLevel>> + Send;

    /// The stock level of a product; `None` when it was never set.
    fn get_stock(
        &self,
        product_id: &ProductId,
    ) -> impl Future<Output = Result<Option<StockLevel>>> + Send;

    /// Reserves every item or none. A reservation already stored under `id`
    /// is returned unchanged when it has the same items (ALREADY_EXISTS with
    /// other items, FAILED_PRECONDITION for a tombstone); FAILED_PRECONDITION
    /// naming the short products when any has fewer units available than
    /// asked (a product whose stock was never set counts as short).
    fn reserve(
        &self,
        id: &ReservationId,
        items: &ReservationItems,
    ) -> impl Future<Output = Result<Reservation>> + Send;

    /// Returns a RESERVED reservation's units to available stock. Releasing a
    /// RELEASED one changes nothing; an unknown one is recorded as a tombstone
    /// (so that a late ReserveStock with its id is refused); a COMMITTED one
    /// is FAILED_PRECONDITION.
    fn release(&self, id: &ReservationId) -> impl Future<Output = Result<Reservation>> + Send;

    /// Turns a RESERVED reservation's units into sold units (they leave
    /// `reserved`). Committing a COMMITTED one changes nothing; a RELEASED one
    /// is FAILED_PRECONDITION; an unknown one NOT_FOUND.
    fn commit(&self, id: &ReservationId) -> impl Future<Output = Result<Reservation>> + Send;

    /// A reservation with its items; `None` when the id was never seen.
    fn get_reservation(
        &self,
        id: &ReservationId,
    ) -> impl Future<Output = Result<Option<Reservation>>> + Send;
}

/// [`InventoryStore`] on a SQL database (PostgreSQL or SQLite).
#[derive(Clone, Debug)]
pub struct SqlInventoryStore {
    db: Db,
}

impl SqlInventoryStore {
    /// A store on a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

/// What one attempt at a reservation ended with.
enum ReserveAttempt {
    Done(Reservation),
    /// Another request inserted the same id between our read and our insert.
    LostRace,
}

impl InventoryStore for SqlInventoryStore {
    async fn set_stock(&self, product_id: &ProductId, available: i64) -> Result<StockLevel> {
        let mut tx = self.db.begin_write().await?;
        let row = sqlx::query(
            "INSERT INTO stock (product_id, available, reserved, updated_at) \
             VALUES ($1, $2, 0, $3) \
             ON CONFLICT (product_id) DO UPDATE \
             SET available = excluded.available, updated_at = excluded.updated_at \
             RETURNING product_id, available, reserved",
        )
        .bind(product_id.as_str())
        .bind(available)
        .bind(now_micros())
        .fetch_one(&mut *tx)
        .await?;
        let level = stock_from_row(&row)?;
        tx.commit().await?;
        Ok(level)
    }

    async fn get_stock(&self, product_id: &ProductId) -> Result<Option<StockLevel>> {
        sqlx::query("SELECT product_id, available, reserved FROM stock WHERE product_id = $1")
            .bind(product_id.as_str())
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| stock_from_row(&row))
            .transpose()
    }

    async fn reserve(&self, id: &ReservationId, items: &ReservationItems) -> Result<Reservation> {
        for _ in 0..RACE_ATTEMPTS {
            if let ReserveAttempt::Done(reservation) = self.try_reserve(id, items).await? {
                return Ok(reservation);
            }
            // The racing insert has committed (our insert waited for it), so
            // reading now finds it and answers like any retry.
            if let Some(existing) = self.get_reservation(id).await? {
                check_reserve_retry(&existing, items)?;
                return Ok(existing);
            }
        }
        Err(changed_concurrently(id))
    }

    async fn release(&self, id: &ReservationId) -> Result<Reservation> {
        for _ in 0..RACE_ATTEMPTS {
            let mut tx = self.db.begin_write().await?;
            let now = now_micros();
            if mark(&mut tx, id, ReservationStatus::Released, now).await? {
                let reservation = read_reservation(&mut tx, id).await?.ok_or_else(|| {
                    Error::new(ErrorKind::Internal, "released reservation vanished")
                })?;
                for (product_id, quantity) in reservation.items.iter() {
                    let returned = sqlx::query(
                        "UPDATE stock SET available = available + $1, reserved = reserved - $1, \
                         updated_at = $2 WHERE product_id = $3",
                    )
                    .bind(quantity)
                    .bind(now)
                    .bind(product_id.as_str())
                    .execute(&mut *tx)
                    .await?;
                    expect_one_stock_row(returned.rows_affected(), product_id)?;
                }
                tx.commit().await?;
                tracing::info!(reservation_id = %id, "reservation released");
                return Ok(reservation);
            }
            match read_reservation(&mut tx, id).await? {
                // Inserted and committed by a ReserveStock between our update
                // and this read (PostgreSQL reads a new snapshot per
                // statement): start over and release it.
                Some(existing) if existing.status == ReservationStatus::Reserved => {
                    tx.rollback().await?;
                }
                Some(existing) => {
                    tx.rollback().await?;
                    check_release_of(id, existing.status)?;
                    return Ok(existing);
                }
                None => {
                    // Released before it was made: remember the id so that
                    // the reservation, arriving late, holds nothing.
                    let inserted = sqlx::query(
                        "INSERT INTO reservations (reservation_id, status, created_at, \
                         updated_at) VALUES ($1, $2, $3, $3) \
                         ON CONFLICT (reservation_id) DO NOTHING",
                    )
                    .bind(id.as_str())
                    .bind(ReservationStatus::Released.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    if inserted.rows_affected() == 1 {
                        tx.commit().await?;
                        tracing::info!(reservation_id = %id, "tombstone recorded");
                        return Ok(Reservation {
                            id: id.clone(),
                            items: ReservationItems::default(),
                            status: ReservationStatus::Released,
                            created_at: now,
                            updated_at: now,
                        });
                    }
                    // A concurrent ReserveStock inserted the id first (our
                    // insert waited for it): start over and release that.
                    tx.rollback().await?;
                }
            }
        }
        Err(changed_concurrently(id))
    }

    async fn commit(&self, id: &ReservationId) -> Result<Reservation> {
        for _ in 0..RACE_ATTEMPTS {
            let mut tx = self.db.begin_write().await?;
            let now = now_micros();
            if mark(&mut tx, id, ReservationStatus::Committed, now).await? {
                let reservation = read_reservation(&mut tx, id).await?.ok_or_else(|| {
                    Error::new(ErrorKind::Internal, "committed reservation vanished")
                })?;
                for (product_id, quantity) in reservation.items.iter() {
                    let sold = sqlx::query(
                        "UPDATE stock SET reserved = reserved - $1, updated_at = $2 \
                         WHERE product_id = $3",
                    )
                    .bind(quantity)
                    .bind(now)
                    .bind(product_id.as_str())
                    .execute(&mut *tx)
                    .await?;
                    expect_one_stock_row(sold.rows_affected(), product_id)?;
                }
                tx.commit().await?;
                tracing::info!(reservation_id = %id, "reservation committed");
                return Ok(reservation);
            }
            let existing = read_reservation(&mut tx, id).await?;
            tx.rollback().await?;
            match existing {
                // Committed by a ReserveStock between our update and the
                // read (see `release`): start over and commit it.
                Some(existing) if existing.status == ReservationStatus::Reserved => {}
                Some(existing) => {
                    check_commit_of(id, Some(existing.status))?;
                    return Ok(existing);
                }
                None => return Err(Error::not_found(format_args!("reservation {id}"))),
            }
        }
        Err(changed_concurrently(id))
    }

    async fn get_reservation(&self, id: &ReservationId) -> Result<Option<Reservation>> {
        let mut conn = self.db.pool().acquire().await?;
        let Some(row) = sqlx::query(SELECT_RESERVATION)
            .bind(id.as_str())
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let items = sqlx::query(SELECT_ITEMS)
            .bind(id.as_str())
            .fetch_all(&mut *conn)
            .await?;
        reservation_from_rows(&row, &items).map(Some)
    }
}

impl SqlInventoryStore {
    /// One transaction: answer from an existing reservation, or insert it and
    /// take every item's units, or roll back naming the short products.
    async fn try_reserve(
        &self,
        id: &ReservationId,
        items: &ReservationItems,
    ) -> Result<ReserveAttempt> {
        let mut tx = self.db.begin_write().await?;
        if let Some(existing) = read_reservation(&mut tx, id).await? {
            tx.rollback().await?;
            check_reserve_retry(&existing, items)?;
            return Ok(ReserveAttempt::Done(existing));
        }
        let now = now_micros();
        // Inserted first: an identical request racing this one blocks on
        // this row until we commit or roll back, then sees the outcome.
        let inserted = sqlx::query(
            "INSERT INTO reservations (reservation_id, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $3)",
        )
        .bind(id.as_str())
        .bind(ReservationStatus::Reserved.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => {
                tx.rollback().await?;
                return Ok(ReserveAttempt::LostRace);
            }
            Err(err) => return Err(err.into()),
        }
        let mut short = Vec::new();
        // Product id order (the items' own order) keeps lock order stable.
        for (product_id, quantity) in items.iter() {
            let taken = sqlx::query(
                "UPDATE stock SET available = available - $1, reserved = reserved + $1, \
                 updated_at = $2 WHERE product_id = $3 AND available >= $1",
            )
            .bind(quantity)
            .bind(now)
            .bind(product_id.as_str())
            .execute(&mut *tx)
            .await?;
            if taken.rows_affected() == 0 {
                // Keep going so that the answer names every short product;
                // everything is rolled back below anyway.
                short.push(product_id.as_str());
            }
        }
        if !short.is_empty() {
            tx.rollback().await?;
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("insufficient stock for products {}", short.join(", ")),
            ));
        }
        for (product_id, quantity) in items.iter() {
            sqlx::query(
                "INSERT INTO reservation_items (reservation_id, product_id, quantity) \
                 VALUES ($1, $2, $3)",
            )
            .bind(id.as_str())
            .bind(product_id.as_str())
            .bind(quantity)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(reservation_id = %id, items = items.len(), "stock reserved");
        Ok(ReserveAttempt::Done(Reservation {
            id: id.clone(),
            items: items.clone(),
            status: ReservationStatus::Reserved,
            created_at: now,
            updated_at: now,
        }))
    }
}

const SELECT_RESERVATION: &str = "SELECT reservation_id, status, created_at, updated_at \
     FROM reservations WHERE reservation_id = $1";

const SELECT_ITEMS: &str =
    "SELECT product_id, quantity FROM reservation_items WHERE reservation_id = $1";

/// Moves a RESERVED reservation to `to`; whether it was RESERVED. Of two
/// concurrent callers only one sees `true`: on PostgreSQL the second waits for
/// the first's row lock and then no longer matches `status = 'reserved'`.
async fn mark(
    tx: &mut Transaction<'static, Any>,
    id: &ReservationId,
    to: ReservationStatus,
    now: i64,
) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE reservations SET status = $1, updated_at = $2 \
         WHERE reservation_id = $3 AND status = $4",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(id.as_str())
    .bind(ReservationStatus::Reserved.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(updated.rows_affected() == 1)
}

async fn read_reservation(
    tx: &mut Transaction<'static, Any>,
    id: &ReservationId,
) -> Result<Option<Reservation>> {
    let Some(row) = sqlx::query(SELECT_RESERVATION)
        .bind(id.as_str())
        .fetch_optional(&mut **tx)
        .await?
    else {
        return Ok(None);
    };
    let items = sqlx::query(SELECT_ITEMS)
        .bind(id.as_str())
        .fetch_all(&mut **tx)
        .await?;
    reservation_from_rows(&row, &items).map(Some)
}

/// ABORTED after losing [`RACE_ATTEMPTS`] races in a row: the client may retry.
fn changed_concurrently(id: &ReservationId) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!("reservation {id} was changed concurrently: retry"),
    )
}

/// Stock rows are never deleted and a reservation only holds products whose
/// stock it took, so a missing row means the data was changed behind our back.
fn expect_one_stock_row(rows_affected: u64, product_id: &ProductId) -> Result<()> {
    if rows_affected == 1 {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Internal,
            format!("stock of reserved product {product_id} is missing"),
        ))
    }
}

fn stock_from_row(row: &AnyRow) -> Result<StockLevel> {
    Ok(StockLevel {
        product_id: stored_product_id(row)?,
        available: row.try_get("available")?,
        reserved: row.try_get("reserved")?,
    })
}

fn stored_product_id(row: &AnyRow) -> Result<ProductId> {
    let raw: String = row.try_get("product_id")?;
    ProductId::parse(&raw).map_err(|reason| {
        Error::new(
            ErrorKind::Internal,
            format!("stored product id {raw:?} {reason}"),
        )
    })
}

fn reservation_from_rows(row: &AnyRow, items: &[AnyRow]) -> Result<Reservation> {
    let id: String = row.try_get("reservation_id")?;
    let status: String = row.try_get("status")?;
    let items = items
        .iter()
        .map(|item| Ok((stored_product_id(item)?, item.try_get("quantity")?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Reservation {
        id: ReservationId::parse(&id).map_err(|reason| {
            Error::new(
                ErrorKind::Internal,
                format!("stored reservation id {id:?} {reason}"),
            )
        })?,
        items: ReservationItems::from_stored(items),
        status: ReservationStatus::parse(&status).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("unknown stored reservation status {status:?}"),
            )
        })?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
