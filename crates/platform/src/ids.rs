//! Identifiers shared across services.

use std::fmt;

/// A user's id: a UUID in its canonical lower-case hyphenated form, so that
/// it compares equal to the `sub` of the user's tokens whatever spelling a
/// client sent. The nil UUID is not a user.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// Validates a user id (any UUID spelling except the nil UUID).
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        match uuid::Uuid::parse_str(raw.trim()) {
            Ok(id) if !id.is_nil() => Ok(Self(id.to_string())),
            _ => Err("must be a user id (UUID)"),
        }
    }

    /// The canonical id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_canonical_non_nil_uuids() {
        let id = "0190F5C2-1B2A-7C3D-8E4F-5A6B7C8D9E0F";
        assert_eq!(
            UserId::parse(id).map(|u| u.0),
            Ok("0190f5c2-1b2a-7c3d-8e4f-5a6b7c8d9e0f".to_owned())
        );
        assert!(UserId::parse("00000000-0000-0000-0000-000000000000").is_err());
        assert!(UserId::parse("ada").is_err());
    }
}
