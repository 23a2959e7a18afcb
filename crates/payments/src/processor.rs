//! The simulated card provider.
//!
//! Real payment providers publish test cards whose outcome is fixed; this
//! one behaves the same way, inside the service, so that the whole checkout
//! can run without a network or an account:
//!
//! | card number                 | outcome                                       |
//! |-----------------------------|-----------------------------------------------|
//! | `4242424242424242`          | approved                                      |
//! | `4000000000000002`          | declined: `card declined: insufficient funds` |
//! | any other Luhn-valid number | approved                                      |
//!
//! Every call is an "operation at the provider"; the store writes one ledger
//! row for each, which is how tests prove a card was charged exactly once.

use crate::domain::{CardNumber, Payment};

/// The test card that is always approved.
pub const SUCCEEDING_CARD: &str = "4242424242424242";

/// The test card that is always declined.
pub const DECLINED_CARD: &str = "4000000000000002";

/// Why [`DECLINED_CARD`] is declined.
pub const INSUFFICIENT_FUNDS: &str = "card declined: insufficient funds";

/// What the provider answered to a charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    /// The card was charged; `reference` is the provider's id of the charge.
    Approved {
        /// The provider's id of the charge, for the ledger.
        reference: String,
    },
    /// The card was declined, nothing was charged.
    Declined {
        /// The provider's id of the declined attempt, for the ledger.
        reference: String,
        /// Why, as shown to the payer.
        reason: String,
    },
}

/// The simulated provider. Stateless: its books are the service's ledger.
#[derive(Clone, Copy, Debug, Default)]
pub struct CardProcessor;

impl CardProcessor {
    /// Charges `card`. Call it once per payment: the store makes sure of that.
    pub fn authorize(&self, card: &CardNumber) -> Authorization {
        if card.is(DECLINED_CARD) {
            Authorization::Declined {
                reference: provider_reference("dc"),
                reason: INSUFFICIENT_FUNDS.to_owned(),
            }
        } else {
            Authorization::Approved {
                reference: provider_reference("ch"),
            }
        }
    }

    /// Refunds a successful `payment` in full; returns the provider's id of
    /// the refund. Simulated refunds never fail.
    pub fn refund(&self, _payment: &Payment) -> String {
        provider_reference("re")
    }
}

/// A provider-style id such as `ch_0190...`, unique per operation.
fn provider_reference(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(number: &str) -> CardNumber {
        CardNumber::parse(number).expect("valid test card")
    }

    #[test]
    fn test_cards_have_fixed_outcomes() {
        let processor = CardProcessor;
        assert!(matches!(
            processor.authorize(&card(SUCCEEDING_CARD)),
            Authorization::Approved { reference } if reference.starts_with("ch_")
        ));
        assert!(matches!(
            processor.authorize(&card("4000 0000 0000 0002")),
            Authorization::Declined { reason, .. } if reason == INSUFFICIENT_FUNDS
        ));
        assert!(matches!(
            processor.authorize(&card("5555555555554444")),
            Authorization::Approved { .. }
        ));
    }
}
