//! `WatchOrder` streams: bounded in number and lifetime, fed by one shared
//! re-read per replica.
//!
//! A [`WatchHub`] per orders replica keeps one entry per watched order: the
//! newest state read of it, in a [`tokio::sync::watch`] channel that every
//! stream watching that order reads. One poll task checks all watched
//! orders that are not over yet every `watch.poll_interval_ms`: it reads
//! only their [`OrderStamp`]s (id, status, `updated_at`: one narrow row
//! each, no items) with [`OrderStore::stamps`] in batches of
//! [`MAX_IDS_PER_READ`], so one light query per 500 watched orders per
//! interval, however many streams watch them, and reads in full
//! ([`OrderStore::get_many`]) only the orders whose stamp differs from the
//! state the hub holds. It also re-reads at once, in full, the orders named
//! by this replica's change notices ([`crate::changes::OrderChanges`]),
//! looking up just those entries; changes made by other replicas arrive
//! with the next poll. The task runs only while something is watched: the
//! first watch starts it, and it ends at the first tick that finds nothing
//! left to watch.
//!
//! A stream is not a task: it is the receiving side of its order's channel,
//! polled by the server when the client can take a message. A watch channel
//! holds one value (the newest) and overwriting it never waits, so a client
//! that stops reading costs one slot and never holds up the hub or a writer;
//! when it reads again it gets the newest state (it may skip states in
//! between, never the end: whichever terminal state it sees first, it sends
//! and ends). Its first message is always the state the watch began with.
//!
//! Each stream sends the state it starts with, then each change (status or
//! `updated_at` differs from what it sent last), and ends after a terminal
//! status; after `watch.max_lifetime_secs` it ends with OK (the client
//! watches again if it still cares), and when the server drains it ends
//! with UNAVAILABLE (the client watches again elsewhere). Streams are
//! capped per user (`watch.max_streams_per_user`) and per replica
//! (`watch.max_streams`): beyond either, `WatchOrder` is refused at once,
//! before any database work, with RESOURCE_EXHAUSTED, the reason
//! `TOO_MANY_WATCHES` and `google.rpc.RetryInfo`. A stream's slot is a
//! [`Following`] guard that the stream owns, so it comes back however the
//! stream ends: its end, the client going away, the drain, its lifetime, or
//! a refusal after the slot was taken (for example NOT_FOUND).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agora_platform::config::WatchConfig;
use agora_platform::error::{Error, ErrorKind, Result};
use futures::Stream;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::domain::{Order, OrderStatus};
use crate::store::{MAX_IDS_PER_READ, OrderStamp, OrderStore};

/// The shortest poll interval honoured: a configured 0 would spin.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The shortest stream lifetime honoured: a configured 0 would end every
/// stream before its first message.
const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// When a user at their own cap may try again: one of their streams must
/// end first, which their client decides.
const RETRY_AFTER_USER_CAP: Duration = Duration::from_secs(5);

/// When a caller refused because the replica is full may try again: soon,
/// likely on another replica.
const RETRY_AFTER_REPLICA_CAP: Duration = Duration::from_secs(1);

/// The ErrorInfo reason of a refused watch.
pub const TOO_MANY_WATCHES: &str = "TOO_MANY_WATCHES";

/// The limits of [`WatchConfig`], with out-of-range values made safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchLimits {
    /// Streams one user may have open at once on this replica (0 refuses
    /// every watch).
    pub max_streams_per_user: usize,
    /// Streams this replica serves at once.
    pub max_streams: usize,
    /// How long a stream stays open at most (at least 1 s).
    pub max_lifetime: Duration,
    /// How often the watched orders are re-read (at least 10 ms).
    pub poll_interval: Duration,
}

impl WatchLimits {
    /// The limits `config` asks for.
    pub fn from_config(config: &WatchConfig) -> Self {
        Self {
            max_streams_per_user: config.max_streams_per_user,
            max_streams: config.max_streams,
            max_lifetime: Duration::from_secs(config.max_lifetime_secs).max(MIN_LIFETIME),
            poll_interval: Duration::from_millis(config.poll_interval_ms).max(MIN_POLL_INTERVAL),
        }
    }
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self::from_config(&WatchConfig::default())
    }
}

/// What the hub knows of a watched order.
#[derive(Clone, Debug)]
enum Watched {
    /// Registered, not read yet (the watch that registered it is reading).
    Loading,
    /// The newest state read.
    Live(Order),
    /// The order no longer exists.
    Gone,
}

/// One watched order: its newest state for every stream watching it.
#[derive(Debug)]
struct Entry {
    state: watch::Sender<Watched>,
    /// Streams (and watches being set up) following this order.
    followers: usize,
}

impl Entry {
    /// Whether the poll should look at this order: not when it is over
    /// (finished orders do not change: their streams are ending) or gone.
    fn pollable(&self) -> bool {
        match &*self.state.borrow() {
            Watched::Live(order) => !order.status.is_terminal(),
            Watched::Gone => false,
            Watched::Loading => true,
        }
    }

    /// Whether `stamp` says the order is not the state this entry holds
    /// (a loading entry holds none yet), so that it must be read in full.
    fn differs_from(&self, stamp: &OrderStamp) -> bool {
        match &*self.state.borrow() {
            Watched::Live(order) => {
                (order.status, order.updated_at) != (stamp.status, stamp.updated_at)
            }
            Watched::Loading => true,
            Watched::Gone => false,
        }
    }
}

#[derive(Debug, Default)]
struct Slots {
    entries: HashMap<Arc<str>, Entry>,
    /// Open slots per user id; users without any are removed.
    per_user: HashMap<Arc<str>, usize>,
    /// Open slots, all users together.
    open: usize,
    /// Whether a poll task runs (at most one does).
    poller_running: bool,
}

/// The part of the hub that does not depend on the store: slots, entries
/// and counters. Slot guards hold it.
#[derive(Debug)]
struct Registry {
    limits: WatchLimits,
    slots: Mutex<Slots>,
    /// Full polls completed (every watched order re-read).
    poll_rounds: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Never held across an await nor while running foreign code, so a
        // poisoned lock only means a panic in our own bookkeeping, after
        // which the counts are still as consistent as we can make them.
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot for `user_id` or refuses with RESOURCE_EXHAUSTED.
    fn reserve(&self, user_id: &str) -> Result<Arc<str>> {
        let mut slots = self.lock();
        if slots.open >= self.limits.max_streams {
            return Err(too_many(
                format!(
                    "this server is watching its maximum of {} orders: watch again later",
                    self.limits.max_streams
                ),
                "replica",
                self.limits.max_streams,
                RETRY_AFTER_REPLICA_CAP,
            ));
        }
        let user: Arc<str> = match slots.per_user.get_key_value(user_id) {
            Some((_, count)) if *count >= self.limits.max_streams_per_user => {
                return Err(too_many(
                    format!(
                        "at most {} orders may be watched at once per user: \
                         close a watch first",
                        self.limits.max_streams_per_user
                    ),
                    "user",
                    self.limits.max_streams_per_user,
                    RETRY_AFTER_USER_CAP,
                ));
            }
            Some((user, _)) => Arc::clone(user),
            None if self.limits.max_streams_per_user == 0 => {
                return Err(too_many(
                    "watching orders is turned off on this server".to_owned(),
                    "user",
                    0,
                    RETRY_AFTER_USER_CAP,
                ));
            }
            None => Arc::from(user_id),
        };
        *slots.per_user.entry(Arc::clone(&user)).or_insert(0) += 1;
        slots.open += 1;
        Ok(user)
    }

    /// Gives back `user`'s slot and, when it followed `order_id`, its place
    /// on that order (the entry goes with its last follower).
    fn release(&self, user: &str, order_id: Option<&str>) {
        let mut slots = self.lock();
        slots.open = slots.open.saturating_sub(1);
        if let Some(count) = slots.per_user.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                slots.per_user.remove(user);
            }
        }
        if let Some(order_id) = order_id
            && let Some(entry) = slots.entries.get_mut(order_id)
        {
            entry.followers = entry.followers.saturating_sub(1);
            if entry.followers == 0 {
                slots.entries.remove(order_id);
            }
        }
    }

    /// Makes `order` the state of its entry when it is newer than what the
    /// entry has (a later `updated_at`: every change moves it forward), and
    /// wakes the entry's streams if so. Never waits for them.
    fn offer(&self, order: Order) {
        let slots = self.lock();
        let Some(entry) = slots.entries.get(order.id.as_str()) else {
            return;
        };
        entry.state.send_if_modified(|state| {
            let newer = match state {
                Watched::Loading => true,
                Watched::Live(known) => order.updated_at > known.updated_at,
                // Orders are never deleted; nothing comes back.
                Watched::Gone => false,
            };
            if newer {
                *state = Watched::Live(order);
            }
            newer
        });
    }

    /// The watched orders among `stamps` whose state the hub does not hold
    /// yet: the ones to read in full.
    fn changed(&self, stamps: &[OrderStamp]) -> Vec<Arc<str>> {
        let slots = self.lock();
        stamps
            .iter()
            .filter_map(|stamp| {
                let (id, entry) = slots.entries.get_key_value(stamp.id.as_str())?;
                entry.differs_from(stamp).then(|| Arc::clone(id))
            })
            .collect()
    }

    /// Marks the watched orders among `ids` that a read did not find.
    fn mark_gone(&self, ids: &[Arc<str>], found: &HashSet<&str>) {
        let slots = self.lock();
        for id in ids.iter().filter(|id| !found.contains(&***id)) {
            if let Some(entry) = slots.entries.get(id) {
                entry.state.send_if_modified(|state| {
                    // A loading entry is for the watch that registered it
                    // to decide (it answers NOT_FOUND itself).
                    let live = matches!(state, Watched::Live(_));
                    if live {
                        *state = Watched::Gone;
                    }
                    live
                });
            }
        }
    }
}

fn too_many(message: String, scope: &str, limit: usize, retry_after: Duration) -> Error {
    Error::overloaded(message, TOO_MANY_WATCHES, retry_after)
        .with_metadata("scope", scope)
        .with_metadata("limit", limit.to_string())
}

/// How many streams are open and what the hub does, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Slots taken: open streams plus watches being set up.
    pub open_streams: usize,
    /// Distinct orders watched.
    pub watched_orders: usize,
    /// Full polls completed since the hub was made.
    pub poll_rounds: u64,
    /// Whether the poll task runs.
    pub polling: bool,
}

/// The `WatchOrder` hub of one replica (see the module docs). Clones share
/// it.
#[derive(Debug)]
pub struct WatchHub<S> {
    store: Arc<S>,
    registry: Arc<Registry>,
}

impl<S> Clone for WatchHub<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            registry: Arc::clone(&self.registry),
        }
    }
}

impl<S: OrderStore> WatchHub<S> {
    /// A hub reading through `store` (and following its change notices),
    /// within `limits`.
    pub fn new(store: Arc<S>, limits: WatchLimits) -> Self {
        Self {
            store,
            registry: Arc::new(Registry {
                limits,
                slots: Mutex::new(Slots::default()),
                poll_rounds: AtomicU64::new(0),
            }),
        }
    }

    /// The limits the hub enforces.
    pub fn limits(&self) -> WatchLimits {
        self.registry.limits
    }

    /// What the hub holds right now.
    pub fn stats(&self) -> WatchStats {
        let slots = self.registry.lock();
        WatchStats {
            open_streams: slots.open,
            watched_orders: slots.entries.len(),
            poll_rounds: self.registry.poll_rounds.load(Ordering::Relaxed),
            polling: slots.poller_running,
        }
    }

    /// Takes a slot for `user_id` and follows order `order_id` with it:
    /// from now on, changes to the order reach the returned guard, which
    /// gives the slot back when dropped. Call it BEFORE reading the order,
    /// then [`Following::offer`] what was read: a change committed after
    /// the read then re-reads the order through its notice (the entry
    /// exists already), so nothing falls between the read and the watch.
    ///
    /// RESOURCE_EXHAUSTED (`TOO_MANY_WATCHES`, with RetryInfo) when the
    /// user or the replica is at its cap; decided before any database work.
    pub fn follow(&self, user_id: &str, order_id: &str) -> Result<Following> {
        let user = self.registry.reserve(user_id)?;
        let order_id: Arc<str> = Arc::from(order_id);
        let receiver = {
            let mut slots = self.registry.lock();
            let receiver = match slots.entries.get_mut(&order_id) {
                Some(entry) => {
                    entry.followers += 1;
                    entry.state.subscribe()
                }
                None => {
                    let (state, receiver) = watch::channel(Watched::Loading);
                    slots.entries.insert(
                        Arc::clone(&order_id),
                        Entry {
                            state,
                            followers: 1,
                        },
                    );
                    receiver
                }
            };
            if !slots.poller_running {
                slots.poller_running = true;
                // Subscribed here, under the lock, so that no notice sent
                // after this call returns is missed by the new task.
                let notices = self.store.changes().subscribe();
                tokio::spawn(poll(
                    Arc::clone(&self.store),
                    Arc::clone(&self.registry),
                    notices,
                ));
            }
            receiver
        };
        Ok(Following {
            registry: Arc::clone(&self.registry),
            user,
            order_id,
            receiver,
        })
    }
}

/// One slot, following one order: the guard a `WatchOrder` stream owns.
/// Dropping it gives the slot back (see [`WatchHub::follow`]).
#[derive(Debug)]
pub struct Following {
    registry: Arc<Registry>,
    user: Arc<str>,
    order_id: Arc<str>,
    receiver: watch::Receiver<Watched>,
}

impl Following {
    /// The order as the watch just read it (after [`WatchHub::follow`]):
    /// becomes the order's state unless the hub already has a newer one.
    pub fn offer(&self, order: Order) {
        self.registry.offer(order);
    }

    /// The stream of the order's states (see the module docs): ends after a
    /// terminal status, with OK after the hub's maximum lifetime, and with
    /// UNAVAILABLE once `drain` is cancelled. The slot is given back when
    /// the stream ends or is dropped.
    pub fn into_stream(
        mut self,
        drain: CancellationToken,
    ) -> impl Stream<Item = Result<Order>> + Send + 'static {
        let deadline = Instant::now() + self.registry.limits.max_lifetime;
        // Taken now, so that the stream's first message is the state the
        // watch began with even if the server polls the stream only after
        // a change.
        let initial = match &*self.receiver.borrow_and_update() {
            Watched::Live(order) => Some(order.clone()),
            Watched::Loading | Watched::Gone => None,
        };
        let watcher = Watcher {
            following: self,
            initial,
            last_sent: None,
            deadline,
            drain,
        };
        futures::stream::unfold(Some(watcher), |watcher| async move {
            let mut watcher = watcher?;
            let (item, go_on) = watcher.next().await?;
            // The last item drops the watcher, and with it the slot.
            Some((item, go_on.then_some(watcher)))
        })
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.registry.release(&self.user, Some(&self.order_id));
    }
}

/// The state of one stream.
struct Watcher {
    following: Following,
    /// The state the watch began with, until it is sent.
    initial: Option<Order>,
    /// Status and `updated_at` of the last order sent.
    last_sent: Option<(OrderStatus, i64)>,
    deadline: Instant,
    drain: CancellationToken,
}

impl Watcher {
    /// `order` as the next message, remembered as sent; more may follow
    /// unless it is over.
    fn send(&mut self, order: Order) -> (Result<Order>, bool) {
        self.last_sent = Some((order.status, order.updated_at));
        let go_on = !order.status.is_terminal();
        (Ok(order), go_on)
    }

    /// The next message and whether more may follow; `None` to end with OK.
    async fn next(&mut self) -> Option<(Result<Order>, bool)> {
        if let Some(order) = self.initial.take() {
            return Some(self.send(order));
        }
        loop {
            let update = match &*self.following.receiver.borrow_and_update() {
                Watched::Loading => None,
                Watched::Live(order) => {
                    let seen = Some((order.status, order.updated_at));
                    (seen != self.last_sent).then(|| order.clone())
                }
                Watched::Gone => {
                    let gone = Error::not_found(format_args!("order {}", self.following.order_id));
                    return Some((Err(gone), false));
                }
            };
            if let Some(order) = update {
                return Some(self.send(order));
            }
            tokio::select! {
                biased;
                () = self.drain.cancelled() => {
                    let shutting_down = Error::new(
                        ErrorKind::Unavailable,
                        "the server is shutting down: watch the order again",
                    );
                    return Some((Err(shutting_down), false));
                }
                () = tokio::time::sleep_until(self.deadline) => return None,
                changed = self.following.receiver.changed() => {
                    if changed.is_err() {
                        // Cannot happen while we follow the entry; end
                        // rather than spin if it ever does.
                        let lost = Error::new(
                            ErrorKind::Unavailable,
                            "the watch lost its order: watch it again",
                        );
                        return Some((Err(lost), false));
                    }
                }
            }
        }
    }
}

/// `first` and the notices already waiting behind it (a burst is read in
/// one query), at most [`MAX_IDS_PER_READ`] ids; `None` (re-read
/// everything) when some were dropped because the task fell behind.
fn next_notices(
    first: Arc<str>,
    notices: &mut broadcast::Receiver<Arc<str>>,
) -> Option<HashSet<Arc<str>>> {
    let mut ids = HashSet::from([first]);
    while ids.len() < MAX_IDS_PER_READ {
        match notices.try_recv() {
            Ok(id) => {
                ids.insert(id);
            }
            Err(broadcast::error::TryRecvError::Lagged(_)) => return None,
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => {
                break;
            }
        }
    }
    Some(ids)
}

/// The poll task: each interval checks the stamps of every watched order
/// that is not over and reads in full the ones that changed; reads in full
/// the orders named by change notices as they come; until nothing is
/// watched.
async fn poll<S: OrderStore>(
    store: Arc<S>,
    registry: Arc<Registry>,
    mut notices: broadcast::Receiver<Arc<str>>,
) {
    let interval = registry.limits.poll_interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    // A slow poll (or a stalled runtime) delays the next one; it never
    // makes polls pile up to catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Only while the store lives can notices come; after that, polls.
    let mut notices_open = true;
    loop {
        // `None`: check everything watched; `Some`: re-read just these ids.
        let wanted: Option<HashSet<Arc<str>>> = tokio::select! {
            _ = ticker.tick() => None,
            notice = notices.recv(), if notices_open => match notice {
                Ok(id) => next_notices(id, &mut notices),
                // Some notices were dropped; any watched order may have changed.
                Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => {
                    notices_open = false;
                    continue;
                }
            },
        };
        let full = wanted.is_none();
        let ids: Vec<Arc<str>> = {
            let mut slots = registry.lock();
            if slots.entries.is_empty() {
                // Decided under the lock that `follow` takes to start a
                // task: the next watch starts a new one.
                slots.poller_running = false;
                return;
            }
            match &wanted {
                None => slots
                    .entries
                    .iter()
                    .filter(|(_, entry)| entry.pollable())
                    .map(|(id, _)| Arc::clone(id))
                    .collect(),
                // A notice names a few orders: look up just those, never
                // every entry of a hub that may watch thousands.
                Some(wanted) => wanted
                    .iter()
                    .filter_map(|id| {
                        let (id, entry) = slots.entries.get_key_value(id)?;
                        entry.pollable().then(|| Arc::clone(id))
                    })
                    .collect(),
            }
        };
        for batch in ids.chunks(MAX_IDS_PER_READ) {
            if full {
                check_stamps(&*store, &registry, batch).await;
            } else {
                // A notice follows a committed change: read it in full.
                read_in_full(&*store, &registry, batch).await;
            }
        }
        if full {
            registry.poll_rounds.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The poll of one batch of watched orders: reads their stamps, marks the
/// ones gone, and reads in full only the ones whose stamp differs from the
/// state the hub holds (an unchanged order costs one narrow row).
async fn check_stamps<S: OrderStore>(store: &S, registry: &Registry, batch: &[Arc<str>]) {
    let owned: Vec<String> = batch.iter().map(|id| id.to_string()).collect();
    let stamps = match store.stamps(&owned).await {
        Ok(stamps) => stamps,
        // Transient or not, the next poll tries again; the streams keep
        // their last state meanwhile (and end by their lifetime).
        Err(err) => {
            tracing::warn!(error = %err, orders = batch.len(), "watch hub could not check the watched orders");
            return;
        }
    };
    let found: HashSet<&str> = stamps.iter().map(|stamp| stamp.id.as_str()).collect();
    registry.mark_gone(batch, &found);
    let changed = registry.changed(&stamps);
    if !changed.is_empty() {
        read_in_full(store, registry, &changed).await;
    }
}

/// Reads `ids` (at most [`MAX_IDS_PER_READ`]) in full and offers what it
/// finds to their entries; marks the ones not found gone.
async fn read_in_full<S: OrderStore>(store: &S, registry: &Registry, ids: &[Arc<str>]) {
    let owned: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    match store.get_many(&owned).await {
        Ok(orders) => {
            let found: HashSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
            registry.mark_gone(ids, &found);
            drop(found);
            for order in orders {
                registry.offer(order);
            }
        }
        // As above: the next poll or notice tries again.
        Err(err) => {
            tracing::warn!(error = %err, orders = ids.len(), "watch hub could not re-read the watched orders");
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;
    use crate::changes::OrderChanges;
    use crate::store::SqlOrderStore;

    /// Long enough that only notices can explain a delivered change.
    const NO_POLL: Duration = Duration::from_secs(3600);
    /// Hang guard only.
    const GUARD: Duration = Duration::from_secs(30);

    fn limits(poll_interval: Duration) -> WatchLimits {
        WatchLimits {
            max_streams_per_user: 3,
            max_streams: 5,
            max_lifetime: Duration::from_secs(3600),
            poll_interval,
        }
    }

    async fn store(dir: &tempfile::TempDir, changes: OrderChanges) -> Arc<SqlOrderStore> {
        Arc::new(crate::test_support::sqlite_store(dir, changes).await)
    }

    async fn pending(store: &SqlOrderStore) -> Order {
        store
            .create(crate::test_support::new_order())
            .await
            .expect("order")
    }

    /// Follows `order` as the gRPC handler does: follow, read, offer.
    async fn watch(
        hub: &WatchHub<SqlOrderStore>,
        store: &SqlOrderStore,
        order: &Order,
    ) -> impl Stream<Item = Result<Order>> + Send + Unpin + 'static {
        let following = hub.follow(&order.user_id, &order.id).expect("a slot");
        let read = store.get(&order.id).await.expect("read").expect("exists");
        following.offer(read);
        Box::pin(following.into_stream(CancellationToken::new()))
    }

    async fn next(stream: &mut (impl Stream<Item = Result<Order>> + Unpin)) -> Option<Order> {
        tokio::time::timeout(GUARD, stream.next())
            .await
            .expect("watch hung")
            .map(|state| state.expect("no error"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notice_alone_delivers_the_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir, OrderChanges::new()).await;
        let hub = WatchHub::new(Arc::clone(&store), limits(NO_POLL));
        let order = pending(&store).await;
        let mut states = watch(&hub, &store, &order).await;
        assert_eq!(next(&mut states).await, Some(order.clone()));
        let done = store
            .transition(&order.id, OrderStatus::Completed, "")
            .await
            .expect("transition");
        assert_eq!(next(&mut states).await, Some(done));
        assert_eq!(next(&mut states).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // Holding the lock across the write is the point: it stalls the hub.
    #[allow(clippy::await_holding_lock)]
    async fn a_lagging_hub_re_reads_everything_instead_of_missing_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir, OrderChanges::with_capacity(2)).await;
        let hub = WatchHub::new(Arc::clone(&store), limits(NO_POLL));
        let order = pending(&store).await;
        let mut states = watch(&hub, &store, &order).await;
        assert_eq!(next(&mut states).await, Some(order.clone()));
        // Hold the hub's task up (the slots lock is what it takes after a
        // notice) long enough to push this order's notice out of its small
        // buffer: it then learns that it lagged and re-reads everything.
        let done = {
            let _held = hub.registry.lock();
            store.changes().notify("another order");
            let done = store
                .transition(&order.id, OrderStatus::Failed, "declined")
                .await
                .expect("transition");
            for _ in 0..5 {
                store.changes().notify("another order");
            }
            done
        };
        assert_eq!(next(&mut states).await, Some(done));
        assert_eq!(next(&mut states).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notices_for_other_orders_send_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir, OrderChanges::new()).await;
        let hub = WatchHub::new(Arc::clone(&store), limits(NO_POLL));
        let watched = pending(&store).await;
        let other = pending(&store).await;
        let mut states = watch(&hub, &store, &watched).await;
        assert_eq!(next(&mut states).await, Some(watched.clone()));
        store
            .transition(&other.id, OrderStatus::Completed, "")
            .await
            .expect("transition");
        // A spurious notice for the watched order re-reads it, unchanged.
        store.changes().notify(&watched.id);
        let done = store
            .transition(&watched.id, OrderStatus::Completed, "")
            .await
            .expect("transition");
        // The next thing sent is the watched order's own change, nothing before.
        assert_eq!(next(&mut states).await, Some(done));
        assert_eq!(next(&mut states).await, None);
    }

    /// Changes without a notice (another replica's) arrive with the poll.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_poll_finds_changes_that_sent_no_notice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir, OrderChanges::new()).await;
        let hub = WatchHub::new(Arc::clone(&store), limits(Duration::from_millis(20)));
        let order = pending(&store).await;
        let mut states = watch(&hub, &store, &order).await;
        assert_eq!(next(&mut states).await, Some(order.clone()));
        // Another store on the same database, with a notifier of its own.
        let replica = SqlOrderStore::with_changes(store.outbox().clone(), OrderChanges::new());
        let done = replica
            .transition(&order.id, OrderStatus::Completed, "")
            .await
            .expect("transition");
        assert_eq!(next(&mut states).await, Some(done));
        assert_eq!(next(&mut states).await, None);
    }

    /// Watchers of one order share one entry; a stalled one gets the state
    /// it began with, then the newest one (whatever it missed in between)
    /// and the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchers_of_one_order_share_an_entry_and_a_stalled_one_gets_the_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir, OrderChanges::new()).await;
        let hub = WatchHub::new(Arc::clone(&store), limits(NO_POLL));
        let order = pending(&store).await;
        let mut reader = watch(&hub, &store, &order).await;
        let mut stalled = watch(&hub, &store, &order).await;
        let stats = hub.stats();
        assert_eq!((stats.open_streams, stats.watched_orders), (2, 1));
        assert_eq!(next(&mut reader).await, Some(order.clone()));
        let completed = store
            .transition(&order.id, OrderStatus::Completed, "")
            .await
            .expect("complete");
        assert_eq!(next(&mut reader).await, Some(completed.clone()));
        assert_eq!(next(&mut reader).await, None);
        assert_eq!(hub.stats().open_streams, 1);
        // The stalled watcher never read until now.
        assert_eq!(next(&mut stalled).await, Some(order));
        assert_eq!(next(&mut stalled).await, Some(completed));
        assert_eq!(next(&mut stalled).await, None);
        drop(reader);
        assert_eq!(hub.stats().open_streams, 0);
        assert_eq!(hub.stats().watched_orders, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn caps_refuse_with_the_reason_and_slots_come_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir, OrderChanges::new()).await;
        let hub = WatchHub::new(Arc::clone(&store), limits(NO_POLL));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(hub.follow("u1", "o1").expect("within the user cap"));
        }
        let refused = hub.follow("u1", "o2").expect_err("over the user cap");
        assert_eq!(refused.kind(), ErrorKind::ResourceExhausted);
        assert_eq!(refused.reason(), Some(TOO_MANY_WATCHES));
        assert_eq!(refused.retry_after(), Some(RETRY_AFTER_USER_CAP));
        held.push(hub.follow("u2", "o1").expect("another user"));
        held.push(hub.follow("u3", "o3").expect("another user"));
        let refused = hub.follow("u4", "o4").expect_err("over the replica cap");
        assert_eq!(refused.reason(), Some(TOO_MANY_WATCHES));
        assert_eq!(refused.retry_after(), Some(RETRY_AFTER_REPLICA_CAP));
        assert_eq!(hub.stats().watched_orders, 2);
        held.remove(0);
        let again = hub.follow("u4", "o4").expect("a slot came back");
        drop(held);
        drop(again);
        let stats = hub.stats();
        assert_eq!((stats.open_streams, stats.watched_orders), (0, 0));
        assert!(hub.registry.lock().per_user.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_zero_user_cap_turns_watching_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir, OrderChanges::new()).await;
        let hub = WatchHub::new(
            Arc::clone(&store),
            WatchLimits {
                max_streams_per_user: 0,
                ..limits(NO_POLL)
            },
        );
        let refused = hub.follow("u1", "o1").expect_err("off");
        assert_eq!(refused.reason(), Some(TOO_MANY_WATCHES));
        assert_eq!(hub.stats().open_streams, 0);
    }

    #[test]
    fn out_of_range_settings_are_made_safe() {
        let limits = WatchLimits::from_config(&WatchConfig {
            max_streams_per_user: 1,
            max_streams: 2,
            max_lifetime_secs: 0,
            poll_interval_ms: 0,
        });
        assert_eq!(limits.max_lifetime, MIN_LIFETIME);
        assert_eq!(limits.poll_interval, MIN_POLL_INTERVAL);
    }
}
