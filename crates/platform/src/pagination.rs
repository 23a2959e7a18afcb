//! Cursor pagination shared by every `List*` RPC.
//!
//! A page token is opaque to clients: base64url of a small JSON cursor naming
//! the last row of the previous page by its sort key and id. Because the cursor
//! points at a position in a stable order (not an offset), rows inserted while
//! a client pages do not shift or repeat what it sees.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Larger requests are served this many rows.
pub const MAX_PAGE_SIZE: i64 = 500;

/// The number of rows to return for a requested `page_size`: 0 means the
/// default, values above the maximum are capped, negative ones are invalid.
pub fn page_size(requested: i32) -> Result<i64> {
    match requested {
        n if n < 0 => Err(Error::invalid_field("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(i64::from(n).min(MAX_PAGE_SIZE)),
    }
}

/// Where the previous page ended: the sort key (for example `created_at`
/// microseconds) and id of its last row. Rows are ordered by `(key, id)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Sort key of the last row.
    #[serde(rename = "k")]
    pub key: i64,
    /// Id of the last row (tie-breaker), a UUID.
    #[serde(rename = "i")]
    pub id: String,
}

impl Cursor {
    /// The opaque token for this cursor.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Decodes a `page_token`; empty means the first page. A token that was not
    /// produced by [`Cursor::encode`] is INVALID_ARGUMENT on `page_token`.
    pub fn decode(token: &str) -> Result<Option<Self>> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || Error::invalid_field("page_token", "is not a token this service issued");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let cursor: Self = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        // Every row id is a UUID: anything else was crafted by hand, and must
        // not reach the database (PostgreSQL rejects a NUL byte in text with
        // an error that would surface as INTERNAL).
        if uuid::Uuid::parse_str(&cursor.id).is_err() {
            return Err(invalid());
        }
        Ok(Some(cursor))
    }
}

/// Splits one extra fetched row off a page: fetch `size + 1` rows, and if
/// there are more than `size`, the page is the first `size` and the next
/// token points after the last of them.
pub fn next_page<T>(
    mut rows: Vec<T>,
    size: i64,
    cursor_of: impl Fn(&T) -> Cursor,
) -> (Vec<T>, String) {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if rows.len() > size {
        rows.truncate(size);
        let token = rows
            .last()
            .map(|row| cursor_of(row).encode())
            .unwrap_or_default();
        (rows, token)
    } else {
        (rows, String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_cap_and_reject_negatives() {
        assert_eq!(page_size(0).ok(), Some(50));
        assert_eq!(page_size(7).ok(), Some(7));
        assert_eq!(page_size(10_000).ok(), Some(500));
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_rejected() {
        let id = uuid::Uuid::now_v7().to_string();
        let cursor = Cursor { key: 42, id };
        assert_eq!(Cursor::decode(&cursor.encode()).ok(), Some(Some(cursor)));
        for crafted in ["\u{0}", "p1"] {
            let cursor = Cursor {
                key: 1,
                id: crafted.into(),
            };
            assert!(Cursor::decode(&cursor.encode()).is_err(), "{crafted:?}");
        }
        assert_eq!(Cursor::decode("").ok(), Some(None));
        let err = Cursor::decode("not*base64").expect_err("garbage");
        assert_eq!(err.violations()[0].0, "page_token");
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(b"{}")).is_err());
    }

    #[test]
    fn next_page_only_when_more_rows_exist() {
        let cursor = |n: &i64| Cursor {
            key: *n,
            id: uuid::Uuid::from_u128(u128::try_from(*n).unwrap_or_default()).to_string(),
        };
        let (rows, token) = next_page(vec![1, 2, 3], 2, cursor);
        assert_eq!(rows, [1, 2]);
        assert_eq!(
            Cursor::decode(&token).ok().flatten().map(|c| c.key),
            Some(2)
        );
        let (rows, token) = next_page(vec![1, 2], 2, cursor);
        assert_eq!((rows.len(), token.as_str()), (2, ""));
    }
}
