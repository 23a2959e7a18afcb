//! The sweeper that releases expired reservations, so that stock held by a
//! checkout that never finished (its orders process died, its saga gave up
//! without compensating) returns to available stock.
//!
//! Every replica runs one. That is safe: each reservation is released by a
//! conditional update (`WHERE status = 'reserved'`), so of several sweepers,
//! or a sweeper and a commit, exactly one moves its units.

use std::time::Duration;

use agora_platform::shutdown::CancellationToken;
use agora_platform::time::now_micros;

use crate::store::InventoryStore;

/// How the sweeper paces itself.
#[derive(Clone, Copy, Debug)]
pub struct ExpirySettings {
    /// How often it looks for expired reservations.
    pub interval: Duration,
    /// Reservations released per batch; a full batch is followed by another
    /// at once.
    pub batch_size: i64,
}

/// Releases expired reservations every `settings.interval` until `stop`.
pub async fn run_sweeper<S: InventoryStore>(
    store: S,
    settings: ExpirySettings,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let full_batch = usize::try_from(settings.batch_size).unwrap_or(usize::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        loop {
            match store
                .release_expired(now_micros(), settings.batch_size)
                .await
            {
                Ok(released) if released >= full_batch && !stop.is_cancelled() => {}
                Ok(_) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "releasing expired reservations failed; retrying later");
                    break;
                }
            }
        }
    }
}
