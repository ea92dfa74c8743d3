//! Iris write-ahead log.
