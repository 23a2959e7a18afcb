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
//! Reservations expire: each is made with an `expires_at`, and
//! [`InventoryStore::release_expired`] (run by the sweeper, on any number of
//! replicas) releases the RESERVED ones past it with the same conditional
//! update as a release, so a reservation is released (or committed) once,
//! whoever gets there first.
//!
//! Locks are always taken in the same order (the reservation row, then stock
//! rows by product id) so that transactions never deadlock on PostgreSQL.

use std::future::Future;
use std::time::Duration;

use agora_platform::db::{Db, is_unique_violation};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::time::now_micros;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::domain::{
    ProductId, Reservation, ReservationId, ReservationItems, ReservationStatus, StockLevel,
    check_commit_of, check_release_of, check_reserve_retry, expired_and_short, reason,
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

    /// Reserves every item or none, until the store's reservation lifetime
    /// has passed. A reservation already stored under `id` is returned
    /// unchanged when it has the same items (ALREADY_EXISTS with other
    /// items, FAILED_PRECONDITION for a tombstone); FAILED_PRECONDITION
    /// naming the short products when any has fewer units available than
    /// asked (reason `INSUFFICIENT_STOCK`), or has no stock level at all
    /// (reason `UNKNOWN_PRODUCT`, which wins when both happen).
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
    /// `reserved`). Committing a COMMITTED one changes nothing; an EXPIRED one
    /// takes its units from available stock again and is committed, or is
    /// FAILED_PRECONDITION (`RESERVATION_EXPIRED`) when they are not all
    /// there any more; a RELEASED one is FAILED_PRECONDITION; an unknown one
    /// NOT_FOUND.
    fn commit(&self, id: &ReservationId) -> impl Future<Output = Result<Reservation>> + Send;

    /// Releases up to `limit` RESERVED reservations whose `expires_at` is at
    /// or before `now` (microseconds since the epoch), returning their units
    /// to available stock and marking them EXPIRED; returns how many.
    fn release_expired(&self, now: i64, limit: i64) -> impl Future<Output = Result<usize>> + Send;

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
    /// How long a reservation holds its units unless committed, in
    /// microseconds.
    reservation_ttl: i64,
}

impl SqlInventoryStore {
    /// A store on a migrated database whose reservations expire
    /// `reservation_ttl` after they are made unless committed.
    pub fn new(db: Db, reservation_ttl: Duration) -> Self {
        Self {
            db,
            reservation_ttl: i64::try_from(reservation_ttl.as_micros()).unwrap_or(i64::MAX),
        }
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
                return_units(&mut tx, &reservation.items, HeldAs::Reserved, now).await?;
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
                // Sold units coming back (the order was cancelled): they
                // return to available stock, once.
                Some(existing) if existing.status == ReservationStatus::Committed => {
                    if mark_from(
                        &mut tx,
                        id,
                        ReservationStatus::Committed,
                        ReservationStatus::Released,
                        now,
                    )
                    .await?
                    {
                        return_units(&mut tx, &existing.items, HeldAs::Sold, now).await?;
                        tx.commit().await?;
                        tracing::info!(reservation_id = %id, "sold units returned to stock");
                        return Ok(Reservation {
                            status: ReservationStatus::Released,
                            updated_at: now,
                            ..existing
                        });
                    }
                    // Returned by a concurrent release meanwhile: read again.
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
                    // No `expires_at`: a tombstone holds nothing to expire.
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
                            expires_at: None,
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
                Some(existing) if existing.status == ReservationStatus::Expired => {
                    if let Some(committed) = self.commit_expired(&existing).await? {
                        return Ok(committed);
                    }
                    // Changed under us (committed by a concurrent commit):
                    // start over and answer from what it is now.
                }
                Some(existing) => {
                    check_commit_of(id, Some(existing.status))?;
                    return Ok(existing);
                }
                None => return Err(Error::not_found(format_args!("reservation {id}"))),
            }
        }
        Err(changed_concurrently(id))
    }

    async fn release_expired(&self, now: i64, limit: i64) -> Result<usize> {
        let due = sqlx::query(
            "SELECT reservation_id FROM reservations \
             WHERE status = $1 AND expires_at <= $2 ORDER BY expires_at LIMIT $3",
        )
        .bind(ReservationStatus::Reserved.as_str())
        .bind(now)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        let mut released = 0;
        for row in &due {
            let raw: String = row.try_get("reservation_id")?;
            let id = stored_reservation_id(&raw)?;
            // One short transaction each: a long batch would hold stock rows
            // that checkouts are waiting for.
            let mut tx = self.db.begin_write().await?;
            // The same guard as a release or a commit: whichever of them, or
            // of several sweeping replicas, comes first moves the units.
            let expired = sqlx::query(
                "UPDATE reservations SET status = $1, expired_at = $2, updated_at = $2 \
                 WHERE reservation_id = $3 AND status = $4 AND expires_at <= $2",
            )
            .bind(ReservationStatus::Expired.as_str())
            .bind(now)
            .bind(id.as_str())
            .bind(ReservationStatus::Reserved.as_str())
            .execute(&mut *tx)
            .await?;
            if expired.rows_affected() != 1 {
                tx.rollback().await?;
                continue;
            }
            let reservation = read_reservation(&mut tx, &id)
                .await?
                .ok_or_else(|| Error::new(ErrorKind::Internal, "expired reservation vanished"))?;
            return_units(&mut tx, &reservation.items, HeldAs::Reserved, now).await?;
            tx.commit().await?;
            tracing::info!(reservation_id = %id, "expired reservation released");
            released += 1;
        }
        Ok(released)
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
        let expires_at = now.saturating_add(self.reservation_ttl);
        let inserted = sqlx::query(
            "INSERT INTO reservations (reservation_id, status, created_at, updated_at, \
             expires_at) VALUES ($1, $2, $3, $3, $4)",
        )
        .bind(id.as_str())
        .bind(ReservationStatus::Reserved.as_str())
        .bind(now)
        .bind(expires_at)
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
        let (mut short, mut unknown) = (Vec::new(), Vec::new());
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
                if stock_exists(&mut tx, product_id).await? {
                    short.push(product_id.as_str());
                } else {
                    unknown.push(product_id.as_str());
                }
            }
        }
        if !short.is_empty() || !unknown.is_empty() {
            tx.rollback().await?;
            return Err(not_reservable(&short, &unknown));
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
            expires_at: Some(expires_at),
        }))
    }

    /// Commits an EXPIRED reservation by taking its units from available
    /// stock again (straight to sold: they never re-enter `reserved`), all
    /// or none. `None` when it was no longer EXPIRED (a concurrent commit
    /// won); FAILED_PRECONDITION (`RESERVATION_EXPIRED`) naming the short
    /// products when the units are not all there.
    async fn commit_expired(&self, expired: &Reservation) -> Result<Option<Reservation>> {
        let mut tx = self.db.begin_write().await?;
        let now = now_micros();
        // `expired_at` is cleared: from here on the units are sold, and a
        // later release of them (a cancelled order) must read back as
        // RELEASED, not as EXPIRED, which a commit would take again.
        let claimed = sqlx::query(
            "UPDATE reservations SET status = $1, updated_at = $2, expired_at = NULL \
             WHERE reservation_id = $3 AND status = $4 AND expired_at IS NOT NULL",
        )
        .bind(ReservationStatus::Committed.as_str())
        .bind(now)
        .bind(expired.id.as_str())
        .bind(ReservationStatus::Expired.as_str())
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut short = Vec::new();
        for (product_id, quantity) in expired.items.iter() {
            let sold = sqlx::query(
                "UPDATE stock SET available = available - $1, updated_at = $2 \
                 WHERE product_id = $3 AND available >= $1",
            )
            .bind(quantity)
            .bind(now)
            .bind(product_id.as_str())
            .execute(&mut *tx)
            .await?;
            if sold.rows_affected() == 0 {
                short.push(product_id.as_str());
            }
        }
        if !short.is_empty() {
            tx.rollback().await?;
            return Err(expired_and_short(&expired.id, &short));
        }
        tx.commit().await?;
        tracing::info!(reservation_id = %expired.id, "expired reservation committed again");
        Ok(Some(Reservation {
            status: ReservationStatus::Committed,
            updated_at: now,
            ..expired.clone()
        }))
    }
}

/// Where units go back to available stock from.
#[derive(Clone, Copy)]
enum HeldAs {
    /// Reserved units (a release or an expiry).
    Reserved,
    /// Sold units of a committed reservation (a cancelled sale).
    Sold,
}

/// Returns `items` to available stock, inside the transaction that marked
/// their reservation.
async fn return_units(
    tx: &mut Transaction<'static, Any>,
    items: &ReservationItems,
    held: HeldAs,
    now: i64,
) -> Result<()> {
    let sql = match held {
        HeldAs::Reserved => {
            "UPDATE stock SET available = available + $1, reserved = reserved - $1, \
             updated_at = $2 WHERE product_id = $3"
        }
        // Sold units left `reserved` when they were committed.
        HeldAs::Sold => {
            "UPDATE stock SET available = available + $1, updated_at = $2 WHERE product_id = $3"
        }
    };
    for (product_id, quantity) in items.iter() {
        let returned = sqlx::query(sql)
            .bind(quantity)
            .bind(now)
            .bind(product_id.as_str())
            .execute(&mut **tx)
            .await?;
        expect_one_stock_row(returned.rows_affected(), product_id)?;
    }
    Ok(())
}

/// Whether a stock level was ever set for the product.
async fn stock_exists(tx: &mut Transaction<'static, Any>, product_id: &ProductId) -> Result<bool> {
    Ok(
        sqlx::query("SELECT 1 AS found FROM stock WHERE product_id = $1")
            .bind(product_id.as_str())
            .fetch_optional(&mut **tx)
            .await?
            .is_some(),
    )
}

/// FAILED_PRECONDITION for a reservation that cannot be made, naming the
/// products short of stock and those inventory does not know. Unknown
/// products decide the reason: waiting for stock will not help them.
fn not_reservable(short: &[&str], unknown: &[&str]) -> Error {
    let mut parts = Vec::new();
    if !unknown.is_empty() {
        parts.push(format!(
            "no stock was ever set for products {}",
            unknown.join(", ")
        ));
    }
    if !short.is_empty() {
        parts.push(format!(
            "insufficient stock for products {}",
            short.join(", ")
        ));
    }
    let error = Error::new(ErrorKind::FailedPrecondition, parts.join("; "));
    if unknown.is_empty() {
        error.with_reason(reason::INSUFFICIENT_STOCK)
    } else {
        error.with_reason(reason::UNKNOWN_PRODUCT)
    }
}

const SELECT_RESERVATION: &str = "SELECT reservation_id, status, created_at, updated_at, \
     expires_at, expired_at FROM reservations WHERE reservation_id = $1";

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
    mark_from(tx, id, ReservationStatus::Reserved, to, now).await
}

/// Moves reservation `id` from `from` to `to`; whether it was `from`.
///
/// `expired_at` is cleared on the way: only the sweeper's move to EXPIRED
/// (in [`InventoryStore::release_expired`]) may leave it set, so a
/// reservation released any other way (a cancelled order returning sold
/// units, including rows an older build committed after expiry without
/// clearing it) reads back as RELEASED, and a late commit is refused
/// instead of selling its units again.
async fn mark_from(
    tx: &mut Transaction<'static, Any>,
    id: &ReservationId,
    from: ReservationStatus,
    to: ReservationStatus,
    now: i64,
) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE reservations SET status = $1, updated_at = $2, expired_at = NULL \
         WHERE reservation_id = $3 AND status = $4",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(id.as_str())
    .bind(from.as_str())
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

fn stored_reservation_id(raw: &str) -> Result<ReservationId> {
    ReservationId::parse(raw).map_err(|reason| {
        Error::new(
            ErrorKind::Internal,
            format!("stored reservation id {raw:?} {reason}"),
        )
    })
}

fn reservation_from_rows(row: &AnyRow, items: &[AnyRow]) -> Result<Reservation> {
    let id: String = row.try_get("reservation_id")?;
    let status: String = row.try_get("status")?;
    let expired_at: Option<i64> = row.try_get("expired_at")?;
    let items = items
        .iter()
        .map(|item| Ok((stored_product_id(item)?, item.try_get("quantity")?)))
        .collect::<Result<Vec<_>>>()?;
    let status = match ReservationStatus::parse(&status) {
        Some(ReservationStatus::Released) if expired_at.is_some() => ReservationStatus::Expired,
        Some(status) => status,
        None => {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("unknown stored reservation status {status:?}"),
            ));
        }
    };
    Ok(Reservation {
        id: stored_reservation_id(&id)?,
        items: ReservationItems::from_stored(items),
        status,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}
