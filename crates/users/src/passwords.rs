//! Password hashing and verification, bounded.
//!
//! One argon2id hash or verification takes about 19 MiB (its memory cost)
//! and tens of milliseconds of one core. Unbounded, sixty concurrent logins
//! with unknown emails took the service from 28 MB to 1.2 GB resident, past
//! the 256 MiB its Kubernetes manifest allows. So every hash and every
//! verification, the one against the dummy hash for unknown emails included,
//! runs under one [`WorkLimiter`] (`config.passwords`: as many at once as
//! there are cores and as fit in a quarter of the memory limit, a bounded
//! waiting room, a bounded wait) and on the blocking thread pool, so that
//! the runtime's workers keep answering everything else. A caller beyond
//! that gets RESOURCE_EXHAUSTED, reason `PASSWORD_HASHING_BUSY`, with a
//! `google.rpc.RetryInfo`. Each running computation takes its working
//! memory from a pool of [`HashMemory`] buffers (at most one per slot,
//! allocated once and reused), never from a fresh 19 MiB allocation, which
//! fragments the allocator's heap until the process holds far more than the
//! slots' worth (see [`HashMemory`]).
//!
//! Passwords longer than `passwords.max_password_bytes` are refused before
//! any of it ([`Passwords::check_length`]), at login as well as at sign-up.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agora_platform::config::PasswordConfig;
use agora_platform::error::{Error, Result};
use agora_platform::work::{self, WorkLimiter};
use tokio::sync::OnceCell;

use crate::domain::{HashMemory, MIN_PASSWORD_CHARS, Password, verify_password_in};

/// The memory one argon2id hash or verification takes with the parameters
/// [`Password::hash`] uses (argon2's defaults: 19 MiB).
pub const BYTES_PER_HASH: u64 = argon2::Params::DEFAULT_M_COST as u64 * 1024;

/// The `ErrorInfo` reason when no hashing slot is free in time.
pub const BUSY_REASON: &str = "PASSWORD_HASHING_BUSY";

/// Hashes and verifies passwords under a [`WorkLimiter`]; refuses
/// over-long passwords. Cheap to clone: clones share the limiter.
#[derive(Clone, Debug)]
pub struct Passwords {
    limiter: WorkLimiter,
    /// Working memory of finished computations, for the next ones: never
    /// more buffers than the limiter has slots.
    memory: Arc<Mutex<Vec<HashMemory>>>,
    max_bytes: usize,
    /// A hash of a random password, verified against for unknown emails so
    /// that their answer costs what a wrong password costs.
    dummy_hash: Arc<OnceCell<String>>,
}

impl Passwords {
    /// Hashing bounded as `config` says; `max_concurrent_hashes = 0` sizes it
    /// with [`work::auto_permits`]. Logs the chosen size. Fails when
    /// `max_password_bytes` is too short for any valid password.
    pub fn from_config(config: &PasswordConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.max_password_bytes >= MIN_PASSWORD_CHARS,
            "passwords.max_password_bytes is {}: no password of at least {MIN_PASSWORD_CHARS} \
             characters would fit",
            config.max_password_bytes
        );
        let auto = config.max_concurrent_hashes == 0;
        let permits = if auto {
            work::auto_permits(BYTES_PER_HASH)
        } else {
            config.max_concurrent_hashes
        };
        let limiter = WorkLimiter::new(
            "password hashing",
            permits,
            config.max_waiting,
            Duration::from_millis(config.max_wait_ms),
        )
        // The limiter's default `RetryInfo` delay (`work::DEFAULT_RETRY_AFTER`,
        // one second) is a few hashes' time: kept.
        .with_reason(BUSY_REASON);
        tracing::info!(
            hashes_at_once = limiter.permits(),
            auto,
            memory_limit_mib = work::memory_limit().map(|bytes| bytes / (1024 * 1024)),
            max_waiting = config.max_waiting,
            max_wait_ms = config.max_wait_ms,
            max_password_bytes = config.max_password_bytes,
            "password hashing bounded"
        );
        Ok(Self {
            limiter,
            memory: Arc::new(Mutex::new(Vec::new())),
            max_bytes: config.max_password_bytes,
            dummy_hash: Arc::new(OnceCell::new()),
        })
    }

    /// How many hashes may run at once.
    pub fn hashes_at_once(&self) -> usize {
        self.limiter.permits()
    }

    /// The longest password accepted, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The reason a password typed at login is refused before any work:
    /// empty, or longer than [`Passwords::max_bytes`].
    pub fn check_length(&self, raw: &str) -> std::result::Result<(), String> {
        if raw.is_empty() {
            Err("must not be empty".to_owned())
        } else if raw.len() > self.max_bytes {
            Err(format!("must be at most {} bytes", self.max_bytes))
        } else {
            Ok(())
        }
    }

    /// Validates a new password ([`Password::parse`] with this limit).
    pub fn parse_new(&self, raw: &str) -> std::result::Result<Password, String> {
        Password::parse(raw, self.max_bytes)
    }

    /// The argon2id PHC string of `password`, computed under the limiter.
    pub async fn hash(&self, password: Password) -> Result<String> {
        self.run(move |memory| password.hash_in(memory))
            .await?
            .map_err(|err| Error::internal("hashing a password", err.to_string()))
    }

    /// Runs `job` under the limiter on a blocking thread, with a working
    /// memory from the pool (a new one only while the pool has fewer than
    /// the limiter's slots), given back when `job` is done.
    async fn run<T, F>(&self, job: F) -> Result<T>
    where
        F: FnOnce(&mut HashMemory) -> T + Send + 'static,
        T: Send + 'static,
    {
        let pool = Arc::clone(&self.memory);
        self.limiter
            .run_blocking(move || {
                let taken = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
                let mut memory = taken.unwrap_or_default();
                let result = job(&mut memory);
                pool.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(memory);
                result
            })
            .await
    }

    /// Whether `password` matches `phc_hash`; with no hash (an unknown
    /// email) it is verified against the dummy hash, at the same cost, and
    /// the answer is `false`. Under the limiter, like [`Passwords::hash`].
    pub async fn verify(&self, password: String, phc_hash: Option<String>) -> Result<bool> {
        let known = phc_hash.is_some();
        let hash = match phc_hash {
            Some(hash) => hash,
            None => self.dummy_hash().await?.clone(),
        };
        let matches = self
            .run(move |memory| verify_password_in(&password, &hash, memory))
            .await?;
        Ok(known && matches)
    }

    /// Computes the dummy hash now (at startup), so that the first logins
    /// with unknown emails cost what the others cost.
    pub async fn prepare(&self) -> Result<()> {
        self.dummy_hash().await.map(drop)
    }

    /// How many working memories the pool holds (none while in use).
    #[cfg(test)]
    fn pooled_buffers(&self) -> usize {
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The dummy hash, computed (under the limiter) by the first caller
    /// that needs it.
    async fn dummy_hash(&self) -> Result<&String> {
        self.dummy_hash
            .get_or_try_init(|| async {
                let random = Password::parse(&uuid::Uuid::new_v4().to_string(), usize::MAX)
                    .map_err(|reason| Error::internal("a dummy password", reason))?;
                self.hash(random).await
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passwords(max_password_bytes: usize) -> Passwords {
        let config = PasswordConfig {
            max_concurrent_hashes: 1,
            max_password_bytes,
            ..PasswordConfig::default()
        };
        Passwords::from_config(&config).expect("valid config")
    }

    #[test]
    fn the_size_is_configured_or_automatic_and_the_limit_must_fit_a_password() {
        assert_eq!(passwords(64).hashes_at_once(), 1);
        let auto = Passwords::from_config(&PasswordConfig::default()).expect("defaults");
        assert!(auto.hashes_at_once() >= 1);
        let too_short = PasswordConfig {
            max_password_bytes: MIN_PASSWORD_CHARS - 1,
            ..PasswordConfig::default()
        };
        assert!(Passwords::from_config(&too_short).is_err());
    }

    #[test]
    fn lengths_are_counted_in_bytes() {
        let passwords = passwords(16);
        assert!(passwords.check_length(&"é".repeat(8)).is_ok());
        assert!(passwords.check_length(&"é".repeat(9)).is_err());
        assert!(passwords.check_length("").is_err());
        assert!(passwords.parse_new(&"é".repeat(8)).is_ok());
        assert!(passwords.parse_new(&"é".repeat(9)).is_err());
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_match() {
        let passwords = passwords(64);
        assert_eq!(passwords.pooled_buffers(), 0);
        let hash = passwords
            .hash(passwords.parse_new("correct horse").expect("valid"))
            .await
            .expect("hash");
        assert!(
            passwords
                .verify("correct horse".into(), Some(hash.clone()))
                .await
                .expect("verified")
        );
        assert!(
            !passwords
                .verify("wrong horse".into(), Some(hash))
                .await
                .expect("verified")
        );
        assert!(
            !passwords
                .verify("correct horse".into(), None)
                .await
                .expect("verified against the dummy")
        );
        assert!(
            passwords
                .dummy_hash()
                .await
                .expect("computed")
                .starts_with("$argon2id$")
        );
        // One slot: every computation reused the one buffer.
        assert_eq!(passwords.pooled_buffers(), 1);
    }
}
