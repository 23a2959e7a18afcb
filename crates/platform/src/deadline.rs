//! The time left for the request being served, carried on to the calls it
//! makes.
//!
//! A gRPC caller states its deadline in the `grpc-timeout` header. The
//! server runs each handler inside [`scope`] of that deadline
//! ([`crate::server::DeadlineLayer`]), and the client stack
//! (`agora-platform-client`) sends at most [`remaining`] on with every call,
//! so a chain of calls never works past the first caller's deadline. A task
//! of its own (the checkout saga) can start a scope of its own with
//! [`scope`]. The deadline is task-local: work spawned onto another task does
//! not inherit it.

use std::future::Future;
use std::time::Duration;

use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

tokio::task_local! {
    /// When the request being served must be answered.
    static DEADLINE: Instant;
}

/// The gRPC header carrying a call's timeout (`200m`, `5S`, ...).
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The deadline of the request being served on this task, if it has one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// The time left until [`current`], zero once it has passed; `None` outside
/// any [`scope`].
pub fn remaining() -> Option<Duration> {
    current().map(|deadline| deadline.saturating_duration_since(Instant::now()))
}

/// Runs `future` with `deadline` as the current deadline, or with the
/// current one if that is earlier: a scope can shorten the budget it runs
/// in, never extend it.
pub fn scope<F: Future>(deadline: Instant, future: F) -> TaskLocalFuture<Instant, F> {
    let deadline = current().map_or(deadline, |outer| outer.min(deadline));
    DEADLINE.scope(deadline, future)
}

/// A `grpc-timeout` value as a duration; `None` when it is malformed
/// (the gRPC spec: at most 8 digits and a unit of `H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() || value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3_600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The `grpc-timeout` of `headers`, when present and well-formed.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(GRPC_TIMEOUT)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// `timeout` as a `grpc-timeout` value in the finest unit that fits the
/// spec's 8 digits, rounded down: the callee never gets more than was left.
pub fn format_grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let units: [(u128, char); 6] = [
        (timeout.as_nanos(), 'n'),
        (timeout.as_micros(), 'u'),
        (timeout.as_millis(), 'm'),
        (u128::from(timeout.as_secs()), 'S'),
        (u128::from(timeout.as_secs() / 60), 'M'),
        (u128::from(timeout.as_secs() / 3_600), 'H'),
    ];
    units
        .into_iter()
        .find(|(amount, _)| *amount <= MAX)
        .map_or_else(
            || format!("{MAX}H"),
            |(amount, unit)| format!("{amount}{unit}"),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_reject_the_rest() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3_600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "200", "200x", "123456789m", "-1m", "1.5S", "２m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeouts_format_in_the_finest_unit_that_fits_rounded_down() {
        assert_eq!(format_grpc_timeout(Duration::from_nanos(1_500)), "1500n");
        assert_eq!(format_grpc_timeout(Duration::from_millis(200)), "200000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(1_000)), "1000000m");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(u64::MAX)),
            "99999999H"
        );
        for millis in [1, 199, 5_000, 86_400_000] {
            let timeout = Duration::from_millis(millis) + Duration::from_nanos(999);
            let parsed = parse_grpc_timeout(&format_grpc_timeout(timeout)).expect("parses");
            assert!(parsed <= timeout && timeout - parsed < Duration::from_millis(1));
        }
    }

    #[tokio::test]
    async fn scopes_carry_the_deadline_and_only_ever_shorten_it() {
        assert_eq!(remaining(), None);
        let start = Instant::now();
        let left = || remaining().expect("inside a scope");
        scope(start + Duration::from_secs(10), async {
            assert!(left() <= Duration::from_secs(10) && left() > Duration::from_secs(9));
            // A longer inner scope keeps the outer deadline.
            scope(start + Duration::from_secs(60), async {
                assert!(left() <= Duration::from_secs(10));
            })
            .await;
            scope(start + Duration::from_millis(100), async {
                assert!(left() <= Duration::from_millis(100));
            })
            .await;
            assert!(left() > Duration::from_secs(9));
            scope(Instant::now(), async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                assert_eq!(left(), Duration::ZERO);
            })
            .await;
        })
        .await;
        assert_eq!(remaining(), None);
    }
}
