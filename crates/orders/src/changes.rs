//! In-process notice of order changes, for `WatchOrder`.
//!
//! The store announces the id of every order whose status it changed, after
//! the change is committed. The watch hub ([`crate::watch`]) subscribes while
//! any order is watched and re-reads an order when its id goes by. A
//! broadcast channel suits this because sending never waits for receivers: a
//! hub that falls behind loses notices (it learns that it lagged and re-reads
//! every watched order), it never slows down a writer.
//!
//! Notices only cover this process. Changes made by another replica reach
//! watchers through the hub's periodic poll.

use std::sync::Arc;

use tokio::sync::broadcast;

/// How many notices a watcher may fall behind before it lags.
pub const CHANGES_CAPACITY: usize = 1024;

/// The sending side of the notices, shared by a store and every clone of it;
/// lives as long as the store does.
#[derive(Clone, Debug)]
pub struct OrderChanges {
    sender: broadcast::Sender<Arc<str>>,
}

impl OrderChanges {
    /// A notifier with room for [`CHANGES_CAPACITY`] notices per receiver.
    pub fn new() -> Self {
        Self::with_capacity(CHANGES_CAPACITY)
    }

    /// A notifier with room for `capacity` notices per receiver (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self { sender }
    }

    /// Announces that `order_id` changed. Never blocks and never fails:
    /// without watchers the notice is simply dropped.
    pub fn notify(&self, order_id: &str) {
        // An error only means that nobody is watching right now.
        let _ = self.sender.send(Arc::from(order_id));
    }

    /// How many receivers exist: one while the watch hub's poll task runs
    /// (plus any other subscriber), however many streams are open.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }

    /// A receiver of the notices sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }
}

impl Default for OrderChanges {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;

    #[test]
    fn notices_without_watchers_are_dropped() {
        let changes = OrderChanges::new();
        changes.notify("o1");
        let mut late = changes.subscribe();
        assert_eq!(late.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn every_clone_reaches_every_subscriber() {
        let changes = OrderChanges::new();
        let mut first = changes.subscribe();
        let mut second = changes.subscribe();
        changes.clone().notify("o1");
        assert_eq!(first.try_recv().ok().as_deref(), Some("o1"));
        assert_eq!(second.try_recv().ok().as_deref(), Some("o1"));
    }

    #[test]
    fn a_stalled_subscriber_lags_instead_of_blocking_the_sender() {
        let changes = OrderChanges::with_capacity(4);
        let mut stalled = changes.subscribe();
        // Far more notices than the capacity: each send returns at once.
        for n in 0..10_000 {
            changes.notify(&n.to_string());
        }
        assert!(matches!(stalled.try_recv(), Err(TryRecvError::Lagged(_))));
        // After the lag it reads the newest notices that were kept.
        assert_eq!(stalled.try_recv().ok().as_deref(), Some("9996"));
    }
}
