//! Sentinel: a host-level HTTP security layer. This crate is the daemon and
//! its command-line interface; the kernel programs live in `sentinel-ebpf`.
//!
//! Modules follow the path of a packet or a request: `config` is read
//! first, `kernel` loads and drives the XDP fast path, `admin` serves the
//! operator API on a Unix socket that `cli` talks to, and `metrics` exposes
//! both layers to Prometheus. `daemon` wires them together.

pub mod admin;
pub mod agents;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod form;
pub mod inspect;
pub mod kernel;
pub mod metrics;
pub mod net;
pub mod profile;
pub mod proxy;
