//! Iris bench drivers (shared helpers).
