//! The catalog service (being built).

#![forbid(unsafe_code)]
