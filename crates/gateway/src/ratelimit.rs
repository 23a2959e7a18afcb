//! Per-client rate limits at the edge: one token bucket per client, in a
//! bounded, sharded in-memory store.
//!
//! A client is its user id when the call carries a valid token, else its IP
//! address ([`ClientKey`]); IPv6 clients are keyed by their /64, since one
//! host usually owns a whole /64 and could otherwise rotate addresses at
//! will.
//!
//! # The bucket, as one integer
//!
//! Each bucket is kept as a *theoretical arrival time* (the generic cell rate
//! algorithm, GCRA), which is exactly a token bucket written differently: a
//! call costs one *interval* (`1 s / per_sec`), the bucket holds `burst`
//! tokens, and a client whose next theoretical arrival time is `tat` has
//! `(burst · interval − (tat − now)) / interval` tokens left. Nothing refills
//! in the background: a bucket is only ever read and bumped when its client
//! calls. Times are whole nanoseconds since the limiter was built, in `u64`
//! (584 years of range), with saturating arithmetic, so there is no
//! floating-point drift and no accumulated rounding: the only rounding is
//! the interval itself, rounded up once so a client never gets more than
//! `per_sec`.
//!
//! # Bounded memory
//!
//! At most `max_clients` buckets exist across all shards. When a shard is
//! full, it first forgets the buckets that have refilled to full (a full
//! bucket and no bucket are the same thing, so forgetting them changes
//! nothing); if that leaves too little room, it forgets the least recently
//! seen buckets. `Shard::make_room` explains the costs and the trade-off.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Shards of the bucket store: enough that the gateway's cores rarely wait
/// on the same lock, few enough that a shard still holds many clients (the
/// eviction scan is per shard).
const SHARDS: usize = 16;

/// Whom a rate limit applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An authenticated user, by user id: the same budget from every device
    /// and address.
    User(Arc<str>),
    /// An anonymous client, by address. IPv6 addresses are limited per /64
    /// and IPv4-mapped IPv6 addresses as the IPv4 address they carry (see
    /// [`ClientKey::normalized`]).
    Ip(IpAddr),
}

impl ClientKey {
    /// The key of an authenticated user.
    pub fn user(user_id: &str) -> Self {
        Self::User(Arc::from(user_id))
    }

    /// The key the limiter files this client under: an IPv4-mapped IPv6
    /// address (`::ffff:192.0.2.1`, what a dual-stack socket reports for an
    /// IPv4 peer) becomes its IPv4 address, and any other IPv6 address its
    /// /64 prefix with the interface bits zeroed. Without the first rule
    /// every IPv4 client of a dual-stack listener would share one /64
    /// bucket; without the second one host could rotate through 2^64
    /// addresses.
    pub fn normalized(&self) -> Cow<'_, ClientKey> {
        match self {
            Self::User(_) => Cow::Borrowed(self),
            Self::Ip(ip) => match ip.to_canonical() {
                IpAddr::V4(v4) if *ip == IpAddr::V4(v4) => Cow::Borrowed(self),
                IpAddr::V4(v4) => Cow::Owned(Self::Ip(IpAddr::V4(v4))),
                IpAddr::V6(v6) => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    let prefix = IpAddr::V6(Ipv6Addr::from(prefix));
                    if prefix == *ip {
                        Cow::Borrowed(self)
                    } else {
                        Cow::Owned(Self::Ip(prefix))
                    }
                }
            },
        }
    }
}

impl fmt::Display for ClientKey {
    /// `user:<id>` or `ip:<address>`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(id) => write!(f, "user:{id}"),
            Self::Ip(ip) => write!(f, "ip:{ip}"),
        }
    }
}

/// The rate and size of every client's bucket, in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// What one call costs: `1 s / per_sec`, rounded up.
    interval_ns: u64,
    /// How far ahead of now a client's theoretical arrival time may run:
    /// `burst` intervals, the bucket's size.
    capacity_ns: u64,
}

/// One client's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Theoretical arrival time: when the bucket will be full again,
    /// in nanoseconds since the limiter's epoch. At or before now: full.
    tat: u64,
    /// When the client last called (allowed or refused), for LRU eviction.
    last_seen: u64,
}

impl Bucket {
    /// Takes one token at `now`, or says how long until one is there.
    /// A refused call takes nothing: hammering does not dig the hole deeper,
    /// which keeps `retry_after` honest.
    fn take(&mut self, now: u64, limits: Limits) -> Result<(), Duration> {
        let tat = self.tat.max(now);
        let next = tat.saturating_add(limits.interval_ns);
        // `next >= now` because `tat >= now`: no underflow.
        let ahead = next - now;
        if ahead <= limits.capacity_ns {
            self.tat = next;
            Ok(())
        } else {
            Err(Duration::from_nanos(ahead - limits.capacity_ns))
        }
    }

    fn is_full(&self, now: u64) -> bool {
        self.tat <= now
    }
}

/// One lock's worth of buckets.
#[derive(Debug)]
struct Shard {
    buckets: HashMap<ClientKey, Bucket>,
    /// Buckets this shard may hold; the shards' capacities add up to
    /// `max_clients` exactly.
    capacity: usize,
    /// Free slots `make_room` leaves behind: an eighth of the shard (at
    /// least one), so a stream of new clients pays for two O(n) passes
    /// every `slack` arrivals (about 16 bucket visits per arrival) rather
    /// than on every arrival. The cost: under such a stream the least
    /// recently seen eighth of a shard is forgotten at once.
    slack: usize,
    /// `make_room`'s list of last-seen times, kept to reuse its allocation.
    scratch: Vec<u64>,
}

impl Shard {
    fn new(capacity: usize) -> Self {
        Self {
            buckets: HashMap::new(),
            capacity,
            slack: (capacity / 8).max(1),
            scratch: Vec::new(),
        }
    }

    fn check(&mut self, key: Cow<'_, ClientKey>, now: u64, limits: Limits) -> Result<(), Duration> {
        if let Some(bucket) = self.buckets.get_mut(key.as_ref()) {
            bucket.last_seen = bucket.last_seen.max(now);
            return bucket.take(now, limits);
        }
        if self.buckets.len() >= self.capacity {
            self.make_room(now);
        }
        // A new client starts with a full bucket (burst >= 1), so this call
        // is allowed; it is remembered so the next ones are counted.
        let mut bucket = Bucket {
            tat: now,
            last_seen: now,
        };
        let verdict = bucket.take(now, limits);
        self.buckets.insert(key.into_owned(), bucket);
        verdict
    }

    /// Frees at least `slack` slots.
    ///
    /// First every bucket that has refilled to full goes: a client without
    /// a bucket gets a full one, so forgetting these changes no decision.
    /// If that is not enough, the least recently seen buckets go, oldest
    /// first, found with one O(n) selection (no LRU list to maintain on the
    /// hot path, where every call would otherwise pay for it).
    ///
    /// The trade-off: forgetting a bucket that is not full forgives that
    /// client's debt (it comes back with a full burst). That is the price of
    /// bounded memory, and it is kept small: a limited client that keeps
    /// calling stays recent and in debt, while an attacker rotating
    /// addresses with one call each leaves buckets that are full again one
    /// interval later and go first. To push a limited client out, an
    /// attacker must keep a whole shard's worth of buckets (about
    /// `max_clients / 16`) in debt at once, spending at least one allowed
    /// call per bucket per interval, and even then the client regains only
    /// one burst per such flush. Memory never grows past `max_clients`
    /// whatever the traffic.
    fn make_room(&mut self, now: u64) {
        // One pass forgets the full buckets and notes when the others were
        // last seen, in case the oldest must go too.
        let mut seen = std::mem::take(&mut self.scratch);
        seen.clear();
        self.buckets.retain(|_, bucket| {
            let keep = !bucket.is_full(now);
            if keep {
                seen.push(bucket.last_seen);
            }
            keep
        });
        let target = self.capacity.saturating_sub(self.slack);
        if self.buckets.len() > target {
            let excess = self.buckets.len() - target;
            let (_, &mut cutoff, _) = seen.select_nth_unstable(excess - 1);
            // Everything seen before the cutoff goes, and as many seen
            // exactly at it as needed to reach `excess` (ties are common when
            // many clients arrive within one clock tick).
            let older = seen.iter().filter(|&&t| t < cutoff).count();
            let mut at_cutoff = excess - older;
            self.buckets.retain(|_, bucket| {
                if bucket.last_seen < cutoff {
                    false
                } else if bucket.last_seen == cutoff && at_cutoff > 0 {
                    at_cutoff -= 1;
                    false
                } else {
                    true
                }
            });
        }
        self.scratch = seen;
    }
}

/// Per-client token buckets, shared by all connections (`Arc<RateLimiter>`).
pub struct RateLimiter {
    /// `None`: rate limiting is off and every call is allowed.
    limits: Option<Limits>,
    /// Time zero of every bucket's nanosecond clock.
    epoch: Instant,
    /// Picks a client's shard; randomly keyed per process so nobody can
    /// aim their keys at one shard.
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl RateLimiter {
    /// A limiter allowing each client `per_sec` calls per second on average
    /// and `burst` at once after being idle, remembering at most
    /// `max_clients` clients.
    ///
    /// `per_sec == 0` turns rate limiting off: every call is allowed and
    /// nothing is stored. A `burst` of 0 is taken as 1 (a bucket that holds
    /// no token would refuse everyone), and a `max_clients` of 0 as 1.
    pub fn new(per_sec: u32, burst: u32, max_clients: usize) -> Self {
        Self::with_shards(per_sec, burst, max_clients, SHARDS)
    }

    /// [`RateLimiter::new`] with a given number of shards (tests use one to
    /// know which buckets compete for room).
    fn with_shards(per_sec: u32, burst: u32, max_clients: usize, shards: usize) -> Self {
        let limits = (per_sec > 0).then(|| {
            let interval_ns = 1_000_000_000u64.div_ceil(u64::from(per_sec));
            Limits {
                interval_ns,
                capacity_ns: interval_ns.saturating_mul(u64::from(burst.max(1))),
            }
        });
        let max_clients = max_clients.max(1);
        // Never more shards than clients, so every shard holds at least one
        // and the capacities (spread as evenly as possible) sum to
        // `max_clients` exactly.
        let count = if limits.is_some() {
            shards.clamp(1, max_clients)
        } else {
            0
        };
        let shards = (0..count)
            .map(|i| {
                let capacity = max_clients / count + usize::from(i < max_clients % count);
                Mutex::new(Shard::new(capacity))
            })
            .collect();
        Self {
            limits,
            epoch: Instant::now(),
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Whether calls are limited at all (`per_sec > 0`).
    pub fn is_enabled(&self) -> bool {
        self.limits.is_some()
    }

    /// Takes one token from `key`'s bucket now: `Ok(())` if the call may go
    /// ahead, else `Err(retry_after)`, how long until one token is there.
    pub fn check(&self, key: &ClientKey) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// [`RateLimiter::check`] at a given time (tests drive the clock).
    /// Times before the limiter was built count as the moment it was built.
    pub fn check_at(&self, key: &ClientKey, now: Instant) -> Result<(), Duration> {
        let Some(limits) = self.limits else {
            return Ok(());
        };
        let key = key.normalized();
        let now =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        self.shard(&key).check(key, now, limits)
    }

    /// Buckets currently remembered, across all shards (at most
    /// `max_clients`).
    pub fn tracked_clients(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).buckets.len())
            .sum()
    }

    fn shard(&self, key: &ClientKey) -> MutexGuard<'_, Shard> {
        // `shards` is not empty when limits are set (count >= 1). The cast
        // keeps the hash's low bits, which is all the modulo looks at.
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        lock(&self.shards[index])
    }

    #[cfg(test)]
    fn remembers(&self, key: &ClientKey) -> bool {
        let key = key.normalized();
        self.shard(&key).buckets.contains_key(key.as_ref())
    }
}

impl fmt::Debug for RateLimiter {
    /// The settings, not the (possibly huge) bucket store.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limits", &self.limits)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// Locks a shard. A panic while it was held cannot have left it
/// inconsistent (each update is a few plain stores into a `HashMap` that
/// stays valid), so a poisoned lock is used as is rather than taking the
/// gateway down.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(a: u8, b: u8, c: u8, d: u8) -> ClientKey {
        ClientKey::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn ip6(text: &str) -> ClientKey {
        ClientKey::Ip(text.parse().expect("test address"))
    }

    /// The n-th of many distinct IPv4 clients.
    fn nth_ip(n: u32) -> ClientKey {
        ClientKey::Ip(IpAddr::V4(Ipv4Addr::from(n)))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_is_allowed_then_calls_are_refused() {
        let limiter = RateLimiter::new(10, 5, 100);
        let t0 = Instant::now();
        let key = ip(192, 0, 2, 1);
        for i in 0..5 {
            assert_eq!(limiter.check_at(&key, t0), Ok(()), "call {i} of the burst");
        }
        assert!(limiter.check_at(&key, t0).is_err());
        // A refused call takes nothing: still refused, same wait.
        assert_eq!(limiter.check_at(&key, t0), Err(ms(100)));
    }

    #[test]
    fn tokens_refill_at_the_configured_rate() {
        let limiter = RateLimiter::new(10, 5, 100);
        let t0 = Instant::now();
        let key = ip(192, 0, 2, 1);
        for _ in 0..5 {
            assert_eq!(limiter.check_at(&key, t0), Ok(()));
        }
        // 250 ms at 10/s: two tokens, not three.
        let t1 = t0 + ms(250);
        assert_eq!(limiter.check_at(&key, t1), Ok(()));
        assert_eq!(limiter.check_at(&key, t1), Ok(()));
        assert!(limiter.check_at(&key, t1).is_err());
        // Idle for long: the bucket is full again, but holds only `burst`.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(limiter.check_at(&key, t2), Ok(()));
        }
        assert!(limiter.check_at(&key, t2).is_err());
    }

    #[test]
    fn retry_after_is_when_the_next_token_is_there() {
        let limiter = RateLimiter::new(4, 2, 100); // one token per 250 ms
        let t0 = Instant::now();
        let key = ClientKey::user("u-1");
        assert_eq!(limiter.check_at(&key, t0), Ok(()));
        assert_eq!(limiter.check_at(&key, t0), Ok(()));
        assert_eq!(limiter.check_at(&key, t0), Err(ms(250)));
        assert_eq!(limiter.check_at(&key, t0 + ms(100)), Err(ms(150)));
        // Just before: still refused by a nanosecond; at the instant: allowed.
        let wait = limiter
            .check_at(&key, t0 + ms(250) - Duration::from_nanos(1))
            .expect_err("one nanosecond early");
        assert_eq!(wait, Duration::from_nanos(1));
        assert_eq!(limiter.check_at(&key, t0 + ms(250)), Ok(()));
    }

    #[test]
    fn the_interval_rounds_up_so_the_rate_is_never_exceeded() {
        // 3/s does not divide a second in whole nanoseconds: each token
        // costs 333_333_334 ns, so a second after emptying the bucket the
        // third token is still two nanoseconds away.
        let limiter = RateLimiter::new(3, 3, 10);
        let t0 = Instant::now();
        let key = ip(192, 0, 2, 7);
        for _ in 0..3 {
            assert_eq!(limiter.check_at(&key, t0), Ok(()));
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.check_at(&key, t1), Ok(()));
        assert_eq!(limiter.check_at(&key, t1), Ok(()));
        assert_eq!(limiter.check_at(&key, t1), Err(Duration::from_nanos(2)));
    }

    #[test]
    fn zero_per_sec_disables_limiting() {
        let limiter = RateLimiter::new(0, 1, 10);
        assert!(!limiter.is_enabled());
        let key = ip(192, 0, 2, 1);
        for _ in 0..10_000 {
            assert_eq!(limiter.check(&key), Ok(()));
        }
        assert_eq!(limiter.tracked_clients(), 0);
    }

    #[test]
    fn zero_burst_still_allows_the_rate() {
        let limiter = RateLimiter::new(1, 0, 10);
        let t0 = Instant::now();
        let key = ip(192, 0, 2, 1);
        assert_eq!(limiter.check_at(&key, t0), Ok(()));
        assert_eq!(limiter.check_at(&key, t0), Err(Duration::from_secs(1)));
        assert_eq!(limiter.check_at(&key, t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn users_and_addresses_have_separate_buckets() {
        let limiter = RateLimiter::new(1, 1, 100);
        let t0 = Instant::now();
        let alice = ClientKey::user("alice");
        let bob = ClientKey::user("bob");
        let address = ip(192, 0, 2, 1);
        assert_eq!(limiter.check_at(&alice, t0), Ok(()));
        assert!(limiter.check_at(&alice, t0).is_err());
        // Same instant, other keys: untouched buckets.
        assert_eq!(limiter.check_at(&bob, t0), Ok(()));
        assert_eq!(limiter.check_at(&address, t0), Ok(()));
        assert!(limiter.check_at(&address, t0).is_err());
        // A user id that looks like an address is still a user.
        assert_eq!(limiter.check_at(&ClientKey::user("192.0.2.1"), t0), Ok(()));
        assert_eq!(limiter.tracked_clients(), 4);
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let limiter = RateLimiter::new(1, 1, 100);
        let t0 = Instant::now();
        assert_eq!(limiter.check_at(&ip6("2001:db8:1:2::1"), t0), Ok(()));
        // Another interface id in the same /64: same bucket, refused.
        assert!(
            limiter
                .check_at(&ip6("2001:db8:1:2:ffff:1:2:3"), t0)
                .is_err()
        );
        // The neighbouring /64: its own bucket.
        assert_eq!(limiter.check_at(&ip6("2001:db8:1:3::1"), t0), Ok(()));
        assert_eq!(limiter.tracked_clients(), 2);
    }

    #[test]
    fn ipv4_mapped_addresses_are_limited_as_ipv4() {
        let limiter = RateLimiter::new(1, 1, 100);
        let t0 = Instant::now();
        assert_eq!(limiter.check_at(&ip6("::ffff:192.0.2.1"), t0), Ok(()));
        assert!(limiter.check_at(&ip(192, 0, 2, 1), t0).is_err());
        // Another IPv4 client is not in the first one's /64.
        assert_eq!(limiter.check_at(&ip6("::ffff:192.0.2.2"), t0), Ok(()));
        assert_eq!(
            ip6("::ffff:192.0.2.1").normalized().as_ref(),
            &ip(192, 0, 2, 1)
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_million_distinct_clients() {
        let limiter = RateLimiter::new(100, 10, 1_000);
        let t0 = Instant::now();
        for n in 0..1_000_000u32 {
            // Half the run at one instant (no bucket refills: the LRU path),
            // half with time moving (full buckets are swept).
            let now = if n < 500_000 {
                t0
            } else {
                t0 + Duration::from_micros(u64::from(n))
            };
            assert_eq!(limiter.check_at(&nth_ip(n), now), Ok(()));
            if n % 50_000 == 0 {
                assert!(limiter.tracked_clients() <= 1_000);
            }
        }
        let tracked = limiter.tracked_clients();
        assert!(tracked <= 1_000, "{tracked} buckets");
        // And the store is used, not emptied on every arrival: each shard
        // keeps at least seven eighths of its room.
        assert!(tracked >= 870, "{tracked} buckets");
    }

    #[test]
    fn the_bound_is_exact_across_shards() {
        for max in [1, 7, 16, 17, 100] {
            let limiter = RateLimiter::new(1, 1, max);
            let t0 = Instant::now();
            for n in 0..10_000 {
                let _ = limiter.check_at(&nth_ip(n), t0);
            }
            let tracked = limiter.tracked_clients();
            assert!(tracked <= max, "max {max}: {tracked} buckets");
        }
    }

    #[test]
    fn full_buckets_are_forgotten_before_others() {
        // One shard of four, one token per second, two per burst.
        let limiter = RateLimiter::with_shards(1, 2, 4, 1);
        let t0 = Instant::now();
        let (b, a, c, d, e) = (
            ip(10, 0, 0, 2),
            ip(10, 0, 0, 1),
            ip(10, 0, 0, 3),
            ip(10, 0, 0, 4),
            ip(10, 0, 0, 5),
        );
        // B is the least recently seen and empties its bucket (full at t0+2s).
        assert_eq!(limiter.check_at(&b, t0), Ok(()));
        assert_eq!(limiter.check_at(&b, t0), Ok(()));
        // A takes one token later (full again at t0+1.5s); C, D empty theirs.
        let t1 = t0 + ms(500);
        assert_eq!(limiter.check_at(&a, t1), Ok(()));
        for key in [&c, &d] {
            assert_eq!(limiter.check_at(key, t1), Ok(()));
            assert_eq!(limiter.check_at(key, t1), Ok(()));
        }
        // At t0+1.6s the shard is full, A's bucket is full, B's is not.
        let t2 = t0 + ms(1_600);
        assert_eq!(limiter.check_at(&e, t2), Ok(()));
        assert!(!limiter.remembers(&a));
        assert!(limiter.remembers(&b));
        assert_eq!(limiter.tracked_clients(), 4);
        // B still owes: 1.6 tokens, so one call and not two.
        assert_eq!(limiter.check_at(&b, t2), Ok(()));
        assert!(limiter.check_at(&b, t2).is_err());
    }

    #[test]
    fn without_full_buckets_the_least_recently_seen_goes() {
        let limiter = RateLimiter::with_shards(1, 1, 3, 1);
        let t0 = Instant::now();
        let (a, b, c, d) = (
            ip(10, 0, 0, 1),
            ip(10, 0, 0, 2),
            ip(10, 0, 0, 3),
            ip(10, 0, 0, 4),
        );
        assert_eq!(limiter.check_at(&a, t0), Ok(()));
        assert_eq!(limiter.check_at(&b, t0 + ms(1)), Ok(()));
        assert_eq!(limiter.check_at(&c, t0 + ms(2)), Ok(()));
        // A is seen again (refused, but seen): B is now the oldest.
        assert!(limiter.check_at(&a, t0 + ms(3)).is_err());
        assert_eq!(limiter.check_at(&d, t0 + ms(4)), Ok(()));
        assert!(!limiter.remembers(&b));
        for kept in [&a, &c, &d] {
            assert!(limiter.remembers(kept), "{kept} forgotten");
        }
        assert_eq!(limiter.tracked_clients(), 3);
    }

    #[test]
    fn rotating_addresses_do_not_refill_a_limited_client() {
        // 1000/s, bursts of 1000: an emptied bucket owes a whole second,
        // while a one-call client is full again after one millisecond.
        let limiter = RateLimiter::new(1_000, 1_000, 1_600);
        let t0 = Instant::now();
        let victim = ClientKey::user("heavy");
        while limiter.check_at(&victim, t0).is_ok() {}
        // 100k addresses, one call each, 2 µs apart (200 ms in all).
        for n in 0..100_000u32 {
            let now = t0 + Duration::from_micros(2 * u64::from(n));
            assert_eq!(limiter.check_at(&nth_ip(n), now), Ok(()));
        }
        assert!(limiter.tracked_clients() <= 1_600);
        // Still in debt: 200 tokens back, not a fresh 1000.
        let after = t0 + ms(200);
        let mut allowed = 0;
        while limiter.check_at(&victim, after).is_ok() {
            allowed += 1;
        }
        assert!((199..=201).contains(&allowed), "{allowed} calls allowed");
    }

    #[test]
    fn the_limiter_is_shared_across_threads() {
        let limiter = Arc::new(RateLimiter::new(1, 100, 1_000));
        let t0 = Instant::now();
        let key = ClientKey::user("shared");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                let key = key.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| limiter.check_at(&key, t0).is_ok())
                        .count()
                })
            })
            .collect();
        let allowed: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        // 200 attempts against a burst of 100: exactly 100 allowed.
        assert_eq!(allowed, 100);
    }
}
