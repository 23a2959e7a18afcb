//! Validated values of the users domain. Each `parse` returns the reason a
//! value is rejected, phrased for the `BadRequest` field violation.

use std::fmt;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHasher, PasswordVerifier, Version};

pub use agora_platform::email::Email;

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

/// A password as typed: at least 8 characters and at most the configured
/// number of bytes (`passwords.max_password_bytes`), so that no request
/// makes the service hash a megabyte. Never logged: `Debug` is redacted.
#[derive(Clone)]
pub struct Password(String);

/// Passwords shorter than this are rejected.
pub const MIN_PASSWORD_CHARS: usize = 8;

impl Password {
    /// Validates a new password of at most `max_bytes` bytes (UTF-8).
    pub fn parse(raw: &str, max_bytes: usize) -> Result<Self, String> {
        // The byte length first: a megabyte is refused without counting it.
        if raw.len() > max_bytes {
            return Err(format!("must be at most {max_bytes} bytes"));
        }
        if raw.chars().count() < MIN_PASSWORD_CHARS {
            return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Hashes with argon2id (argon2's default parameters) and a random salt,
    /// in PHC string format, allocating its 19 MiB of working memory. CPU-
    /// and memory-heavy: the service calls [`Password::hash_in`] through
    /// [`crate::passwords::Passwords`], which bounds how many run at once.
    pub fn hash(&self) -> Result<String, argon2::password_hash::Error> {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Ok(Argon2::default()
            .hash_password(self.0.as_bytes(), &salt)?
            .to_string())
    }

    /// [`Password::hash`] with `memory` as argon2's working memory instead
    /// of a fresh allocation.
    pub fn hash_in(&self, memory: &mut HashMemory) -> Result<String, argon2::password_hash::Error> {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let params = Params::default();
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let output = compute_in(&argon2, &self.0, salt.as_salt(), output_len, memory)?;
        Ok(PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params)?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        }
        .to_string())
    }
}

/// Working memory for one argon2 computation with the default parameters
/// (19 MiB), allocated once and reused.
///
/// Allocating and freeing 19 MiB per hash, from many blocking threads,
/// fragments the C allocator's heap: small allocations land in the freed
/// holes, the next 19 MiB no longer fits, and the heap grows. Measured with
/// two hashes at once, sixty logins left the process at about 500 MiB
/// resident. With one `HashMemory` per hashing slot, the memory argon2 uses
/// is exactly slots x 19 MiB, for good.
pub struct HashMemory(Vec<Block>);

impl HashMemory {
    /// Allocates (and touches) the memory of one computation.
    pub fn new() -> Self {
        Self(vec![Block::default(); Params::default().block_count()])
    }
}

impl Default for HashMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HashMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HashMemory({} blocks)", self.0.len())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

/// Whether `password` matches a PHC hash. As heavy as [`Password::hash`]:
/// the service calls [`verify_password_in`] through
/// [`crate::passwords::Passwords`].
pub fn verify_password(password: &str, phc_hash: &str) -> bool {
    PasswordHash::new(phc_hash)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// [`verify_password`] with `memory` as argon2's working memory. A hash
/// whose parameters need more memory than that (none that this service
/// makes) is verified with an allocation of its own.
pub fn verify_password_in(password: &str, phc_hash: &str, memory: &mut HashMemory) -> bool {
    let Ok(hash) = PasswordHash::new(phc_hash) else {
        return false;
    };
    let computed = (|| -> Result<bool, argon2::password_hash::Error> {
        let algorithm = Algorithm::try_from(hash.algorithm)?;
        let version = hash
            .version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let params = Params::try_from(&hash)?;
        let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
            return Ok(false);
        };
        if params.block_count() > memory.0.len() {
            return Ok(verify_password(password, phc_hash));
        }
        let argon2 = Argon2::new(algorithm, version, params);
        let output = compute_in(&argon2, password, salt, expected.len(), memory)?;
        // `Output`'s equality is constant-time.
        Ok(output == expected)
    })();
    computed.unwrap_or(false)
}

/// The argon2 output of `password` with `salt`, `output_len` bytes long,
/// computed in `memory`: the one computation behind hashing and verifying.
fn compute_in(
    argon2: &Argon2<'_>,
    password: &str,
    salt: argon2::password_hash::Salt<'_>,
    output_len: usize,
    memory: &mut HashMemory,
) -> Result<Output, argon2::password_hash::Error> {
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
    Output::init_with(output_len, |out| {
        Ok(argon2.hash_password_into_with_memory(
            password.as_bytes(),
            salt_bytes,
            out,
            &mut memory.0,
        )?)
    })
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
        assert!(Password::parse("short", 128).is_err());
        assert!(Password::parse(&"x".repeat(129), 128).is_err());
        assert!(Password::parse(&"x".repeat(128), 128).is_ok());
        // Bytes, not characters: 65 two-byte characters are 130 bytes.
        assert!(Password::parse(&"é".repeat(65), 128).is_err());
        let password = Password::parse("correct horse", 128).expect("valid");
        assert!(!format!("{password:?}").contains("horse"));
    }

    #[test]
    fn hashes_verify_only_the_right_password() {
        let password = Password::parse("correct horse", 128).expect("valid");
        let hash = password.hash().expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a phc string"));
    }

    #[test]
    fn reused_memory_hashes_and_verifies_like_a_fresh_allocation() {
        let mut memory = HashMemory::new();
        let password = Password::parse("correct horse", 128).expect("valid");
        // Made in reused memory, checked by the allocating verifier, and back.
        let hash = password.hash_in(&mut memory).expect("hash");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_password("correct horse", &hash));
        let again = password.hash_in(&mut memory).expect("hash");
        assert_ne!(hash, again, "a fresh salt each time");
        let fresh = password.hash().expect("hash");
        for phc in [&hash, &again, &fresh] {
            assert!(verify_password_in("correct horse", phc, &mut memory));
            assert!(!verify_password_in("wrong horse", phc, &mut memory));
        }
        assert!(!verify_password_in(
            "correct horse",
            "not a phc string",
            &mut memory
        ));
        // A hash made with more memory than the reused buffer holds.
        let big = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(32 * 1024, 1, 1, None).expect("params"),
        )
        .hash_password(
            b"correct horse",
            &SaltString::from_b64("c29tZXNhbHQxMjM0").expect("salt"),
        )
        .expect("hash")
        .to_string();
        assert!(verify_password_in("correct horse", &big, &mut memory));
        assert!(!verify_password_in("wrong horse", &big, &mut memory));
    }
}
