//! Validated values of the users domain. Each `parse` returns the reason a
//! value is rejected, phrased for the `BadRequest` field violation.

use std::fmt;

use argon2::Argon2;

pub use agora_platform::email::Email;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// A display name: trimmed, 1 to 100 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    /// Validates a name.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let name = raw.trim();
        if name.is_empty() {
            return Err("must not be empty");
        }
        if name.chars().count() > 100 {
            return Err("must be at most 100 characters");
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters");
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password as typed: 8 to 256 characters. The upper bound keeps hashing
/// cost bounded. Never logged: `Debug` is redacted.
#[derive(Clone)]
pub struct Password(String);

/// Passwords shorter than this are rejected.
pub const MIN_PASSWORD_CHARS: usize = 8;

impl Password {
    /// Validates a new password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let chars = raw.chars().count();
        if chars < MIN_PASSWORD_CHARS {
            return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
        }
        if chars > 256 {
            return Err("must be at most 256 characters".to_owned());
        }
        Ok(Self(raw.to_owned()))
    }

    /// Hashes with argon2id and a random salt (PHC string format). CPU-heavy:
    /// call it from a blocking thread.
    pub fn hash(&self) -> Result<String, argon2::password_hash::Error> {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Ok(Argon2::default()
            .hash_password(self.0.as_bytes(), &salt)?
            .to_string())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

/// Whether `password` matches a PHC hash. CPU-heavy, like [`Password::hash`].
pub fn verify_password(password: &str, phc_hash: &str) -> bool {
    PasswordHash::new(phc_hash)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_have_visible_text() {
        assert!(UserName::parse("   ").is_err());
        assert!(UserName::parse("Ada\u{7}").is_err());
        assert!(UserName::parse(&"x".repeat(101)).is_err());
        assert_eq!(
            UserName::parse(" Ada Lovelace ").map(|n| n.0),
            Ok("Ada Lovelace".into())
        );
    }

    #[test]
    fn passwords_have_bounds_and_hide_in_debug() {
        assert!(Password::parse("short").is_err());
        assert!(Password::parse(&"x".repeat(257)).is_err());
        let password = Password::parse("correct horse").expect("valid");
        assert!(!format!("{password:?}").contains("horse"));
    }

    #[test]
    fn hashes_verify_only_the_right_password() {
        let password = Password::parse("correct horse").expect("valid");
        let hash = password.hash().expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a phc string"));
    }
}
