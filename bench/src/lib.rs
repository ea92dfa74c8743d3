//! Iris bench drivers: the `iris-bench` load generators (connection flood,
//! message throughput and latency, physical floors) and their helpers.
//!
//! `unsafe` is confined to `poller` (three epoll calls).

pub mod conn;
pub mod flood;
pub mod floor;
pub mod handshake;
pub mod lag;
pub mod msgs;
pub mod poller;
pub mod procfs;
pub mod resp;
pub mod stats;
