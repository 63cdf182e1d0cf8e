//! The runtime profile's families: records through the local store and
//! the shipper, and the batches the shipper had to retry.
//!
//! Labels come from fixed sets ([`DROP_REASONS`], [`RETRY_REASONS`]),
//! never from input.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, core::Collector};

const STATIC: &str = "static metric definition is valid";

/// `reason` of `sentinel_profile_records_dropped_total`:
/// - `queue_full`: the store's queue was full when the record was pushed;
/// - `closed`: pushed after the store was shut down;
/// - `invalid`: not a JSON object (or a pre-serialized line that does not
///   parse as one);
/// - `write_error`: the store could not write it (disk full, I/O error);
/// - `retention`: stored but not yet shipped when its segment was deleted to
///   keep `max_files` segments;
/// - `partial_line`: a line cut short by a crash, removed when the store
///   was opened again;
/// - `corrupt`: a stored line that is not a JSON object (garbage left by a
///   power loss), skipped by the shipper.
pub const DROP_REASONS: [&str; 7] = [
    "queue_full",
    "closed",
    "invalid",
    "write_error",
    "retention",
    "partial_line",
    "corrupt",
];

/// `reason` of `sentinel_profile_batches_retried_total`: `connect` (no
/// connection or TLS handshake), `timeout` (no answer within the request
/// timeout), `status` (an answer other than 2xx), `error` (anything else:
/// a broken connection mid-request, an unreadable segment).
pub const RETRY_REASONS: [&str; 4] = ["connect", "timeout", "status", "error"];

/// Every family of the runtime profile, cheap to clone.
#[derive(Clone)]
pub struct ProfileMetrics {
    /// Records pushed to the store and not yet taken by its writer.
    pub queued: IntGauge,
    /// Records whose write to a segment returned.
    pub stored: IntCounter,
    /// Records acknowledged by the collector (2xx).
    pub shipped: IntCounter,
    pub dropped: IntCounterVec,
    pub retried: IntCounterVec,
    /// Segment files in the store's directory.
    pub segments: IntGauge,
}

impl ProfileMetrics {
    pub fn new(registry: &Registry) -> Self {
        let queued = IntGauge::new(
            "sentinel_profile_records_queued",
            "Profile records pushed to the store and waiting for its writer",
        )
        .expect(STATIC);
        let stored = IntCounter::new(
            "sentinel_profile_records_stored_total",
            "Profile records written to the local store",
        )
        .expect(STATIC);
        let shipped = IntCounter::new(
            "sentinel_profile_records_shipped_total",
            "Profile records acknowledged by the collector",
        )
        .expect(STATIC);
        let dropped = IntCounterVec::new(
            Opts::new(
                "sentinel_profile_records_dropped_total",
                "Profile records lost, by reason (queue_full, closed, invalid, write_error, retention, partial_line, corrupt)",
            ),
            &["reason"],
        )
        .expect(STATIC);
        let retried = IntCounterVec::new(
            Opts::new(
                "sentinel_profile_batches_retried_total",
                "Batches of profile records the collector did not acknowledge and that will be sent again, by reason (connect, timeout, status, error)",
            ),
            &["reason"],
        )
        .expect(STATIC);
        let segments = IntGauge::new(
            "sentinel_profile_segments",
            "Segment files in the profile store's directory",
        )
        .expect(STATIC);
        for collector in [
            Box::new(queued.clone()) as Box<dyn Collector>,
            Box::new(stored.clone()),
            Box::new(shipped.clone()),
            Box::new(dropped.clone()),
            Box::new(retried.clone()),
            Box::new(segments.clone()),
        ] {
            registry.register(collector).expect(STATIC);
        }
        // Every reason is exported from the start, at 0, so that a rate()
        // over it has a baseline.
        for reason in DROP_REASONS {
            dropped.with_label_values(&[reason]);
        }
        for reason in RETRY_REASONS {
            retried.with_label_values(&[reason]);
        }
        Self {
            queued,
            stored,
            shipped,
            dropped,
            retried,
            segments,
        }
    }

    /// Counts `n` dropped records; `reason` is one of [`DROP_REASONS`].
    pub fn drop_records(&self, reason: &str, n: u64) {
        if n > 0 {
            self.dropped.with_label_values(&[reason]).inc_by(n);
        }
    }

    /// The current value of `sentinel_profile_records_dropped_total{reason}`.
    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped.with_label_values(&[reason]).get()
    }

    /// The current value of `sentinel_profile_batches_retried_total{reason}`.
    pub fn retried(&self, reason: &str) -> u64 {
        self.retried.with_label_values(&[reason]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exported_with_every_reason_at_zero() {
        let registry = Registry::new();
        let metrics = ProfileMetrics::new(&registry);
        metrics.drop_records("queue_full", 3);
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .expect("encode");
        let text = String::from_utf8(text).expect("utf-8");
        assert!(text.contains("sentinel_profile_records_dropped_total{reason=\"queue_full\"} 3"));
        assert!(text.contains("sentinel_profile_records_dropped_total{reason=\"retention\"} 0"));
        assert!(text.contains("sentinel_profile_batches_retried_total{reason=\"status\"} 0"));
        assert!(text.contains("sentinel_profile_records_stored_total 0"));
        assert!(text.contains("sentinel_profile_records_queued 0"));
    }
}
