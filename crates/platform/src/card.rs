//! The one definition of a valid card number, shared by every service that
//! takes one: orders refuses a mistyped card before it creates an order, and
//! payments charges only a number that passed the same rule.

use std::fmt;

/// The fewest digits a card number may have.
pub const MIN_CARD_DIGITS: usize = 12;
/// The most digits a card number may have.
pub const MAX_CARD_DIGITS: usize = 19;

/// A card number: 12 to 19 digits passing the Luhn check, with the spaces
/// and dashes people type removed.
///
/// It lives only as long as the request that carried it: it is never
/// stored, logged or shown. `Debug` prints the last four digits only, and
/// there is no `Display`; no reason [`CardNumber::parse`] gives repeats the
/// number.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber {
    digits: String,
}

impl CardNumber {
    /// Validates a card number. The reasons never include the number.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let mut digits = String::with_capacity(MAX_CARD_DIGITS);
        for c in raw.chars().filter(|c| !matches!(c, ' ' | '-')) {
            if !c.is_ascii_digit() {
                return Err("must contain only digits, spaces and dashes");
            }
            if digits.len() == MAX_CARD_DIGITS {
                // Stop early: an oversized input is not worth copying.
                return Err("must be 12 to 19 digits");
            }
            digits.push(c);
        }
        if digits.is_empty() {
            return Err("must not be empty");
        }
        if digits.len() < MIN_CARD_DIGITS {
            return Err("must be 12 to 19 digits");
        }
        if !passes_luhn(&digits) {
            return Err("is not a valid card number (the Luhn check fails)");
        }
        Ok(Self { digits })
    }

    /// The last four digits, the only part of the number that may be kept.
    pub fn last4(&self) -> &str {
        self.digits
            .get(self.digits.len().saturating_sub(4)..)
            .unwrap_or_default()
    }

    /// Whether this is the given number (digits only, as a test card is
    /// written), without handing the number out.
    pub fn is(&self, digits: &str) -> bool {
        self.digits == digits
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardNumber(**** {})", self.last4())
    }
}

/// The Luhn (mod 10) check of a string of ASCII digits: from the right, every
/// second digit is doubled (minus 9 when above 9) and the sum must end in 0.
pub fn passes_luhn(digits: &str) -> bool {
    let mut sum = 0u32;
    for (position, byte) in digits.bytes().rev().enumerate() {
        if !byte.is_ascii_digit() {
            return false;
        }
        let mut digit = u32::from(byte - b'0');
        if position % 2 == 1 {
            digit *= 2;
            if digit > 9 {
                digit -= 9;
            }
        }
        sum += digit;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_real_test_cards_and_rejects_typos() {
        for good in [
            "4242424242424242",
            "4000000000000002",
            "5555555555554444",
            "378282246310005",
            "6011111111111117",
            "4222222222222",
        ] {
            assert!(passes_luhn(good), "{good} passes");
        }
        for bad in [
            "4242424242424241",
            "4242424242424224",
            "1234567890123",
            "",
            "42a2",
        ] {
            assert!(!passes_luhn(bad), "{bad:?} fails");
        }
    }

    #[test]
    fn card_numbers_ignore_spaces_and_dashes_only() {
        let card = CardNumber::parse("4242 4242-4242 4242").expect("valid");
        assert_eq!(card.digits, "4242424242424242");
        assert!(card.is("4242424242424242"));
        assert!(!card.is("4242 4242-4242 4242"));
        assert_eq!(card.last4(), "4242");
        assert!(CardNumber::parse("4242\t4242424242424242").is_err());
        assert!(CardNumber::parse("4242.4242.4242.4242").is_err());
    }

    #[test]
    fn card_numbers_have_12_to_19_digits() {
        assert_eq!(CardNumber::parse(""), Err("must not be empty"));
        assert_eq!(CardNumber::parse(" - "), Err("must not be empty"));
        // 11 and 20 digits, both Luhn-valid, are still the wrong length.
        assert!(passes_luhn("42424242420"));
        assert_eq!(
            CardNumber::parse("42424242420"),
            Err("must be 12 to 19 digits")
        );
        assert!(passes_luhn("42424242424242424242"));
        assert_eq!(
            CardNumber::parse("42424242424242424242"),
            Err("must be 12 to 19 digits")
        );
        assert_eq!(
            CardNumber::parse(&"4".repeat(100_000)),
            Err("must be 12 to 19 digits")
        );
        assert!(CardNumber::parse("4222222222222").is_ok(), "13 digits");
        assert!(CardNumber::parse("4242424242424242").is_ok());
    }

    #[test]
    fn card_numbers_never_show_in_reasons_or_debug() {
        let reason = CardNumber::parse("4242424242424241").expect_err("luhn");
        assert!(!reason.contains("4242"));
        let card = CardNumber::parse("4000 0000 0000 0002").expect("valid");
        assert_eq!(format!("{card:?}"), "CardNumber(**** 0002)");
        assert_eq!(format!("{card:#?}"), "CardNumber(**** 0002)");
        assert!(!format!("{:?}", Some(&card)).contains("4000000000000002"));
    }
}
