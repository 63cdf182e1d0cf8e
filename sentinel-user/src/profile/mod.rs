//! The runtime profile: what the daemon records about each request, the
//! client, the uploads and the host, kept in a local store and shipped to a
//! collector.
//!
//! - [`store`]: records as JSON Lines in rotated segments, written by one
//!   background task behind a bounded queue;
//! - [`shipper`]: store-and-forward of those segments to a collector over
//!   HTTP(S), from a persisted cursor;
//! - [`multipart`]: file uploads seen in multipart/form-data bodies, in
//!   bounded memory;
//! - [`client`]: device, platform and browser from the User-Agent, and the
//!   kind of network the client address is on;
//! - [`host`]: host and process facts, sampled in the background;
//! - [`json`]: JSON written member by member, for records;
//! - [`metrics`]: the `sentinel_profile_*` families;
//! - [`runtime`]: all of the above as the daemon starts and stops them.

pub mod client;
pub mod host;
pub mod json;
pub mod metrics;
pub mod multipart;
pub mod runtime;
pub mod shipper;
pub mod store;

#[cfg(test)]
mod tests_multipart;
#[cfg(test)]
mod tests_shipper;
#[cfg(test)]
mod tests_store;
