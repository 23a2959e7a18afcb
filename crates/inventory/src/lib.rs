//! The inventory service (being built).

#![forbid(unsafe_code)]
