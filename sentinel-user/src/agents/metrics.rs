//! The agent families: the seed's five, the kernel push counter, the
//! decompression pair of the body-inspection pipeline, and decisions.
//!
//! Labels are agent names and route names from the configuration, event
//! names, and fixed sets of statuses, errors and results.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, core::Collector,
};

const STATIC: &str = "static metric definition is valid";

/// `status` of `sentinel_agent_requests_total`.
pub const CALL_STATUSES: [&str; 4] = ["success", "error", "timeout", "circuit_open"];

#[derive(Clone)]
pub struct AgentMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub errors: IntCounterVec,
    pub timeouts: IntCounterVec,
    pub breaker_state: IntGaugeVec,
    pub kernel_push: IntCounterVec,
    pub decompression: IntCounterVec,
    pub decompression_ratio: HistogramVec,
    pub decisions: IntCounterVec,
}

impl AgentMetrics {
    pub fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "sentinel_agent_requests_total",
                "Agent calls by agent and status (success, error, timeout, circuit_open)",
            ),
            &["agent", "status"],
        )
        .expect(STATIC);
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sentinel_agent_duration_seconds",
                "Agent call latency, by agent and event",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
            &["agent", "event"],
        )
        .expect(STATIC);
        let errors = IntCounterVec::new(
            Opts::new(
                "sentinel_agent_errors_total",
                "Agent call errors, by agent and error (connect, closed, protocol, version, too_large, refused, transport, timeout, circuit_open)",
            ),
            &["agent", "error"],
        )
        .expect(STATIC);
        let timeouts = IntCounterVec::new(
            Opts::new(
                "sentinel_agent_timeouts_total",
                "Agent calls that did not finish within their timeout",
            ),
            &["agent"],
        )
        .expect(STATIC);
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "sentinel_agent_circuit_breaker_state",
                "Circuit breaker state per agent: 0 closed, 1 open, 2 half-open",
            ),
            &["agent"],
        )
        .expect(STATIC);
        let kernel_push = IntCounterVec::new(
            Opts::new(
                "sentinel_kernel_push_total",
                "Kernel deny and watch requests from agents, by agent and result",
            ),
            &["agent", "result"],
        )
        .expect(STATIC);
        let decompression = IntCounterVec::new(
            Opts::new(
                "sentinel_decompression_total",
                "Body decompressions for inspection, by encoding and result (success, ratio_exceeded, size_exceeded, invalid_data, io_error)",
            ),
            &["encoding", "result"],
        )
        .expect(STATIC);
        let decompression_ratio = HistogramVec::new(
            HistogramOpts::new(
                "sentinel_decompression_ratio",
                "Decompressed over compressed size of inspected bodies, by encoding",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
            ]),
            &["encoding"],
        )
        .expect(STATIC);
        let decisions = IntCounterVec::new(
            Opts::new(
                "sentinel_decisions_total",
                "Agent decisions other than allow, by route, decision and whether it was enforced",
            ),
            &["route", "decision", "enforced"],
        )
        .expect(STATIC);
        for collector in [
            Box::new(requests.clone()) as Box<dyn Collector>,
            Box::new(duration.clone()),
            Box::new(errors.clone()),
            Box::new(timeouts.clone()),
            Box::new(breaker_state.clone()),
            Box::new(kernel_push.clone()),
            Box::new(decompression.clone()),
            Box::new(decompression_ratio.clone()),
            Box::new(decisions.clone()),
        ] {
            registry.register(collector).expect(STATIC);
        }
        Self {
            requests,
            duration,
            errors,
            timeouts,
            breaker_state,
            kernel_push,
            decompression,
            decompression_ratio,
            decisions,
        }
    }
}

/// One agent's handles, resolved once so that a call does not hash labels.
pub struct AgentCounters {
    pub statuses: [IntCounter; 4],
    pub timeouts: IntCounter,
    pub duration: [Histogram; 8],
    pub family: AgentMetrics,
    pub agent: String,
}

impl AgentCounters {
    pub fn new(metrics: &AgentMetrics, agent: &str) -> Self {
        use sentinel_agent_protocol::EventType;
        Self {
            statuses: CALL_STATUSES.map(|s| metrics.requests.with_label_values(&[agent, s])),
            timeouts: metrics.timeouts.with_label_values(&[agent]),
            duration: EventType::ALL
                .map(|e| metrics.duration.with_label_values(&[agent, e.as_str()])),
            family: metrics.clone(),
            agent: agent.to_owned(),
        }
    }

    pub fn breaker_gauge(&self) -> IntGauge {
        self.family.breaker_state.with_label_values(&[&self.agent])
    }

    pub fn error(&self, kind: &str) {
        self.family
            .errors
            .with_label_values(&[&self.agent, kind])
            .inc();
    }
}
