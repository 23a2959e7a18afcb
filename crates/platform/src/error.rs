//! Domain errors and the one table that maps them to gRPC status codes.
//!
//! Services return [`Error`]; the gRPC adapter converts it with `Status::from`.
//! Invalid input carries `google.rpc.BadRequest` field violations so that a
//! client can point at the offending field. Internal errors are logged with
//! their cause and reach the client only as a generic message.

use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::db::DbFailure;

/// What went wrong, as a client should understand it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is malformed; see the field violations.
    InvalidArgument,
    /// The thing asked for does not exist, or the caller may not know it does.
    NotFound,
    /// Creating something that already exists (a taken email or SKU).
    AlreadyExists,
    /// A concurrent write won: the caller's view is stale; re-read and retry.
    Conflict,
    /// The request is valid but the system is not in a state to perform it.
    FailedPrecondition,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials that do not allow this.
    PermissionDenied,
    /// A dependency (database, broker, another service) is unreachable; retry later.
    Unavailable,
    /// A quota or rate limit was hit.
    ResourceExhausted,
    /// The work ran past a time limit of the server's own (a database
    /// statement timeout): sending the same call again at once would most
    /// likely run into it again, so unlike UNAVAILABLE it carries no retry
    /// hint and standard retry policies do not repeat it.
    DeadlineExceeded,
    /// A bug or an unexpected failure; details are in the server log only.
    Internal,
}

impl ErrorKind {
    /// The one mapping from domain error kinds to gRPC codes.
    pub fn code(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::Conflict => Code::Aborted,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::Unavailable => Code::Unavailable,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
        }
    }
}

/// A domain error: a kind, a message safe to show the caller, optional field
/// violations and an optional cause that is only logged.
pub struct Error {
    kind: ErrorKind,
    message: String,
    violations: Vec<(String, String)>,
    /// A stable, machine-readable reason (`google.rpc.ErrorInfo.reason`).
    reason: Option<Cow<'static, str>>,
    /// `ErrorInfo.metadata` beside the reason, for example the order's id.
    metadata: Vec<(String, String)>,
    /// When the caller may usefully try again (`google.rpc.RetryInfo`), in
    /// whole milliseconds: four bytes, so that `Error` stays small enough to
    /// return by value everywhere.
    retry_after_ms: Option<NonZeroU32>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The `google.rpc.ErrorInfo` domain of every Agora error reason.
pub const ERROR_DOMAIN: &str = "agora.dev";

/// The `ErrorInfo` reason of a call refused because the server (or the
/// gateway) is at capacity right now: calls in flight, request bytes
/// buffered. Nothing is wrong with the call; sent again a moment later
/// it may well pass ([`Error::overloaded`]).
pub const OVERLOADED: &str = "OVERLOADED";

/// The `ErrorInfo` reason of a status, when it carries one from
/// [`ERROR_DOMAIN`]: how a caller tells `CARD_DECLINED` from
/// `INSUFFICIENT_STOCK` without parsing messages.
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .map(|info| info.reason)
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message for the caller.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            violations: Vec::new(),
            reason: None,
            metadata: Vec::new(),
            retry_after_ms: None,
            source: None,
        }
    }

    /// Attaches a stable reason (UPPER_SNAKE_CASE, for example
    /// `CARD_DECLINED`), sent as `google.rpc.ErrorInfo` so that programs can
    /// branch on it.
    pub fn with_reason(mut self, reason: impl Into<Cow<'static, str>>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Adds `key: value` to the `ErrorInfo` metadata (sent only with a
    /// reason), for example the id of the order a failed checkout made.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// The stable reason, if one was attached.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// Tells the caller to try again after `delay`, sent as
    /// `google.rpc.RetryInfo` beside the `ErrorInfo` of [`Error::with_reason`]
    /// (for RESOURCE_EXHAUSTED, UNAVAILABLE, ABORTED and the like; never for
    /// INTERNAL, whose details stay in the log). The delay is kept in whole
    /// milliseconds, at least one.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        // Rounded up: a client told 7 ms for a token due in 7.9 would come
        // back too early.
        let millis = delay.as_nanos().div_ceil(1_000_000);
        let millis = u32::try_from(millis).unwrap_or(u32::MAX);
        self.retry_after_ms = NonZeroU32::new(millis.max(1));
        self
    }

    /// The retry delay, if one was attached.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after_ms
            .map(|millis| Duration::from_millis(u64::from(millis.get())))
    }

    /// RESOURCE_EXHAUSTED because a bounded resource of the server is
    /// saturated (calls in flight, buffered bytes, hashing slots, open
    /// streams): the one shape of every such refusal, with `reason` as its
    /// `google.rpc.ErrorInfo` ([`OVERLOADED`] for plain load shedding, or
    /// something more specific) and `retry_after` as its
    /// `google.rpc.RetryInfo`, so that clients back off instead of hammering.
    /// The refusal is never queued for: the caller decides when to retry.
    pub fn overloaded(
        message: impl Into<String>,
        reason: impl Into<Cow<'static, str>>,
        retry_after: Duration,
    ) -> Self {
        Self::new(ErrorKind::ResourceExhausted, message)
            .with_reason(reason)
            .with_retry_after(retry_after)
    }

    /// INVALID_ARGUMENT naming one bad field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut violations = Violations::default();
        violations.add(field, description);
        violations.into_error()
    }

    /// NOT_FOUND for `what` (for example `user 0190...`).
    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, format!("{what} not found"))
    }

    /// INTERNAL with a cause for the log; the caller sees only `context`.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::new(ErrorKind::Internal, context).with_source(source)
    }

    /// Attaches the underlying cause (logged, never sent).
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message the caller will see.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The field violations, `(field, description)`.
    pub fn violations(&self) -> &[(String, String)] {
        &self.violations
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("violations", &self.violations)
            .field("reason", &self.reason)
            .field("metadata", &self.metadata)
            .field("retry_after", &self.retry_after())
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Logs what the server must hear about an error it answers with: every
/// INTERNAL (ERROR), UNAVAILABLE and DEADLINE_EXCEEDED (a statement timeout;
/// WARN), and at WARN every INVALID_ARGUMENT, FAILED_PRECONDITION and
/// ALREADY_EXISTS that has a cause attached. Those three are the caller's
/// business when a service decides them itself (it attaches no cause); with
/// a cause they come from below, mostly the database (a value its column
/// refused, a missing foreign key, an unexpected duplicate), and since
/// services validate before any database work, that is almost always a
/// server bug that would otherwise vanish in a client's error. The log
/// names the SQLSTATE or SQLite code when the cause is a database error;
/// the caller never sees the cause.
fn log_answered(err: &Error, code: Code) {
    let db_code = database_code(err);
    let db_code = db_code.as_deref();
    match err.kind {
        ErrorKind::Internal => {
            tracing::error!(error = %err, db_code, "internal error");
        }
        ErrorKind::Unavailable => {
            tracing::warn!(error = %err, db_code, "dependency unavailable");
        }
        ErrorKind::DeadlineExceeded => {
            // A statement timeout: the query plan or the load to look at.
            tracing::warn!(error = %err, db_code, "ran past a server-side time limit");
        }
        ErrorKind::InvalidArgument | ErrorKind::FailedPrecondition | ErrorKind::AlreadyExists
            if err.source.is_some() =>
        {
            tracing::warn!(
                code = ?code,
                error = %err,
                db_code,
                "answered with a cause from below: likely a server bug"
            );
        }
        _ => {}
    }
}

/// The SQLSTATE (PostgreSQL) or extended result code (SQLite) of `err`'s
/// cause, when that is a database error.
fn database_code(err: &Error) -> Option<String> {
    let source = err.source.as_deref()?;
    let database = source.downcast_ref::<sqlx::Error>()?.as_database_error()?;
    database.code().map(std::borrow::Cow::into_owned)
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.kind.code();
        let retry_after = err.retry_after();
        log_answered(&err, code);
        match err.kind {
            ErrorKind::Internal => {
                // The cause may name tables, hosts or keys: log it, don't send it.
                Status::internal("internal error")
            }
            ErrorKind::Unavailable => with_details(
                Status::unavailable(&err.message),
                err.reason,
                err.metadata,
                retry_after,
            ),
            ErrorKind::InvalidArgument if !err.violations.is_empty() => {
                let violations = err
                    .violations
                    .into_iter()
                    .map(|(field, description)| FieldViolation::new(field, description))
                    .collect::<Vec<_>>();
                Status::with_error_details(
                    code,
                    err.message,
                    ErrorDetails::with_bad_request(violations),
                )
            }
            _ => with_details(
                Status::new(code, err.message),
                err.reason,
                err.metadata,
                retry_after,
            ),
        }
    }
}

/// `status` with `reason` as its `google.rpc.ErrorInfo` and `retry_after`
/// as its `google.rpc.RetryInfo`, each when there is one.
fn with_details(
    status: Status,
    reason: Option<Cow<'static, str>>,
    metadata: Vec<(String, String)>,
    retry_after: Option<Duration>,
) -> Status {
    if reason.is_none() && retry_after.is_none() {
        return status;
    }
    let mut details = ErrorDetails::new();
    if let Some(reason) = reason {
        details.set_error_info(
            reason,
            ERROR_DOMAIN,
            metadata
                .into_iter()
                .collect::<std::collections::HashMap<String, String>>(),
        );
    }
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(status.code(), status.message(), details)
}

/// The one table from database errors to gRPC codes: each error is put in
/// its class by [`DbFailure::of`] (the classes, their codes on both
/// backends and why, are listed there), which gives the kind, a message
/// safe to show and, where trying again helps, `google.rpc.RetryInfo`.
/// The database's own message stays in the source, for the log.
impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if matches!(err, sqlx::Error::RowNotFound) {
            return Error::new(ErrorKind::NotFound, "not found");
        }
        let class = DbFailure::of(&err);
        let error = Error::new(class.kind(), class.message()).with_source(err);
        match class.retry_after() {
            Some(delay) => error.with_retry_after(delay),
            None => error,
        }
    }
}

/// The most field violations one error carries. A request with thousands of
/// bad entries learns about the first ones and how many more there were; it
/// never makes a service build (or a client receive) a megabyte of details.
pub const MAX_VIOLATIONS: usize = 20;

/// Collects every invalid field of a request before failing, so that a client
/// learns about all of them at once: the first [`MAX_VIOLATIONS`] of them,
/// with the rest only counted (the error's message says how many).
#[derive(Debug, Default)]
pub struct Violations {
    /// `(field, description)`, at most [`MAX_VIOLATIONS`].
    recorded: Vec<(String, String)>,
    /// Violations beyond [`MAX_VIOLATIONS`]: counted, not kept.
    omitted: usize,
}

impl Violations {
    /// Records that `field` is invalid, with a description of what is expected
    /// (only counted once [`MAX_VIOLATIONS`] are recorded).
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.add_with(|| (field, description));
    }

    /// Like [`Violations::add`], but the field and description are only made
    /// when the violation is kept: for callers that would otherwise format a
    /// path for each of thousands of bad entries.
    pub fn add_with<F, D>(&mut self, violation: impl FnOnce() -> (F, D))
    where
        F: Into<String>,
        D: Into<String>,
    {
        if self.is_full() {
            self.omitted = self.omitted.saturating_add(1);
        } else {
            let (field, description) = violation();
            self.recorded.push((field.into(), description.into()));
        }
    }

    /// Whether [`MAX_VIOLATIONS`] are recorded: any more are only counted.
    pub fn is_full(&self) -> bool {
        self.recorded.len() >= MAX_VIOLATIONS
    }

    /// Adds `other`'s violations after these (within the bound), and counts
    /// the ones it left out.
    pub fn append(&mut self, other: Violations) {
        for (field, description) in other.recorded {
            self.add(field, description);
        }
        self.omitted = self.omitted.saturating_add(other.omitted);
    }

    /// Runs a parser and records its error under `field`; returns the parsed value.
    pub fn check<T, E: fmt::Display>(
        &mut self,
        field: &str,
        parsed: std::result::Result<T, E>,
    ) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(err) => {
                self.add(field, err.to_string());
                None
            }
        }
    }

    /// Takes a value from a check that reports platform [`Error`]s (such as
    /// `pagination::page_size` or `Cursor::decode`): its field violations are
    /// recorded here, or, when it has none, its message under `field`, so
    /// that one answer names every bad field.
    pub fn absorb<T>(&mut self, field: &str, checked: Result<T>) -> Option<T> {
        match checked {
            Ok(value) => Some(value),
            Err(err) if err.violations.is_empty() => {
                self.add(field, err.message);
                None
            }
            Err(err) => {
                for (field, description) in err.violations {
                    self.add(field, description);
                }
                None
            }
        }
    }

    /// Whether no violation was recorded.
    pub fn is_empty(&self) -> bool {
        self.recorded.is_empty() && self.omitted == 0
    }

    /// `Ok(())` when nothing was recorded, else INVALID_ARGUMENT with them all
    /// (the first [`MAX_VIOLATIONS`]).
    pub fn finish(self) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.into_error())
        }
    }

    /// INVALID_ARGUMENT with the recorded violations; the message names
    /// their fields and counts the ones left out.
    fn into_error(self) -> Error {
        let fields = self
            .recorded
            .iter()
            .map(|(field, _)| field.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let message = match self.omitted {
            0 => format!("invalid {fields}"),
            omitted => format!("invalid {fields} and {omitted} more"),
        };
        Error {
            kind: ErrorKind::InvalidArgument,
            message,
            violations: self.recorded,
            reason: None,
            metadata: Vec::new(),
            retry_after_ms: None,
            source: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_code() {
        let table = [
            (ErrorKind::InvalidArgument, Code::InvalidArgument),
            (ErrorKind::NotFound, Code::NotFound),
            (ErrorKind::AlreadyExists, Code::AlreadyExists),
            (ErrorKind::Conflict, Code::Aborted),
            (ErrorKind::FailedPrecondition, Code::FailedPrecondition),
            (ErrorKind::Unauthenticated, Code::Unauthenticated),
            (ErrorKind::PermissionDenied, Code::PermissionDenied),
            (ErrorKind::Unavailable, Code::Unavailable),
            (ErrorKind::ResourceExhausted, Code::ResourceExhausted),
            (ErrorKind::DeadlineExceeded, Code::DeadlineExceeded),
            (ErrorKind::Internal, Code::Internal),
        ];
        for (kind, code) in table {
            assert_eq!(Status::from(Error::new(kind, "x")).code(), code, "{kind:?}");
        }
    }

    #[test]
    fn violations_become_bad_request_details() {
        let mut v = Violations::default();
        v.add("email", "must contain @");
        v.add("name", "must not be empty");
        let status = Status::from(v.finish().expect_err("two violations"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid email, name");
        let bad_request = status
            .get_details_bad_request()
            .expect("BadRequest details");
        let fields: Vec<_> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["email", "name"]);
    }

    /// A request with a hundred thousand bad entries gets the first
    /// [`MAX_VIOLATIONS`] and a count of the rest, never a megabyte.
    #[test]
    fn violations_are_bounded_and_the_rest_counted() {
        let mut v = Violations::default();
        let mut made = 0;
        for index in 0..100_000 {
            v.add_with(|| {
                made += 1;
                (format!("items[{index}].product_id"), "must not be empty")
            });
        }
        assert_eq!(made, MAX_VIOLATIONS, "paths formatted only for kept ones");
        assert!(v.is_full());
        let err = v.finish().expect_err("violations");
        assert_eq!(err.violations().len(), MAX_VIOLATIONS);
        assert!(
            err.message()
                .ends_with("items[19].product_id and 99980 more")
        );
        let status = Status::from(err);
        let details = status.get_details_bad_request().expect("details");
        assert_eq!(details.field_violations.len(), MAX_VIOLATIONS);
        assert!(status.details().len() < 4096, "{}", status.details().len());

        // Absorbing nested errors respects the bound too.
        let mut v = Violations::default();
        for _ in 0..30 {
            v.absorb::<()>("x", Err(Error::invalid_field("page_token", "bad")));
        }
        let err = v.finish().expect_err("violations");
        assert_eq!(err.violations().len(), MAX_VIOLATIONS);
        assert!(err.message().ends_with("and 10 more"), "{}", err.message());
    }

    #[test]
    fn absorb_keeps_field_violations_and_names_bare_errors() {
        let mut v = Violations::default();
        assert_eq!(v.absorb("a", Ok::<_, Error>(1)), Some(1));
        let nested = Error::invalid_field("page_token", "is not a token");
        assert_eq!(v.absorb::<()>("ignored", Err(nested)), None);
        let bare = Error::new(ErrorKind::InvalidArgument, "too big");
        assert_eq!(v.absorb::<()>("size", Err(bare)), None);
        let status = Status::from(v.finish().expect_err("two violations"));
        let fields: Vec<_> = status
            .get_details_bad_request()
            .expect("details")
            .field_violations
            .into_iter()
            .map(|v| (v.field, v.description))
            .collect();
        assert_eq!(
            fields,
            [
                ("page_token".to_owned(), "is not a token".to_owned()),
                ("size".to_owned(), "too big".to_owned())
            ]
        );
    }

    #[test]
    fn reasons_travel_as_error_info() {
        let err = Error::new(ErrorKind::FailedPrecondition, "card declined")
            .with_reason("CARD_DECLINED")
            .with_metadata("order_id", "o1");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason_of(&status).as_deref(), Some("CARD_DECLINED"));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(
            info.metadata.get("order_id").map(String::as_str),
            Some("o1")
        );
        assert_eq!(reason_of(&Status::unavailable("x")), None);
    }

    #[test]
    fn retry_after_travels_as_retry_info_beside_the_reason() {
        let err = Error::new(ErrorKind::ResourceExhausted, "busy")
            .with_reason("SERVER_BUSY")
            .with_retry_after(Duration::from_millis(250));
        let status = Status::from(err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(reason_of(&status).as_deref(), Some("SERVER_BUSY"));
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(250)));

        // Without a reason, RetryInfo alone; UNAVAILABLE carries it too.
        let status = Status::from(
            Error::new(ErrorKind::Unavailable, "down").with_retry_after(Duration::from_secs(1)),
        );
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason_of(&status), None);
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
        assert!(
            Status::from(Error::new(ErrorKind::Conflict, "x"))
                .get_details_retry_info()
                .is_none()
        );
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let err = Error::internal(
            "saving user",
            std::io::Error::other("disk /var/secret full"),
        );
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }
}
