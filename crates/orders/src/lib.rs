//! The orders service (being built).

#![forbid(unsafe_code)]
