//! Validated money amounts (`agora.common.v1.Money`).

use agora_proto::common::v1 as pb;

/// An amount in a currency's minor unit, with a validated ISO 4217 code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Money {
    /// Three upper-case ASCII letters, for example `EUR`.
    pub currency_code: String,
    /// Minor units (cents).
    pub amount_minor: i64,
}

impl Money {
    /// Validates a strictly positive amount (prices, charges): the message is
    /// the reason, for a `BadRequest` field violation.
    pub fn parse_positive(money: Option<&pb::Money>) -> Result<Self, &'static str> {
        let money = money.ok_or("is required")?;
        let code = money.currency_code.as_str();
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("currency_code must be three upper-case letters (ISO 4217), e.g. EUR");
        }
        if money.amount_minor <= 0 {
            return Err("amount_minor must be greater than 0");
        }
        Ok(Self {
            currency_code: code.to_owned(),
            amount_minor: money.amount_minor,
        })
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> pb::Money {
        pb::Money {
            currency_code: self.currency_code.clone(),
            amount_minor: self.amount_minor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(code: &str, amount: i64) -> pb::Money {
        pb::Money {
            currency_code: code.into(),
            amount_minor: amount,
        }
    }

    #[test]
    fn accepts_positive_amounts_in_iso_codes() {
        assert_eq!(
            Money::parse_positive(Some(&money("EUR", 1999))),
            Ok(Money {
                currency_code: "EUR".into(),
                amount_minor: 1999
            })
        );
    }

    #[test]
    fn rejects_missing_bad_codes_and_non_positive_amounts() {
        assert!(Money::parse_positive(None).is_err());
        assert!(Money::parse_positive(Some(&money("eur", 1))).is_err());
        assert!(Money::parse_positive(Some(&money("EURO", 1))).is_err());
        assert!(Money::parse_positive(Some(&money("EUR", 0))).is_err());
        assert!(Money::parse_positive(Some(&money("EUR", -5))).is_err());
    }
}
