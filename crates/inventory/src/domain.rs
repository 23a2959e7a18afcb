//! Validated values and the rules of the inventory domain. Each `parse`
//! returns the reason a value is rejected, phrased for the `BadRequest` field
//! violation; the `check_*` functions decide what a repeated or out-of-order
//! call on a reservation gets.

use std::collections::BTreeMap;
use std::fmt;

use agora_platform::error::{Error, ErrorKind, Result};

/// The `google.rpc.ErrorInfo` reasons the inventory service answers with, so
/// that callers (the checkout saga) branch on them rather than on messages.
pub mod reason {
    /// FAILED_PRECONDITION from ReserveStock: a product has fewer units
    /// available than asked for.
    pub const INSUFFICIENT_STOCK: &str = "INSUFFICIENT_STOCK";
    /// FAILED_PRECONDITION from ReserveStock: no stock was ever set for a
    /// product (inventory does not know it).
    pub const UNKNOWN_PRODUCT: &str = "UNKNOWN_PRODUCT";
    /// FAILED_PRECONDITION from CommitReservation: the reservation expired
    /// (its units went back to stock) and they are no longer all available.
    pub const RESERVATION_EXPIRED: &str = "RESERVATION_EXPIRED";
    /// FAILED_PRECONDITION: the reservation was released by
    /// ReleaseReservation (or before it was made) and cannot be committed
    /// or reserved again.
    pub const RESERVATION_RELEASED: &str = "RESERVATION_RELEASED";
}

/// The most units one stock level or one reservation item may hold. Far above
/// any real stock, and low enough that summing quantities (merged duplicates,
/// `reserved + q`) can never overflow a 64-bit integer in either database.
pub const MAX_QUANTITY: i64 = 1_000_000_000;

/// The most distinct items one reservation may hold; bounds the work (and the
/// rows locked) per request.
pub const MAX_RESERVATION_ITEMS: usize = 100;

/// The longest reservation id accepted, in characters.
pub const MAX_RESERVATION_ID_CHARS: usize = 128;

/// A product id: a UUID, normalized to lower-case hyphenated form so that the
/// same product is the same row whatever spelling the caller used. Inventory
/// trusts it: it does not ask the catalog whether the product exists.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProductId(String);

impl ProductId {
    /// Validates a product id.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        uuid::Uuid::parse_str(raw.trim())
            .map(|id| Self(id.hyphenated().to_string()))
            .map_err(|_| "must be a product id (UUID)")
    }

    /// The normalized id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A reservation id chosen by the caller (the orders service uses its saga
/// id): 1 to 128 characters of `[A-Za-z0-9._:-]`, taken exactly as sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReservationId(String);

impl ReservationId {
    /// Validates a reservation id.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("must not be empty");
        }
        // Counting bytes is enough: every allowed character is one byte, and
        // anything else is rejected below anyway.
        if raw.len() > MAX_RESERVATION_ID_CHARS {
            return Err("must be at most 128 characters");
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if !raw.chars().all(allowed) {
            return Err("may only contain letters, digits and . _ : -");
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates the quantity SetStock sets: 0 to [`MAX_QUANTITY`].
pub fn parse_stock_quantity(raw: i64) -> Result<i64, &'static str> {
    if raw < 0 {
        Err("must not be negative")
    } else if raw > MAX_QUANTITY {
        Err("must be at most 1000000000")
    } else {
        Ok(raw)
    }
}

/// Validates the quantity of one reservation item: 1 to [`MAX_QUANTITY`].
pub fn parse_item_quantity(raw: i64) -> Result<i64, &'static str> {
    if raw <= 0 {
        Err("must be greater than 0")
    } else if raw > MAX_QUANTITY {
        Err("must be at most 1000000000")
    } else {
        Ok(raw)
    }
}

/// The items of a reservation in their normalized form: one entry per
/// product, duplicates merged by summing, ordered by product id. That order is
/// also the order stock rows are locked in, so that two reservations touching
/// the same products never deadlock on PostgreSQL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReservationItems(BTreeMap<ProductId, i64>);

impl ReservationItems {
    /// Merges validated items: 1 to [`MAX_RESERVATION_ITEMS`] distinct
    /// products, each quantity (after summing duplicates) at most
    /// [`MAX_QUANTITY`].
    pub fn merge(items: impl IntoIterator<Item = (ProductId, i64)>) -> Result<Self, &'static str> {
        let mut merged = BTreeMap::new();
        for (product_id, quantity) in items {
            let total: &mut i64 = merged.entry(product_id).or_default();
            *total = total
                .checked_add(quantity)
                .filter(|sum| *sum <= MAX_QUANTITY)
                .ok_or("the quantities of one product must add up to at most 1000000000")?;
        }
        if merged.is_empty() {
            return Err("must not be empty");
        }
        if merged.len() > MAX_RESERVATION_ITEMS {
            return Err("must have at most 100 items");
        }
        Ok(Self(merged))
    }

    /// Items as stored, trusted as they are (no limits re-checked): a
    /// tombstone has none.
    pub fn from_stored(items: impl IntoIterator<Item = (ProductId, i64)>) -> Self {
        Self(items.into_iter().collect())
    }

    /// `(product, quantity)` in product id order.
    pub fn iter(&self) -> impl Iterator<Item = (&ProductId, i64)> {
        self.0.iter().map(|(id, quantity)| (id, *quantity))
    }

    /// Whether there are no items (only tombstones have none).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many distinct products.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// How many units of one product there are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockLevel {
    /// The product.
    pub product_id: ProductId,
    /// Units that can still be reserved.
    pub available: i64,
    /// Units held by open (RESERVED) reservations.
    pub reserved: i64,
}

/// Where a reservation is in its lifecycle. RESERVED moves to COMMITTED
/// (units sold), RELEASED (units returned on request) or EXPIRED (units
/// returned by the sweeper); EXPIRED may still move to COMMITTED when a late
/// commit finds the units available again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationStatus {
    /// Units are held.
    Reserved,
    /// Units were sold.
    Committed,
    /// Units were returned to available stock (or never taken: a tombstone).
    Released,
    /// Not committed in time: the sweeper returned the units to available
    /// stock. Stored as `released` with `expired_at` set; shown as RELEASED.
    /// Only the sweeper sets `expired_at`, and committing an expired
    /// reservation clears it, so sold units returned by a cancel are
    /// RELEASED (never committable again), not EXPIRED.
    Expired,
}

impl ReservationStatus {
    /// The stored form (of the `status` column: EXPIRED is `released`, told
    /// apart by `expired_at`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Committed => "committed",
            Self::Released | Self::Expired => "released",
        }
    }

    /// The status a stored string names.
    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "reserved" => Some(Self::Reserved),
            "committed" => Some(Self::Committed),
            "released" => Some(Self::Released),
            _ => None,
        }
    }
}

/// A reservation as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The caller's id for it.
    pub id: ReservationId,
    /// What it holds (held, sold or returned, depending on `status`).
    pub items: ReservationItems,
    /// Where it is in its lifecycle.
    pub status: ReservationStatus,
    /// When it was made, microseconds since the epoch.
    pub created_at: i64,
    /// When its status last changed, microseconds since the epoch.
    pub updated_at: i64,
    /// When it expires unless committed, microseconds since the epoch;
    /// `None` for a tombstone.
    pub expires_at: Option<i64>,
}

impl Reservation {
    /// Whether this is a tombstone: released before any ReserveStock with its
    /// id arrived (a saga's compensation overtaking its reservation).
    pub fn is_tombstone(&self) -> bool {
        self.items.is_empty()
    }
}

/// What a ReserveStock gets when a reservation with its id already exists: the
/// existing one when the items are the same (a retry, whatever the status),
/// FAILED_PRECONDITION for a tombstone, ALREADY_EXISTS for other items.
pub fn check_reserve_retry(existing: &Reservation, requested: &ReservationItems) -> Result<()> {
    if existing.is_tombstone() {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "reservation {} was released before it was made and cannot be reserved",
                existing.id
            ),
        )
        .with_reason(reason::RESERVATION_RELEASED));
    }
    if existing.items != *requested {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("reservation {} exists with different items", existing.id),
        ));
    }
    Ok(())
}

/// Whether a reservation that is not RESERVED or COMMITTED (anymore) may be
/// released: a repeated release is fine, and so is one after expiry. (A
/// committed one is released by returning its sold units to stock.)
pub fn check_release_of(id: &ReservationId, status: ReservationStatus) -> Result<()> {
    match status {
        ReservationStatus::Reserved | ReservationStatus::Released | ReservationStatus::Expired => {
            Ok(())
        }
        ReservationStatus::Committed => Err(Error::new(
            ErrorKind::Conflict,
            format!("reservation {id} was committed concurrently: retry"),
        )),
    }
}

/// Whether a reservation that is not RESERVED (anymore) may be committed: a
/// repeated commit is fine, committing units returned on request is not; an
/// unknown reservation is NOT_FOUND. (An EXPIRED one is committed when its
/// units can be taken again; this is the answer when they cannot.)
pub fn check_commit_of(id: &ReservationId, status: Option<ReservationStatus>) -> Result<()> {
    match status {
        Some(ReservationStatus::Reserved | ReservationStatus::Committed) => Ok(()),
        Some(ReservationStatus::Released) => Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!("reservation {id} is released and cannot be committed"),
        )
        .with_reason(reason::RESERVATION_RELEASED)),
        Some(ReservationStatus::Expired) => Err(expired_and_short(id, &[])),
        None => Err(Error::not_found(format_args!("reservation {id}"))),
    }
}

/// FAILED_PRECONDITION (`RESERVATION_EXPIRED`) for a commit of an expired
/// reservation whose units are no longer all available, naming the
/// `short` products.
pub fn expired_and_short(id: &ReservationId, short: &[&str]) -> Error {
    let message = if short.is_empty() {
        format!("reservation {id} expired before it was committed")
    } else {
        format!(
            "reservation {id} expired before it was committed, and stock is now \
             insufficient for products {}",
            short.join(", ")
        )
    };
    Error::new(ErrorKind::FailedPrecondition, message).with_reason(reason::RESERVATION_EXPIRED)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0190a3f2-7b1c-7cde-8f00-000000000001";
    const B: &str = "0190a3f2-7b1c-7cde-8f00-000000000002";

    fn product(raw: &str) -> ProductId {
        ProductId::parse(raw).expect("valid product id")
    }

    fn reservation(items: ReservationItems, status: ReservationStatus) -> Reservation {
        Reservation {
            id: ReservationId::parse("saga-1").expect("valid"),
            items,
            status,
            created_at: 1,
            updated_at: 1,
            expires_at: Some(2),
        }
    }

    #[test]
    fn product_ids_are_uuids_in_one_spelling() {
        assert_eq!(
            ProductId::parse(" 0190A3F2-7B1C-7CDE-8F00-000000000001 ").map(|p| p.0),
            Ok(A.to_owned())
        );
        assert_eq!(
            ProductId::parse("0190a3f27b1c7cde8f00000000000001").map(|p| p.0),
            Ok(A.to_owned())
        );
        for bad in ["", "42", "x'; DROP TABLE stock; --", &"a".repeat(10_000)] {
            assert!(ProductId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn reservation_ids_are_bounded_and_plain() {
        for good in ["saga-1", "a", "Order:42.step_3", &"x".repeat(128)] {
            assert!(ReservationId::parse(good).is_ok(), "{good:?} should pass");
        }
        for bad in [
            "",
            " saga",
            "saga 1",
            "saga/1",
            "é",
            "a\u{0}",
            &"x".repeat(129),
            &"é".repeat(64),
        ] {
            assert!(ReservationId::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn quantities_have_bounds() {
        assert_eq!(parse_stock_quantity(0), Ok(0));
        assert_eq!(parse_stock_quantity(MAX_QUANTITY), Ok(MAX_QUANTITY));
        assert!(parse_stock_quantity(-1).is_err());
        assert!(parse_stock_quantity(i64::MAX).is_err());
        assert_eq!(parse_item_quantity(1), Ok(1));
        assert!(parse_item_quantity(0).is_err());
        assert!(parse_item_quantity(i64::MIN).is_err());
        assert!(parse_item_quantity(MAX_QUANTITY + 1).is_err());
    }

    #[test]
    fn items_merge_duplicates_and_sort() {
        let merged = ReservationItems::merge([(product(B), 1), (product(A), 2), (product(B), 3)])
            .expect("valid");
        let items: Vec<_> = merged.iter().map(|(p, q)| (p.as_str(), q)).collect();
        assert_eq!(items, [(A, 2), (B, 4)]);
        // The same items in another order and split differently are equal.
        let other = ReservationItems::merge([(product(A), 1), (product(B), 4), (product(A), 1)])
            .expect("valid");
        assert_eq!(merged, other);
    }

    #[test]
    fn items_have_bounds() {
        assert!(ReservationItems::merge([]).is_err());
        assert!(
            ReservationItems::merge([(product(A), MAX_QUANTITY), (product(A), 1)]).is_err(),
            "merged sum above the maximum"
        );
        assert!(ReservationItems::merge([(product(A), i64::MAX), (product(A), i64::MAX)]).is_err());
        let many = (0..=MAX_RESERVATION_ITEMS as u128)
            .map(|n| (ProductId(uuid::Uuid::from_u128(n).to_string()), 1));
        assert!(ReservationItems::merge(many).is_err());
    }

    #[test]
    fn retries_get_the_existing_reservation_only_with_the_same_items() {
        let items = ReservationItems::merge([(product(A), 2)]).expect("valid");
        let other = ReservationItems::merge([(product(A), 3)]).expect("valid");
        for status in [
            ReservationStatus::Reserved,
            ReservationStatus::Committed,
            ReservationStatus::Released,
        ] {
            let existing = reservation(items.clone(), status);
            assert!(check_reserve_retry(&existing, &items).is_ok());
            let err = check_reserve_retry(&existing, &other).expect_err("other items");
            assert_eq!(err.kind(), ErrorKind::AlreadyExists);
            assert_eq!(
                err.message(),
                "reservation saga-1 exists with different items"
            );
        }
        let tombstone = reservation(ReservationItems::default(), ReservationStatus::Released);
        let err = check_reserve_retry(&tombstone, &items).expect_err("tombstone");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn transitions_out_of_final_states() {
        let id = ReservationId::parse("saga-1").expect("valid");
        assert!(check_release_of(&id, ReservationStatus::Released).is_ok());
        assert_eq!(
            check_release_of(&id, ReservationStatus::Committed).map_err(|e| e.kind()),
            Err(ErrorKind::Conflict)
        );
        assert!(check_commit_of(&id, Some(ReservationStatus::Committed)).is_ok());
        for (status, why) in [
            (ReservationStatus::Released, reason::RESERVATION_RELEASED),
            (ReservationStatus::Expired, reason::RESERVATION_EXPIRED),
        ] {
            let err = check_commit_of(&id, Some(status)).expect_err("not committable");
            assert_eq!(
                (err.kind(), err.reason()),
                (ErrorKind::FailedPrecondition, Some(why))
            );
        }
        assert!(check_release_of(&id, ReservationStatus::Expired).is_ok());
        assert_eq!(
            check_commit_of(&id, None).map_err(|e| e.kind()),
            Err(ErrorKind::NotFound)
        );
    }
}
