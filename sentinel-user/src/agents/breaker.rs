//! The circuit breaker of one agent, with the seed's four parameters.
//!
//! - **Closed**: calls go through; `failure-threshold` failures in a row
//!   open the circuit.
//! - **Open**: calls fail at once, without touching the agent, for
//!   `timeout-seconds`; then the circuit is half-open.
//! - **Half-open**: at most `half-open-max-requests` trial calls at once;
//!   `success-threshold` successes in a row close the circuit, one failure
//!   opens it again.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use prometheus::IntGauge;

use crate::config::CircuitBreakerConfig;

/// The state, as `sentinel_agent_circuit_breaker_state` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { since: Instant },
    HalfOpen { trials: u32, successes: u32 },
}

pub struct Breaker {
    config: CircuitBreakerConfig,
    inner: Mutex<Inner>,
    gauge: IntGauge,
}

/// Permission to make one call; report how it went with [`Breaker::done`].
#[must_use]
pub struct Pass {
    trial: bool,
}

impl Breaker {
    pub fn new(config: CircuitBreakerConfig, gauge: IntGauge) -> Arc<Self> {
        gauge.set(State::Closed as i64);
        Arc::new(Self {
            config,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            gauge,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every state is valid after any statement: a poisoned lock holds a
        // usable value.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, inner: &mut Inner, next: Inner) {
        *inner = next;
        self.gauge.set(Self::state_of(inner) as i64);
    }

    fn state_of(inner: &Inner) -> State {
        match inner {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    pub fn state(&self) -> State {
        let mut inner = self.lock();
        self.advance(&mut inner);
        Self::state_of(&inner)
    }

    /// An open circuit whose timeout passed is half-open.
    fn advance(&self, inner: &mut Inner) {
        if let Inner::Open { since } = *inner
            && since.elapsed() >= self.config.timeout
        {
            self.set(
                inner,
                Inner::HalfOpen {
                    trials: 0,
                    successes: 0,
                },
            );
        }
    }

    /// Whether a call may go to the agent now.
    pub fn try_pass(&self) -> Option<Pass> {
        let mut inner = self.lock();
        self.advance(&mut inner);
        match &mut *inner {
            Inner::Closed { .. } => Some(Pass { trial: false }),
            Inner::Open { .. } => None,
            Inner::HalfOpen { trials, .. } => {
                if *trials >= self.config.half_open_max_requests {
                    None
                } else {
                    *trials += 1;
                    Some(Pass { trial: true })
                }
            }
        }
    }

    /// Reports the outcome of a call made with `pass`.
    pub fn done(&self, pass: Pass, ok: bool) {
        let mut inner = self.lock();
        match &mut *inner {
            Inner::Closed { failures } => {
                if ok {
                    *failures = 0;
                } else {
                    *failures += 1;
                    if *failures >= self.config.failure_threshold {
                        self.set(
                            &mut inner,
                            Inner::Open {
                                since: Instant::now(),
                            },
                        );
                    }
                }
            }
            Inner::HalfOpen { trials, successes } => {
                if pass.trial {
                    *trials = trials.saturating_sub(1);
                }
                if !ok {
                    self.set(
                        &mut inner,
                        Inner::Open {
                            since: Instant::now(),
                        },
                    );
                } else {
                    *successes += 1;
                    if *successes >= self.config.success_threshold {
                        self.set(&mut inner, Inner::Closed { failures: 0 });
                    }
                }
            }
            // A call that started before the circuit opened: its outcome
            // says nothing new.
            Inner::Open { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(failures: u32, successes: u32, timeout_ms: u64, half_open: u32) -> Arc<Breaker> {
        Breaker::new(
            CircuitBreakerConfig {
                failure_threshold: failures,
                success_threshold: successes,
                timeout: Duration::from_millis(timeout_ms),
                half_open_max_requests: half_open,
            },
            IntGauge::new("test_breaker_state", "test").unwrap(),
        )
    }

    #[test]
    fn opens_at_the_threshold_and_only_for_consecutive_failures() {
        let b = breaker(3, 1, 60_000, 1);
        for _ in 0..2 {
            let p = b.try_pass().unwrap();
            b.done(p, false);
        }
        let p = b.try_pass().unwrap();
        b.done(p, true);
        for _ in 0..2 {
            let p = b.try_pass().unwrap();
            b.done(p, false);
        }
        assert_eq!(b.state(), State::Closed);
        let p = b.try_pass().unwrap();
        b.done(p, false);
        assert_eq!(b.state(), State::Open);
        assert!(b.try_pass().is_none());
        assert_eq!(b.gauge.get(), 1);
    }

    #[test]
    fn half_opens_after_the_timeout_and_limits_trials() {
        let b = breaker(1, 2, 30, 1);
        let p = b.try_pass().unwrap();
        b.done(p, false);
        assert!(b.try_pass().is_none());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.gauge.get(), 2);
        let trial = b.try_pass().unwrap();
        assert!(b.try_pass().is_none(), "one trial at a time");
        b.done(trial, true);
        assert_eq!(b.state(), State::HalfOpen, "two successes close it");
        let trial = b.try_pass().unwrap();
        b.done(trial, true);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn a_failed_trial_opens_again() {
        let b = breaker(1, 1, 20, 2);
        let p = b.try_pass().unwrap();
        b.done(p, false);
        std::thread::sleep(Duration::from_millis(30));
        let t1 = b.try_pass().unwrap();
        let t2 = b.try_pass().unwrap();
        assert!(b.try_pass().is_none());
        b.done(t1, false);
        assert_eq!(b.state(), State::Open);
        // The other trial's late success does not close it.
        b.done(t2, true);
        assert_eq!(b.state(), State::Open);
    }
}
