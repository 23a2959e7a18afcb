//! The notifications service (being built).

#![forbid(unsafe_code)]
