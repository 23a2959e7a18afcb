//! Domain errors and the one table that maps them to gRPC status codes.
//!
//! Services return [`Error`]; the gRPC adapter converts it with `Status::from`.
//! Invalid input carries `google.rpc.BadRequest` field violations so that a
//! client can point at the offending field. Internal errors are logged with
//! their cause and reach the client only as a generic message.

use std::borrow::Cow;
use std::fmt;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

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
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The `google.rpc.ErrorInfo` domain of every Agora error reason.
pub const ERROR_DOMAIN: &str = "agora.dev";

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

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.kind.code();
        match err.kind {
            ErrorKind::Internal => {
                // The cause may name tables, hosts or keys: log it, don't send it.
                tracing::error!(error = %err, "internal error");
                Status::internal("internal error")
            }
            ErrorKind::Unavailable => {
                tracing::warn!(error = %err, "dependency unavailable");
                with_reason(Status::unavailable(&err.message), err.reason, err.metadata)
            }
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
            _ => with_reason(Status::new(code, err.message), err.reason, err.metadata),
        }
    }
}

/// `status` with `reason` as its `google.rpc.ErrorInfo`, when there is one.
fn with_reason(
    status: Status,
    reason: Option<Cow<'static, str>>,
    metadata: Vec<(String, String)>,
) -> Status {
    match reason {
        Some(reason) => Status::with_error_details(
            status.code(),
            status.message(),
            ErrorDetails::with_error_info(
                reason,
                ERROR_DOMAIN,
                metadata
                    .into_iter()
                    .collect::<std::collections::HashMap<String, String>>(),
            ),
        ),
        None => status,
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            // Transient: the pool could not get a connection or the socket died.
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Error::new(ErrorKind::Unavailable, "database unavailable").with_source(err)
            }
            // PostgreSQL: connection exceptions (08xxx) and the server shutting
            // down or restarting (57P0x); SQLite: the file is busy or locked.
            sqlx::Error::Database(db)
                if db.code().is_some_and(|code| {
                    code.starts_with("08") || code.starts_with("57P") || code == "5" || code == "6"
                }) =>
            {
                Error::new(ErrorKind::Unavailable, "database unavailable").with_source(err)
            }
            // PostgreSQL: a serialization failure or a deadlock (40001,
            // 40P01): the transaction lost a race, trying again helps.
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|code| code == "40001" || code == "40P01") =>
            {
                Error::new(ErrorKind::Conflict, "concurrent update: retry").with_source(err)
            }
            sqlx::Error::RowNotFound => Error::new(ErrorKind::NotFound, "not found"),
            _ => Error::internal("database error", err),
        }
    }
}

/// Collects every invalid field of a request before failing, so that a client
/// learns about all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<(String, String)>);

impl Violations {
    /// Records that `field` is invalid, with a description of what is expected.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push((field.into(), description.into()));
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
                self.0.extend(err.violations);
                None
            }
        }
    }

    /// Whether no violation was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was recorded, else INVALID_ARGUMENT with them all.
    pub fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.into_error())
        }
    }

    fn into_error(self) -> Error {
        let fields = self
            .0
            .iter()
            .map(|(field, _)| field.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Error {
            kind: ErrorKind::InvalidArgument,
            message: format!("invalid {fields}"),
            violations: self.0,
            reason: None,
            metadata: Vec::new(),
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
