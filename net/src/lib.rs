//! Iris wire protocol.
