//! The payments service (being built).

#![forbid(unsafe_code)]
