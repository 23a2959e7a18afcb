//! Bounded expensive work: at most N CPU- or memory-heavy jobs at once, a
//! bounded number of callers waiting for one, and a bounded wait.
//!
//! A request that costs real memory or a core for tens of milliseconds (an
//! argon2 password hash takes about 19 MiB) must not be run for every caller
//! at once: sixty concurrent logins would take a process from 28 MB to over
//! a gigabyte and get it killed. A [`WorkLimiter`] hands out `permits` slots;
//! up to `max_waiting` further callers wait for one, each for at most
//! `max_wait` or what is left of its own deadline ([`crate::deadline`]),
//! whichever is shorter. Everyone else is refused at once with
//! RESOURCE_EXHAUSTED, a stable reason (`SERVER_BUSY` unless told otherwise)
//! and a `google.rpc.RetryInfo`, so a burst never turns into a queue without
//! bound, nor into memory without bound.
//!
//! [`WorkLimiter::run_blocking`] runs the job on tokio's blocking pool, so
//! that the runtime's workers keep serving other calls, and holds the permit
//! until the job has finished, even when the caller gave up (its deadline
//! passed, the client went away): what is bounded is the work actually
//! running, not the callers still listening.
//!
//! [`auto_permits`] sizes a limiter from the machine: no more jobs than
//! cores, and no more than fit in a quarter of the memory limit (the cgroup
//! v2 or v1 limit of the process's container, else physical memory).

use std::borrow::Cow;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::deadline;
use crate::error::{Error, Result};

/// The reason of a refusal when none is set with [`WorkLimiter::with_reason`].
pub const DEFAULT_BUSY_REASON: &str = "SERVER_BUSY";

/// The retry delay sent with a refusal unless set with
/// [`WorkLimiter::with_retry_after`]: long enough for a few jobs of tens of
/// milliseconds to finish, short enough for a person at a login form.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The share of the memory limit that [`auto_permits`] gives one kind of
/// bounded work: a quarter, leaving the rest to the process's other needs
/// (connections, pools, caches, the allocator's own slack).
pub const MEMORY_SHARE_DIVISOR: u64 = 4;

/// At most `permits` jobs at once, at most `max_waiting` callers waiting for
/// one, each for at most `max_wait` (see the module docs). Cheap to clone:
/// clones share the slots.
#[derive(Clone, Debug)]
pub struct WorkLimiter {
    /// What the work is, for messages and logs ("password hashing").
    what: Cow<'static, str>,
    reason: Cow<'static, str>,
    retry_after: Duration,
    permits: Arc<Semaphore>,
    size: usize,
    /// One permit per caller allowed to wait for a slot.
    waiting: Arc<Semaphore>,
    max_wait: Duration,
}

/// A slot of a [`WorkLimiter`], given back when dropped.
#[derive(Debug)]
#[must_use = "the slot is given back as soon as the permit is dropped"]
pub struct WorkPermit {
    _permit: OwnedSemaphorePermit,
}

impl WorkLimiter {
    /// A limiter for `what` (named in refusals): `permits` jobs at once (at
    /// least one), `max_waiting` callers waiting (0: none waits, a caller
    /// without a free slot is refused at once), each for at most `max_wait`.
    pub fn new(
        what: impl Into<Cow<'static, str>>,
        permits: usize,
        max_waiting: usize,
        max_wait: Duration,
    ) -> Self {
        let size = permits.max(1);
        Self {
            what: what.into(),
            reason: Cow::Borrowed(DEFAULT_BUSY_REASON),
            retry_after: DEFAULT_RETRY_AFTER,
            permits: Arc::new(Semaphore::new(size)),
            size,
            waiting: Arc::new(Semaphore::new(max_waiting.min(Semaphore::MAX_PERMITS))),
            max_wait,
        }
    }

    /// The `ErrorInfo` reason of a refusal (UPPER_SNAKE_CASE, for example
    /// `PASSWORD_HASHING_BUSY`), so that clients can tell which work was busy.
    pub fn with_reason(mut self, reason: impl Into<Cow<'static, str>>) -> Self {
        self.reason = reason.into();
        self
    }

    /// The `RetryInfo` delay of a refusal.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = delay;
        self
    }

    /// How many jobs may run at once.
    pub fn permits(&self) -> usize {
        self.size
    }

    /// How many slots are free right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// A slot: at once when one is free; else, when fewer than `max_waiting`
    /// callers are waiting already, the first one freed within `max_wait`
    /// or the time left of the caller's deadline, whichever is shorter
    /// (slots go to waiters in order of arrival). RESOURCE_EXHAUSTED with
    /// the limiter's reason and `RetryInfo` otherwise.
    pub async fn acquire(&self) -> Result<WorkPermit> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(WorkPermit { _permit: permit });
        }
        let budget = deadline::remaining().map_or(self.max_wait, |left| left.min(self.max_wait));
        if budget.is_zero() {
            return Err(self.busy("no time left to wait"));
        }
        let Ok(_waiting) = self.waiting.try_acquire() else {
            return Err(self.busy("too many calls waiting"));
        };
        match tokio::time::timeout(budget, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(WorkPermit { _permit: permit }),
            // The semaphore is never closed; a closed one has no slot to give.
            Ok(Err(_closed)) => Err(self.busy("closed")),
            Err(_elapsed) => Err(self.busy("no slot freed in time")),
        }
    }

    /// Runs `job` on the blocking thread pool once a slot is free
    /// ([`WorkLimiter::acquire`]), keeping the slot until `job` returns, even
    /// if the caller stops waiting for its result.
    pub async fn run_blocking<T, F>(&self, job: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = self.acquire().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|err| Error::internal(format!("running {}", self.what), err))
    }

    fn busy(&self, why: &'static str) -> Error {
        tracing::debug!(work = %self.what, permits = self.size, why, "bounded work refused");
        Error::overloaded(
            format!("{} is busy: try again shortly", self.what),
            self.reason.clone(),
            self.retry_after,
        )
    }
}

/// How many jobs of about `bytes_per_job` bytes to run at once on this
/// machine: [`permits_for`] with its available parallelism and
/// [`memory_limit`].
pub fn auto_permits(bytes_per_job: u64) -> usize {
    let parallelism = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    permits_for(parallelism, memory_limit(), bytes_per_job)
}

/// No more jobs than `parallelism` (more would only queue for a core while
/// holding their memory) and no more than fit in 1/[`MEMORY_SHARE_DIVISOR`]
/// of `memory` (when known); at least one.
pub fn permits_for(parallelism: usize, memory: Option<u64>, bytes_per_job: u64) -> usize {
    let by_memory = memory.map_or(usize::MAX, |memory| {
        usize::try_from(memory / MEMORY_SHARE_DIVISOR / bytes_per_job.max(1)).unwrap_or(usize::MAX)
    });
    parallelism.min(by_memory).max(1)
}

/// The memory this process may use: its cgroup's limit (v2 `memory.max`,
/// else v1 `memory.limit_in_bytes`) when one is set, capped by physical
/// memory (`/proc/meminfo`); `None` when neither can be read.
pub fn memory_limit() -> Option<u64> {
    let physical = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| parse_meminfo_total(&meminfo));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|cgroups| cgroup_memory_limit(Path::new("/sys/fs/cgroup"), &cgroups));
    match (cgroup, physical) {
        (Some(cgroup), Some(physical)) => Some(cgroup.min(physical)),
        (limit, None) | (None, limit) => limit,
    }
}

/// The memory limit of the cgroup named in `proc_self_cgroup` (the text of
/// `/proc/self/cgroup`) under the cgroup mount `root`: v2 first, then v1.
/// Each is looked up at the process's own cgroup path, then at the root (in
/// a container with its own cgroup namespace the root is its own cgroup).
fn cgroup_memory_limit(root: &Path, proc_self_cgroup: &str) -> Option<u64> {
    let mut v2 = None;
    let mut v1 = None;
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_owned());
        }
    }
    let read = |file: &Path| std::fs::read_to_string(file).ok();
    let v2_limit = v2.and_then(|path| {
        [root.join(&path).join("memory.max"), root.join("memory.max")]
            .iter()
            .find_map(|file| read(file))
            .and_then(|value| parse_limit(&value))
    });
    v2_limit.or_else(|| {
        let memory = root.join("memory");
        v1.and_then(|path| {
            [
                memory.join(&path).join("memory.limit_in_bytes"),
                memory.join("memory.limit_in_bytes"),
            ]
            .iter()
            .find_map(|file| read(file))
            .and_then(|value| parse_limit(&value))
        })
    })
}

/// A cgroup memory limit in bytes; `None` for no limit: v2 writes `max`,
/// v1 a number near `i64::MAX` rounded down to a page.
fn parse_limit(value: &str) -> Option<u64> {
    /// Larger than any real machine's memory (1 EiB): v1's "unlimited".
    const UNLIMITED: u64 = 1 << 60;
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|limit| *limit < UNLIMITED)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let kib = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        kib.checked_mul(1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use tonic::{Code, Status};
    use tonic_types::StatusExt;

    const MIB: u64 = 1024 * 1024;

    fn limiter(permits: usize, max_waiting: usize, max_wait: Duration) -> WorkLimiter {
        WorkLimiter::new("test work", permits, max_waiting, max_wait).with_reason("TEST_BUSY")
    }

    fn assert_busy(err: Error) {
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err:?}");
        assert_eq!(err.reason(), Some("TEST_BUSY"));
        let status = Status::from(err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(DEFAULT_RETRY_AFTER));
    }

    #[tokio::test]
    async fn permits_are_handed_out_up_to_the_size_and_given_back() {
        let work = limiter(2, 0, Duration::from_secs(60));
        assert_eq!(work.permits(), 2);
        let first = work.acquire().await.expect("first slot");
        let second = work.acquire().await.expect("second slot");
        assert_eq!(work.available(), 0);
        // No waiting room: refused at once, however long max_wait is.
        assert_busy(work.acquire().await.expect_err("full"));
        drop(first);
        let third = work.acquire().await.expect("a slot was given back");
        drop((second, third));
        assert_eq!(work.available(), 2);
        // Zero permits still means one: the work must be possible at all.
        assert_eq!(limiter(0, 0, Duration::ZERO).permits(), 1);
    }

    #[tokio::test]
    async fn waiters_are_bounded_and_served_in_order_of_arrival() {
        let work = limiter(1, 2, Duration::from_secs(60));
        let held = work.acquire().await.expect("the slot");
        let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..2 {
            let (waiter, tx) = (work.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let permit = waiter.acquire().await;
                let _ = tx.send(i);
                permit.map(drop)
            }));
            // Let waiter i queue before the next one arrives.
            while work.waiting.available_permits() != 1 - i {
                tokio::task::yield_now().await;
            }
        }
        // Two are waiting: a third caller is refused at once.
        assert_busy(work.acquire().await.expect_err("waiting room full"));
        drop(held);
        for waiter in waiters {
            waiter.await.expect("joined").expect("served");
        }
        assert_eq!(order.recv().await, Some(0));
        assert_eq!(order.recv().await, Some(1));
        // The waiting room is free again.
        assert_eq!(work.waiting.available_permits(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_max_wait() {
        let work = limiter(1, 4, Duration::from_millis(500));
        let _held = work.acquire().await.expect("the slot");
        let started = tokio::time::Instant::now();
        assert_busy(work.acquire().await.expect_err("never freed"));
        let waited = started.elapsed();
        assert!((500..501).contains(&waited.as_millis()), "{waited:?}");
        assert_eq!(work.waiting.available_permits(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shorter_than_max_wait_bounds_the_wait() {
        let work = limiter(1, 4, Duration::from_secs(60));
        let _held = work.acquire().await.expect("the slot");
        let started = tokio::time::Instant::now();
        let err = deadline::scope(started + Duration::from_millis(200), work.acquire())
            .await
            .expect_err("never freed");
        assert_busy(err);
        let waited = started.elapsed();
        assert!((200..201).contains(&waited.as_millis()), "{waited:?}");
        // A deadline already passed: refused without waiting at all.
        let err = deadline::scope(tokio::time::Instant::now(), work.acquire())
            .await
            .expect_err("no time left");
        assert_busy(err);
        assert_eq!(started.elapsed(), waited);
    }

    #[tokio::test]
    async fn blocking_jobs_hold_their_slot_until_they_finish() {
        let work = limiter(1, 0, Duration::ZERO);
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let job = {
            let work = work.clone();
            tokio::spawn(async move { work.run_blocking(move || gate.recv().is_ok()).await })
        };
        while work.available() != 0 {
            tokio::task::yield_now().await;
        }
        // The caller gives up; the job still runs and keeps its slot.
        job.abort();
        let _ = job.await;
        assert_busy(work.run_blocking(|| ()).await.expect_err("slot held"));
        release.send(()).expect("job waiting");
        let permit = loop {
            match work.acquire().await {
                Ok(permit) => break permit,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        drop(permit);
        assert_eq!(work.run_blocking(|| 6 * 7).await.expect("ran"), 42);
    }

    #[test]
    fn auto_sizing_takes_the_smaller_of_cores_and_a_quarter_of_memory() {
        // 256 MiB container, 19 MiB per job: 64 MiB / 19 MiB = 3.
        assert_eq!(permits_for(16, Some(256 * MIB), 19 * MIB), 3);
        // Plenty of memory: the cores decide.
        assert_eq!(permits_for(2, Some(24 * 1024 * MIB), 19 * MIB), 2);
        // Too little memory for even one: still one.
        assert_eq!(permits_for(8, Some(32 * MIB), 19 * MIB), 1);
        // Unknown memory: the cores decide.
        assert_eq!(permits_for(4, None, 19 * MIB), 4);
        assert!(auto_permits(19 * MIB) >= 1);
    }

    #[test]
    fn cgroup_limits_are_read_for_v2_and_v1_and_unlimited_is_none() -> anyhow::Result<()> {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("268435456\n"), Some(256 * MIB));
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(
            parse_meminfo_total("MemTotal:       24684084 kB\nMemFree: 1 kB\n"),
            Some(24_684_084 * 1024)
        );

        // cgroup v2: the process's own cgroup below the mount.
        let root = tempfile::tempdir()?;
        let own = root.path().join("kubepods/pod1");
        std::fs::create_dir_all(&own)?;
        std::fs::write(own.join("memory.max"), "268435456\n")?;
        std::fs::write(root.path().join("memory.max"), "max\n")?;
        assert_eq!(
            cgroup_memory_limit(root.path(), "0::/kubepods/pod1\n"),
            Some(256 * MIB)
        );
        // A cgroup namespace: the path is not below the mount, the root is ours.
        std::fs::write(root.path().join("memory.max"), "134217728\n")?;
        assert_eq!(
            cgroup_memory_limit(root.path(), "0::/elsewhere\n"),
            Some(128 * MIB)
        );

        // cgroup v1 (a hybrid host: the empty v2 line has no memory.max).
        let root = tempfile::tempdir()?;
        let memory = root.path().join("memory");
        std::fs::create_dir_all(&memory)?;
        std::fs::write(memory.join("memory.limit_in_bytes"), "536870912\n")?;
        let cgroups = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
        assert_eq!(cgroup_memory_limit(root.path(), cgroups), Some(512 * MIB));
        std::fs::write(
            memory.join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )?;
        assert_eq!(cgroup_memory_limit(root.path(), cgroups), None);
        assert_eq!(cgroup_memory_limit(root.path(), ""), None);
        Ok(())
    }
}
