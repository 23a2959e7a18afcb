//! The task behind one `WatchOrder` stream.
//!
//! Each watch runs its own task that owns everything it needs: a store
//! handle, a receiver of [`crate::changes::OrderChanges`] notices and the
//! sending half of a small bounded channel whose receiving half is the
//! response stream. The task re-reads its order when a notice names it, when
//! it lagged behind the notices, and every [`RECHECK_INTERVAL`] (changes made
//! by another replica send no notice here). It forwards the order only when
//! its status or `updated_at` differs from what it last sent, and ends after
//! a terminal status or as soon as the client goes away.
//!
//! A client that stops reading fills its channel and then holds up only its
//! own task (parked in `send`); writers never wait for watchers because the
//! notices are a broadcast that drops what a slow receiver misses.

use std::sync::Arc;
use std::time::Duration;

use agora_platform::error::{Error, ErrorKind, Result};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::domain::Order;
use crate::store::OrderStore;

/// How often a watch re-reads its order without a notice.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Orders a watch may have ready before its client reads them. Small: a
/// watch sends at most a few messages, and a stalled client should park its
/// task early rather than queue.
const WATCH_BUFFER: usize = 4;

/// Starts watching `initial` (the order as just read, after `notices` was
/// subscribed, so no change in between is missed) and returns the stream of
/// its states: `initial` first, then each change, ending after a terminal
/// status.
/// When `drain` is cancelled (the server is shutting down) the stream ends
/// with UNAVAILABLE, so the client knows to watch again elsewhere.
pub fn watch_order<S: OrderStore>(
    store: Arc<S>,
    initial: Order,
    notices: broadcast::Receiver<Arc<str>>,
    recheck: Duration,
    drain: CancellationToken,
) -> ReceiverStream<Result<Order>> {
    let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        tokio::select! {
            () = forward_changes(store, initial, notices, recheck, sender.clone()) => {}
            () = drain.cancelled() => {
                let shutting_down = Error::new(
                    ErrorKind::Unavailable,
                    "the server is shutting down: watch the order again",
                );
                // A client that stopped reading gets nothing: don't wait for it.
                let _ = sender.try_send(Err(shutting_down));
            }
        }
    });
    ReceiverStream::new(receiver)
}

async fn forward_changes<S: OrderStore>(
    store: Arc<S>,
    initial: Order,
    mut notices: broadcast::Receiver<Arc<str>>,
    recheck: Duration,
    sender: mpsc::Sender<Result<Order>>,
) {
    let mut last = initial.clone();
    // An order that is already over is sent once and the stream ends.
    if sender.send(Ok(initial)).await.is_err() || last.status.is_terminal() {
        return;
    }
    let mut ticker = tokio::time::interval_at(Instant::now() + recheck, recheck);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Only while the store lives can notices come; after that, re-checks.
    let mut notices_open = true;
    loop {
        tokio::select! {
            () = sender.closed() => return,
            _ = ticker.tick() => {}
            notice = notices.recv(), if notices_open => match notice {
                Ok(id) if *id == *last.id => {}
                Ok(_) => continue,
                // Some notices were dropped; one may have been ours.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    notices_open = false;
                    continue;
                }
            },
        }
        let current = match store.get(&last.id).await {
            Ok(Some(current)) => current,
            Ok(None) => {
                let gone = Error::not_found(format_args!("order {}", last.id));
                let _ = sender.send(Err(gone)).await;
                return;
            }
            Err(err) if err.kind() == ErrorKind::Unavailable => {
                // Transient: the next re-check tries again.
                tracing::warn!(order_id = %last.id, error = %err, "watch could not re-read its order");
                continue;
            }
            Err(err) => {
                let _ = sender.send(Err(err)).await;
                return;
            }
        };
        if current.status == last.status && current.updated_at == last.updated_at {
            continue;
        }
        last = current.clone();
        if sender.send(Ok(current)).await.is_err() || last.status.is_terminal() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::changes::OrderChanges;
    use crate::domain::OrderStatus;
    use crate::store::SqlOrderStore;

    /// Long enough that only notices can explain a delivered change.
    const NO_RECHECK: Duration = Duration::from_secs(3600);
    /// Hang guard only.
    const GUARD: Duration = Duration::from_secs(30);

    async fn store(dir: &tempfile::TempDir, changes: OrderChanges) -> SqlOrderStore {
        crate::test_support::sqlite_store(dir, changes).await
    }

    async fn pending(store: &SqlOrderStore) -> Order {
        store
            .create(crate::test_support::new_order())
            .await
            .expect("order")
    }

    async fn next(stream: &mut ReceiverStream<Result<Order>>) -> Option<Order> {
        tokio::time::timeout(GUARD, stream.next())
            .await
            .expect("watch hung")
            .map(|state| state.expect("no error"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notice_alone_delivers_the_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(store(&dir, OrderChanges::new()).await);
        let order = pending(&store).await;
        let notices = store.changes().subscribe();
        let mut states = watch_order(
            Arc::clone(&store),
            order.clone(),
            notices,
            NO_RECHECK,
            CancellationToken::new(),
        );
        assert_eq!(next(&mut states).await, Some(order.clone()));
        let done = store
            .transition(&order.id, OrderStatus::Completed, "")
            .await
            .expect("transition");
        assert_eq!(next(&mut states).await, Some(done));
        assert_eq!(next(&mut states).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lagging_watch_re_reads_instead_of_missing_its_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(store(&dir, OrderChanges::with_capacity(2)).await);
        let order = pending(&store).await;
        let notices = store.changes().subscribe();
        let done = store
            .transition(&order.id, OrderStatus::Failed, "declined")
            .await
            .expect("transition");
        // Push this order's notice out of the receiver's small buffer.
        for _ in 0..5 {
            store.changes().notify("another order");
        }
        let mut states = watch_order(
            Arc::clone(&store),
            order.clone(),
            notices,
            NO_RECHECK,
            CancellationToken::new(),
        );
        assert_eq!(next(&mut states).await, Some(order));
        assert_eq!(next(&mut states).await, Some(done));
        assert_eq!(next(&mut states).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notices_for_other_orders_send_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(store(&dir, OrderChanges::new()).await);
        let watched = pending(&store).await;
        let other = pending(&store).await;
        let notices = store.changes().subscribe();
        let mut states = watch_order(
            Arc::clone(&store),
            watched.clone(),
            notices,
            NO_RECHECK,
            CancellationToken::new(),
        );
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
}
