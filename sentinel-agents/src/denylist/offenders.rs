//! Counting blocks per client, in bounded memory.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

/// Blocks per client address in fixed windows: a client's window opens at
/// its first block and lasts `window`; reaching `after` blocks in it is an
/// offence, which resets the client's count.
///
/// At most `capacity` clients are tracked. Windows that have ended are
/// dropped as new blocks arrive; when the table is full of live windows,
/// the oldest is dropped to make room, so a flood of distinct addresses
/// costs the oldest (least likely to reach the threshold) their count,
/// never memory.
#[derive(Debug)]
pub struct Offenders {
    after: u32,
    window: Duration,
    capacity: usize,
    counts: HashMap<IpAddr, Count>,
    /// Window starts in the order they opened. An item whose start no
    /// longer matches its client's count is stale and skipped.
    opened: VecDeque<(IpAddr, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Count {
    start: Instant,
    blocks: u32,
}

impl Offenders {
    pub fn new(after: u32, window: Duration, capacity: usize) -> Self {
        Self {
            after,
            window,
            capacity: capacity.max(1),
            counts: HashMap::new(),
            opened: VecDeque::new(),
        }
    }

    /// Clients tracked now.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Counts a block of `ip` at `now`; `Some(blocks)` when that makes an
    /// offence. `after == 0` never does and tracks nothing.
    pub fn record(&mut self, ip: IpAddr, now: Instant) -> Option<u32> {
        if self.after == 0 {
            return None;
        }
        self.expire(now);
        let blocks = match self.counts.get_mut(&ip) {
            Some(count) => {
                count.blocks += 1;
                count.blocks
            }
            None => {
                if self.counts.len() >= self.capacity {
                    self.evict_oldest();
                }
                self.counts.insert(
                    ip,
                    Count {
                        start: now,
                        blocks: 1,
                    },
                );
                self.opened.push_back((ip, now));
                1
            }
        };
        if blocks < self.after {
            return None;
        }
        // Pushed: the next offence needs `after` fresh blocks. Its item in
        // `opened` goes stale and is dropped in time.
        self.counts.remove(&ip);
        self.compact();
        Some(blocks)
    }

    fn is_live(&self, ip: &IpAddr, start: Instant) -> bool {
        self.counts.get(ip).is_some_and(|c| c.start == start)
    }

    /// Drops windows that ended by `now`; `opened` is in start order.
    fn expire(&mut self, now: Instant) {
        while let Some(&(ip, start)) = self.opened.front() {
            if now.saturating_duration_since(start) < self.window {
                break;
            }
            self.opened.pop_front();
            if self.is_live(&ip, start) {
                self.counts.remove(&ip);
            }
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((ip, start)) = self.opened.pop_front() {
            if self.is_live(&ip, start) {
                self.counts.remove(&ip);
                return;
            }
        }
    }

    /// Offences leave stale items behind; keep them from outgrowing the
    /// live ones.
    fn compact(&mut self) {
        if self.opened.len() > 2 * self.capacity {
            let counts = &self.counts;
            self.opened
                .retain(|(ip, start)| counts.get(ip).is_some_and(|c| c.start == *start));
        }
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.opened.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn the_nth_block_within_the_window_is_an_offence() {
        let t0 = Instant::now();
        let mut o = Offenders::new(3, Duration::from_secs(60), 100);
        assert_eq!(o.record(ip(1), t0), None);
        assert_eq!(o.record(ip(1), t0 + Duration::from_secs(10)), None);
        assert_eq!(o.record(ip(2), t0 + Duration::from_secs(10)), None);
        assert_eq!(o.record(ip(1), t0 + Duration::from_secs(59)), Some(3));
        // The count starts again after an offence.
        assert_eq!(o.record(ip(1), t0 + Duration::from_secs(59)), None);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn blocks_in_an_ended_window_do_not_count() {
        let t0 = Instant::now();
        let mut o = Offenders::new(2, Duration::from_secs(60), 100);
        assert_eq!(o.record(ip(1), t0), None);
        assert_eq!(o.record(ip(1), t0 + Duration::from_secs(60)), None);
        assert_eq!(o.record(ip(1), t0 + Duration::from_secs(61)), Some(2));
    }

    #[test]
    fn zero_disables_and_tracks_nothing() {
        let mut o = Offenders::new(0, Duration::from_secs(60), 100);
        for _ in 0..10 {
            assert_eq!(o.record(ip(1), Instant::now()), None);
        }
        assert!(o.is_empty());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_addresses() {
        let t0 = Instant::now();
        let mut o = Offenders::new(2, Duration::from_secs(3600), 1000);
        for n in 0..100_000 {
            o.record(ip(n), t0);
        }
        assert_eq!(o.len(), 1000);
        assert!(o.queued() <= 2 * 1000 + 1);
        // The newest were kept: a second block of one of them offends.
        assert_eq!(o.record(ip(99_999), t0), Some(2));
        // The oldest were dropped: a second block starts a fresh count.
        assert_eq!(o.record(ip(0), t0), None);
    }

    #[test]
    fn offences_leave_no_unbounded_trail() {
        let t0 = Instant::now();
        let mut o = Offenders::new(1, Duration::from_secs(3600), 10);
        for n in 0..10_000 {
            assert_eq!(o.record(ip(n % 3), t0), Some(1));
        }
        assert!(o.is_empty());
        assert!(o.queued() <= 2 * 10 + 1, "{} queued", o.queued());
    }

    #[test]
    fn ended_windows_are_dropped_as_time_passes() {
        let t0 = Instant::now();
        let mut o = Offenders::new(5, Duration::from_secs(10), 1000);
        for n in 0..500 {
            o.record(ip(n), t0);
        }
        assert_eq!(o.len(), 500);
        o.record(ip(9999), t0 + Duration::from_secs(11));
        assert_eq!(o.len(), 1);
        assert_eq!(o.queued(), 1);
    }
}
