//! The checkout saga's states and the reasons it fails, as data.
//!
//! ```text
//! RESERVING ──> CHARGING ──> CONFIRMING ──> COMMITTING ──> COMPLETED
//!     │            │  │           │              │
//!     │            │  └──────┐    │              └──> CANCEL_REFUNDING   (reservation expired)
//!     │            v         │    v                        │
//!     │        REFUNDING <───┼─ (deadline)                 v
//!     │            │         │                     CANCEL_RESTOCKING ──> CANCELLED
//!     v            v         │
//!  RELEASING <─────┴─────────┘ (declined: nothing to refund)
//!     │
//!     v
//!   FAILED
//! ```
//!
//! CancelOrder starts at CANCEL_REFUNDING from COMPLETED. Every running step
//! is one idempotent call to another service, keyed by the saga id and the
//! step ([`reservation_id`], [`payment_id`]), so a step whose outcome is
//! unknown (a timeout, a crash) is simply run again, or compensated.

use std::fmt;

/// Where a saga is. Stored as [`SagaStep::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SagaStep {
    /// Reserving the order's stock (inventory `ReserveStock`).
    Reserving,
    /// Charging the card (payments `Charge`).
    Charging,
    /// Marking the order COMPLETED (local, no call).
    Confirming,
    /// Turning the reservation into a sale (inventory `CommitReservation`).
    Committing,
    /// Compensating a charge that may have happened (payments `Refund`).
    Refunding,
    /// Compensating the reservation (inventory `ReleaseReservation`).
    Releasing,
    /// Cancelling a completed order: refunding its payment.
    CancelRefunding,
    /// Cancelling a completed order: returning its stock.
    CancelRestocking,
    /// Paid, stock committed, order COMPLETED. Terminal (until a cancel).
    Completed,
    /// Compensated, order FAILED. Terminal.
    Failed,
    /// Refunded and restocked, order CANCELLED. Terminal.
    Cancelled,
}

impl SagaStep {
    /// Every step.
    pub const ALL: [Self; 11] = [
        Self::Reserving,
        Self::Charging,
        Self::Confirming,
        Self::Committing,
        Self::Refunding,
        Self::Releasing,
        Self::CancelRefunding,
        Self::CancelRestocking,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserving => "RESERVING",
            Self::Charging => "CHARGING",
            Self::Confirming => "CONFIRMING",
            Self::Committing => "COMMITTING",
            Self::Refunding => "REFUNDING",
            Self::Releasing => "RELEASING",
            Self::CancelRefunding => "CANCEL_REFUNDING",
            Self::CancelRestocking => "CANCEL_RESTOCKING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// The step a stored value names.
    pub fn parse(stored: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|step| step.as_str() == stored)
    }

    /// Whether the saga is over: nothing more will be done (a COMPLETED
    /// order may still be cancelled, which starts the saga again).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Whether the saga is undoing a checkout that failed.
    pub fn is_compensating(self) -> bool {
        matches!(self, Self::Refunding | Self::Releasing | Self::Failed)
    }

    /// Whether the saga is cancelling a completed order (or has).
    pub fn is_cancelling(self) -> bool {
        matches!(
            self,
            Self::CancelRefunding | Self::CancelRestocking | Self::Cancelled
        )
    }
}

impl fmt::Display for SagaStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The inventory reservation of saga `id`.
pub fn reservation_id(saga_id: &str) -> String {
    format!("{saga_id}:reserve")
}

/// The payment (and the provider's idempotency key) of saga `id`.
pub fn payment_id(saga_id: &str) -> String {
    format!("{saga_id}:charge")
}

/// The stable reasons a checkout fails or an order is cancelled: the
/// `google.rpc.ErrorInfo.reason` of a failed PlaceOrder and an order's
/// `failure_code`. Part of the public contract: never rename one.
pub mod reason {
    /// A product has less stock than ordered.
    pub const INSUFFICIENT_STOCK: &str = "INSUFFICIENT_STOCK";
    /// A product does not exist (in the catalog or in inventory).
    pub const UNKNOWN_PRODUCT: &str = "UNKNOWN_PRODUCT";
    /// The card issuer declined the charge.
    pub const CARD_DECLINED: &str = "CARD_DECLINED";
    /// The card number is not a card number.
    pub const INVALID_CARD: &str = "INVALID_CARD";
    /// Payments could not be reached in time; nothing stays charged.
    pub const PAYMENT_UNAVAILABLE: &str = "PAYMENT_UNAVAILABLE";
    /// Inventory could not be reached in time; nothing was charged.
    pub const INVENTORY_UNAVAILABLE: &str = "INVENTORY_UNAVAILABLE";
    /// The catalog could not be reached to price the order.
    pub const CATALOG_UNAVAILABLE: &str = "CATALOG_UNAVAILABLE";
    /// The checkout ran past its deadline and was compensated.
    pub const CHECKOUT_TIMEOUT: &str = "CHECKOUT_TIMEOUT";
    /// The orders service restarted before the card was charged; the card
    /// number is never stored, so the checkout was compensated.
    pub const CHECKOUT_INTERRUPTED: &str = "CHECKOUT_INTERRUPTED";
    /// The stock reservation expired before it was committed and the stock
    /// had gone meanwhile; the order was refunded and cancelled.
    pub const RESERVATION_EXPIRED: &str = "RESERVATION_EXPIRED";
    /// The customer cancelled the order.
    pub const CANCELLED_BY_CUSTOMER: &str = "CANCELLED_BY_CUSTOMER";
    /// The payment was voided (refunded before it was charged) or is not
    /// a capture: nothing was charged.
    pub const PAYMENT_VOIDED: &str = "PAYMENT_VOIDED";
    /// Too many checkouts are in progress on this replica.
    pub const CHECKOUT_BUSY: &str = "CHECKOUT_BUSY";
    /// The request id was used before for an order with other items.
    pub const REQUEST_ID_REUSED: &str = "REQUEST_ID_REUSED";
    /// The products are priced in different currencies.
    pub const MIXED_CURRENCIES: &str = "MIXED_CURRENCIES";
}

/// How a call to another service ended, as the saga sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// It succeeded.
    Done,
    /// It was refused for good (declined, out of stock, invalid): the code
    /// and a message for the customer.
    Refused {
        /// A [`reason`] code.
        code: String,
        /// The other service's message.
        message: String,
    },
    /// It may or may not have happened (timeout, unavailable, crash): try
    /// again, or compensate.
    Unknown {
        /// What went wrong, for the log and the step history.
        message: String,
    },
}

impl CallOutcome {
    /// Classifies a gRPC status. `refused_reason` names the reason of a
    /// definitive refusal that carries none in its `ErrorInfo`.
    pub fn from_status(status: &tonic::Status, refused_reason: &str) -> Self {
        use tonic::Code;
        match status.code() {
            Code::Ok => Self::Done,
            Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::OutOfRange => Self::Refused {
                code: agora_platform::error::reason_of(status)
                    .unwrap_or_else(|| refused_reason.to_owned()),
                message: status.message().to_owned(),
            },
            // Everything else may succeed when tried again: unavailable,
            // deadline exceeded, aborted, exhausted, internal, and refused
            // credentials (a key rotation in progress, not the customer's
            // fault).
            _ => Self::Unknown {
                message: format!("{:?}: {}", status.code(), status.message()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_their_stored_form() {
        for step in SagaStep::ALL {
            assert_eq!(SagaStep::parse(step.as_str()), Some(step));
        }
        assert_eq!(SagaStep::parse("reserving"), None);
        let terminal: Vec<_> = SagaStep::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [SagaStep::Completed, SagaStep::Failed, SagaStep::Cancelled]
        );
    }

    #[test]
    fn step_keys_are_valid_ids_for_inventory_and_payments() {
        let id = "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b";
        assert_eq!(reservation_id(id), format!("{id}:reserve"));
        assert_eq!(payment_id(id), format!("{id}:charge"));
        assert!(payment_id(id).len() <= 128);
    }

    #[test]
    fn statuses_classify_into_done_refused_and_unknown() {
        let declined = tonic::Status::from(
            agora_platform::error::Error::new(
                agora_platform::error::ErrorKind::FailedPrecondition,
                "card declined",
            )
            .with_reason(reason::CARD_DECLINED),
        );
        assert_eq!(
            CallOutcome::from_status(&declined, reason::INSUFFICIENT_STOCK),
            CallOutcome::Refused {
                code: reason::CARD_DECLINED.into(),
                message: "card declined".into()
            }
        );
        let bare = tonic::Status::failed_precondition("short");
        assert!(matches!(
            CallOutcome::from_status(&bare, reason::INSUFFICIENT_STOCK),
            CallOutcome::Refused { code, .. } if code == reason::INSUFFICIENT_STOCK
        ));
        for status in [
            tonic::Status::unavailable("down"),
            tonic::Status::deadline_exceeded("slow"),
            tonic::Status::internal("bug"),
        ] {
            assert!(matches!(
                CallOutcome::from_status(&status, ""),
                CallOutcome::Unknown { .. }
            ));
        }
    }
}
