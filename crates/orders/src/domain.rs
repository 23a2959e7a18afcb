//! The orders domain: an order, its lifecycle, and the validated input a new
//! order is made from. Field names in violations follow `PlaceOrderRequest`
//! (`request_id`, `items[1].quantity`) so the checkout can pass them through.

use std::fmt;

use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::money::Money;

/// Where an order is in its lifecycle.
///
/// ```text
/// PENDING ──> COMPLETED ──> CANCELLED
///    │
///    └──────> FAILED
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    /// The checkout saga is running.
    Pending,
    /// Paid and stock committed; can still be cancelled.
    Completed,
    /// Cancelled after completion and refunded. Terminal.
    Cancelled,
    /// The checkout failed and was compensated. Terminal.
    Failed,
}

impl OrderStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [Self; 4] = [
        Self::Pending,
        Self::Completed,
        Self::Cancelled,
        Self::Failed,
    ];

    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Completed => "COMPLETED",
            Self::Cancelled => "CANCELLED",
            Self::Failed => "FAILED",
        }
    }

    /// The status a stored value names.
    pub fn parse(stored: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == stored)
    }

    /// Whether the checkout is over: COMPLETED, CANCELLED or FAILED. A watch
    /// ends at such a status. COMPLETED can still be cancelled later, but that
    /// is a new action of the user's, not the progress being watched.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending)
    }

    /// Whether an order in this status may move to `next`. Staying in the
    /// same status is not a move (the store treats it as a no-op).
    pub fn can_become(self, next: Self) -> bool {
        matches!(
            (self, next),
            (Self::Pending, Self::Completed)
                | (Self::Pending, Self::Failed)
                | (Self::Completed, Self::Cancelled)
        )
    }

    /// Whether orders in this status carry a `failure_reason`.
    pub fn has_reason(self) -> bool {
        matches!(self, Self::Cancelled | Self::Failed)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of an order: a product, how many, and its price per unit when
/// the order was placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderItem {
    /// The catalog product.
    pub product_id: String,
    /// Units; greater than 0.
    pub quantity: i64,
    /// Price of one unit, in the order's currency.
    pub unit_price: Money,
}

impl OrderItem {
    /// The protobuf view of the line, as the API and the events show it.
    pub fn to_proto(&self) -> agora_proto::orders::v1::OrderItem {
        agora_proto::orders::v1::OrderItem {
            product_id: self.product_id.clone(),
            quantity: self.quantity,
            unit_price: Some(self.unit_price.to_proto()),
        }
    }
}

/// An order as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    /// UUIDv7, assigned when the order is created.
    pub id: String,
    /// The user who placed it; the only one who may watch it.
    pub user_id: String,
    /// The client's idempotency key: unique per user.
    pub request_id: String,
    /// The lines, in the order they were placed.
    pub items: Vec<OrderItem>,
    /// Sum of quantity × unit price over the lines.
    pub total: Money,
    /// Where the order is in its lifecycle.
    pub status: OrderStatus,
    /// Why it failed or was cancelled; empty otherwise.
    pub failure_reason: String,
    /// The stable code of `failure_reason` (`CARD_DECLINED` ...); empty
    /// otherwise.
    pub failure_code: String,
    /// Creation time, microseconds since the epoch.
    pub created_at: i64,
    /// Time of the last status change (or creation), microseconds since the
    /// epoch; strictly increases with every change, so watchers can tell.
    pub updated_at: i64,
}

/// At most this many lines per order; keeps one order one bounded write.
pub const MAX_ITEMS: usize = 100;
/// At most this many units of one line.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Request ids and product ids are at most this many characters.
pub const MAX_ID_CHARS: usize = 128;
/// Failure reasons are cut to this many characters when stored.
pub const MAX_FAILURE_REASON_CHARS: usize = 500;

/// What a new order is made from (the checkout saga builds it from a
/// `PlaceOrderRequest` and catalog prices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOrder {
    /// The user placing the order.
    pub user_id: String,
    /// The client's idempotency key.
    pub request_id: String,
    /// The lines; every unit price must be in `currency`.
    pub items: Vec<OrderItem>,
    /// ISO 4217 code of the order, for example `EUR`.
    pub currency: String,
}

impl NewOrder {
    /// Checks every field and returns the order total, or INVALID_ARGUMENT
    /// naming every bad field (`items[1].quantity`, `request_id`, ...).
    pub fn validate(&self) -> Result<Money> {
        let mut violations = Violations::default();
        violations.check("user_id", check_identifier(&self.user_id));
        violations.check("request_id", check_identifier(&self.request_id));
        let currency_ok =
            self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase());
        if !currency_ok {
            violations.add(
                "currency",
                "must be three upper-case letters (ISO 4217), e.g. EUR",
            );
        }
        if self.items.is_empty() {
            violations.add("items", "must have at least one item");
        }
        let too_many = self.items.len() > MAX_ITEMS;
        if too_many {
            violations.add("items", format!("must have at most {MAX_ITEMS} items"));
        }
        // Past the maximum count no line is looked at: one violation for the
        // list, not one (or three) per line of a list of any length.
        let lines = if too_many { &[][..] } else { &self.items[..] };
        let mut total: Option<i64> = Some(0);
        for (index, item) in lines.iter().enumerate() {
            let field = |name: &str| format!("items[{index}].{name}");
            violations.check(&field("product_id"), check_identifier(&item.product_id));
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                violations.add(
                    field("quantity"),
                    format!("must be between 1 and {MAX_QUANTITY}"),
                );
            }
            let price = &item.unit_price;
            violations.check(
                &field("unit_price"),
                Money::parse_positive(Some(&price.to_proto())),
            );
            if currency_ok && price.currency_code != self.currency {
                violations.add(
                    field("unit_price.currency_code"),
                    format!("must be the order currency {}", self.currency),
                );
            }
            total = total.and_then(|sum| {
                item.quantity
                    .checked_mul(price.amount_minor)?
                    .checked_add(sum)
            });
        }
        if total.is_none() {
            violations.add("items", "total is too large");
        }
        violations.finish()?;
        let amount_minor = total
            .ok_or_else(|| Error::new(ErrorKind::Internal, "order total overflowed unnoticed"))?;
        Ok(Money {
            currency_code: self.currency.clone(),
            amount_minor,
        })
    }
}

/// Request and product ids: non-empty, bounded, printable.
pub(crate) fn check_identifier(raw: &str) -> std::result::Result<(), String> {
    if raw.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    if raw.chars().count() > MAX_ID_CHARS {
        return Err(format!("must be at most {MAX_ID_CHARS} characters"));
    }
    if raw.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

/// A failure reason as stored: trimmed and cut to
/// [`MAX_FAILURE_REASON_CHARS`], since it comes from other services' errors.
pub fn failure_reason(raw: &str) -> String {
    raw.trim().chars().take(MAX_FAILURE_REASON_CHARS).collect()
}

/// Parses an order id (a UUID in any of its spellings) into its canonical
/// lower-case hyphenated form.
pub fn parse_order_id(raw: &str) -> std::result::Result<String, &'static str> {
    uuid::Uuid::parse_str(raw.trim())
        .map(|id| id.to_string())
        .map_err(|_| "must be an order id (UUID)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(amount_minor: i64) -> Money {
        Money {
            currency_code: "EUR".into(),
            amount_minor,
        }
    }

    fn item(product_id: &str, quantity: i64, unit_price: Money) -> OrderItem {
        OrderItem {
            product_id: product_id.into(),
            quantity,
            unit_price,
        }
    }

    fn order(items: Vec<OrderItem>) -> NewOrder {
        NewOrder {
            user_id: "u1".into(),
            request_id: "r1".into(),
            items,
            currency: "EUR".into(),
        }
    }

    fn fields(err: &Error) -> Vec<&str> {
        err.violations().iter().map(|(f, _)| f.as_str()).collect()
    }

    #[test]
    fn statuses_round_trip_their_stored_form() {
        for status in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(OrderStatus::parse("pending"), None);
        assert_eq!(OrderStatus::parse(""), None);
    }

    #[test]
    fn only_the_documented_moves_are_allowed() {
        use OrderStatus::*;
        let allowed = [
            (Pending, Completed),
            (Pending, Failed),
            (Completed, Cancelled),
        ];
        for from in OrderStatus::ALL {
            for to in OrderStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert!(!Pending.is_terminal());
        assert!(Completed.is_terminal() && Cancelled.is_terminal() && Failed.is_terminal());
        assert!(Failed.has_reason() && Cancelled.has_reason() && !Completed.has_reason());
    }

    #[test]
    fn totals_sum_quantity_times_price() {
        let new = order(vec![item("p1", 2, eur(150)), item("p2", 1, eur(999))]);
        assert_eq!(new.validate().ok(), Some(eur(1299)));
    }

    #[test]
    fn every_bad_field_is_named() {
        let new = NewOrder {
            user_id: String::new(),
            request_id: "x".repeat(129),
            items: vec![
                item("p1", 1, eur(100)),
                item("", 0, eur(-1)),
                item(
                    "p3\u{0}",
                    1,
                    Money {
                        currency_code: "USD".into(),
                        amount_minor: 5,
                    },
                ),
            ],
            currency: "EUR".into(),
        };
        let err = new.validate().expect_err("bad order");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            fields(&err),
            [
                "user_id",
                "request_id",
                "items[1].product_id",
                "items[1].quantity",
                "items[1].unit_price",
                "items[2].product_id",
                "items[2].unit_price.currency_code",
            ]
        );
    }

    #[test]
    fn empty_oversized_and_overflowing_orders_are_rejected() {
        let err = order(vec![]).validate().expect_err("empty");
        assert_eq!(fields(&err), ["items"]);
        let many = vec![item("p", 1, eur(1)); MAX_ITEMS + 1];
        assert_eq!(
            fields(&order(many).validate().expect_err("many")),
            ["items"]
        );
        let huge = vec![item("p", MAX_QUANTITY, eur(i64::MAX / 2)); 3];
        assert_eq!(
            fields(&order(huge).validate().expect_err("overflow")),
            ["items"]
        );
        let mut bad_currency = order(vec![item("p", 1, eur(1))]);
        bad_currency.currency = "eur".into();
        assert_eq!(
            fields(&bad_currency.validate().expect_err("currency")),
            ["currency"]
        );
    }

    /// Past the maximum count, no item is looked at: a hundred thousand
    /// bad lines give one violation for the list, not one per line.
    #[test]
    fn too_many_items_stop_validation_early() {
        let mut many = order(vec![item("", 0, eur(-1)); 100_000]);
        many.user_id = String::new();
        let err = many.validate().expect_err("too many");
        assert_eq!(fields(&err), ["user_id", "items"]);
        assert!(err.violations().iter().all(|(_, d)| d.len() < 100));
    }

    /// The limits the contract declares (checked by every server before
    /// the handler) agree with the ones validated here.
    #[test]
    fn the_contract_declares_the_same_limits() {
        use agora_platform::limits::LimitsTable;
        let table = agora_platform::access::AccessTable::contract().expect("contract");
        let pool = table.pool();
        let limits = |message: &str, field: &str| {
            let field = pool
                .get_message_by_name(message)
                .and_then(|m| m.get_field_by_name(field))
                .unwrap_or_else(|| panic!("{message}.{field}"));
            LimitsTable::limits_of(pool, &field)
        };
        let request = "agora.orders.v1.PlaceOrderRequest";
        let max_items = u32::try_from(MAX_ITEMS).expect("small");
        let max_id = u32::try_from(MAX_ID_CHARS).expect("small");
        assert_eq!(limits(request, "items").max_items, Some(max_items));
        assert_eq!(limits(request, "request_id").max_bytes, Some(max_id));
        assert_eq!(
            limits("agora.orders.v1.LineItem", "product_id").max_bytes,
            Some(max_id)
        );
    }

    #[test]
    fn order_ids_are_uuids_in_canonical_form() {
        assert_eq!(
            parse_order_id(" 0190A5B2-7C3D-7E4F-8A9B-0C1D2E3F4A5B "),
            Ok("0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b".to_owned())
        );
        for bad in ["", "42", "x'; DROP TABLE orders; --", &"a".repeat(10_000)] {
            assert!(parse_order_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn failure_reasons_are_trimmed_and_bounded() {
        assert_eq!(failure_reason("  card declined \n"), "card declined");
        assert_eq!(
            failure_reason(&"é".repeat(1000)).chars().count(),
            MAX_FAILURE_REASON_CHARS
        );
    }
}
