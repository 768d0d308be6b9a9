//! Event-time windows as rings of buckets.
//!
//! A window of length W is `BUCKETS` buckets of width W / BUCKETS. At event time `t` the
//! window holds the bucket that contains `t` and the `BUCKETS - 1` before it: between
//! W − width and W of history, decided by event time alone, never the wall clock, so a
//! replay in the same order computes the same values. An event older than the window of the
//! newest bucket is too old to count anywhere and is ignored; events out of order inside the
//! window land in their own bucket.

/// Buckets per window.
pub const BUCKETS: usize = 12;

/// A window length and its bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub name: &'static str,
    pub width_ms: i64,
}

impl WindowSpec {
    pub const fn new(name: &'static str, length_ms: i64) -> WindowSpec {
        WindowSpec {
            name,
            width_ms: length_ms / BUCKETS as i64,
        }
    }

    pub fn length_ms(&self) -> i64 {
        self.width_ms * BUCKETS as i64
    }

    fn bucket(&self, t_ms: i64) -> i64 {
        t_ms.div_euclid(self.width_ms)
    }
}

/// The windows of customer velocity: 1 minute, 1 hour, 24 hours, 7 days.
pub const WINDOWS: [WindowSpec; 4] = [
    WindowSpec::new("1m", 60_000),
    WindowSpec::new("1h", 3_600_000),
    WindowSpec::new("24h", 86_400_000),
    WindowSpec::new("7d", 604_800_000),
];

/// One bucket: which bucket index it holds (`EMPTY` if none), its count and amount sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    pub index: i64,
    pub count: u32,
    pub sum: f64,
}

pub const EMPTY: i64 = i64::MIN;

impl Default for Slot {
    fn default() -> Self {
        Slot {
            index: EMPTY,
            count: 0,
            sum: 0.0,
        }
    }
}

/// Count and amount sum over one window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Counter {
    pub slots: [Slot; BUCKETS],
}

impl Counter {
    /// Counts an event of `amount` at `t_ms`.
    pub fn add(&mut self, spec: &WindowSpec, t_ms: i64, amount: f64) {
        let b = spec.bucket(t_ms);
        let newest = self.slots.iter().map(|s| s.index).max().unwrap_or(EMPTY);
        if newest != EMPTY && b <= newest - BUCKETS as i64 {
            return; // older than any window that can still be asked about
        }
        let slot = &mut self.slots[b.rem_euclid(BUCKETS as i64) as usize];
        if slot.index != b {
            if slot.index > b {
                return; // the slot holds a newer bucket: this one has left the ring
            }
            *slot = Slot {
                index: b,
                count: 0,
                sum: 0.0,
            };
        }
        slot.count = slot.count.saturating_add(1);
        slot.sum += amount;
    }

    /// (count, sum) of the window ending in the bucket of `t_ms`.
    pub fn query(&self, spec: &WindowSpec, t_ms: i64) -> (u32, f64) {
        let cur = spec.bucket(t_ms);
        let lo = cur - (BUCKETS as i64 - 1);
        self.slots
            .iter()
            .filter(|s| s.index != EMPTY && s.index >= lo && s.index <= cur)
            .fold((0, 0.0), |(c, s), slot| (c + slot.count, s + slot.sum))
    }

    /// The newest event time this counter can still answer for, for expiry.
    pub fn newest_bucket_end_ms(&self, spec: &WindowSpec) -> Option<i64> {
        self.slots
            .iter()
            .map(|s| s.index)
            .filter(|&i| i != EMPTY)
            .max()
            .map(|i| (i + 1) * spec.width_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: WindowSpec = WINDOWS[0]; // 1 minute of 5-second buckets

    #[test]
    fn bucket_boundaries() {
        let mut c = Counter::default();
        c.add(&M, 0, 1.0);
        c.add(&M, 4_999, 2.0);
        c.add(&M, 5_000, 4.0);
        assert_eq!(c.query(&M, 4_999), (2, 3.0));
        assert_eq!(c.query(&M, 5_000), (3, 7.0));
        // At 59.999 s all 12 buckets 0..=11 are in; at 60 s bucket 0 has left.
        assert_eq!(c.query(&M, 59_999), (3, 7.0));
        assert_eq!(c.query(&M, 60_000), (1, 4.0));
        assert_eq!(c.query(&M, 65_000), (0, 0.0));
    }

    #[test]
    fn too_old_events_are_ignored_and_negative_times_work() {
        let mut c = Counter::default();
        c.add(&M, 1_000_000, 1.0);
        c.add(&M, 1_000_000 - 60_000, 5.0); // a whole window older: ignored
        assert_eq!(c.query(&M, 1_000_000), (1, 1.0));
        let mut n = Counter::default();
        n.add(&M, -1, 1.0);
        n.add(&M, -5_001, 1.0);
        assert_eq!(n.query(&M, -1), (2, 2.0));
    }

    /// The exact answer: events whose bucket lies in the window of `t`, among those not
    /// dropped for being older than the newest bucket's window when they arrived.
    fn reference(events: &[(i64, f64)], spec: &WindowSpec, t: i64) -> (u32, f64) {
        let bucket = |x: i64| x.div_euclid(spec.width_ms);
        let mut kept: Vec<(i64, f64)> = Vec::new();
        let mut newest = i64::MIN;
        for &(e, a) in events {
            let b = bucket(e);
            if newest != i64::MIN && b <= newest - BUCKETS as i64 {
                continue;
            }
            newest = newest.max(b);
            kept.push((e, a));
        }
        let cur = bucket(t);
        // A kept event also leaves the ring once a bucket BUCKETS newer was written; such a
        // bucket is newer than `cur`'s window only if the event is outside it anyway.
        kept.iter()
            .filter(|(e, _)| bucket(*e) <= cur && bucket(*e) > cur - BUCKETS as i64)
            .fold((0, 0.0), |(c, s), (_, a)| (c + 1, s + a))
    }

    proptest! {
        #[test]
        fn matches_reference_out_of_order(
            events in proptest::collection::vec((0i64..600_000, 0u32..1000), 0..60),
            t in 0i64..700_000,
        ) {
            let events: Vec<(i64, f64)> = events.into_iter().map(|(e, a)| (e, a as f64)).collect();
            let mut c = Counter::default();
            for &(e, a) in &events {
                c.add(&M, e, a);
            }
            // Only ask about times at or after the newest event, as features do.
            let newest = events.iter().map(|e| e.0).max().unwrap_or(0);
            let t = t.max(newest);
            let (count, sum) = c.query(&M, t);
            let (rc, rs) = reference(&events, &M, t);
            prop_assert_eq!(count, rc);
            prop_assert!((sum - rs).abs() < 1e-6);
        }

        #[test]
        fn in_order_equals_exact_bucket_window(
            mut times in proptest::collection::vec(0i64..10_000_000, 1..80),
        ) {
            times.sort();
            for spec in &WINDOWS {
                let mut c = Counter::default();
                for &e in &times {
                    c.add(spec, e, 1.0);
                }
                let t = *times.last().unwrap();
                let cur = t.div_euclid(spec.width_ms);
                let want = times
                    .iter()
                    .filter(|e| e.div_euclid(spec.width_ms) > cur - BUCKETS as i64)
                    .count() as u32;
                prop_assert_eq!(c.query(spec, t).0, want);
            }
        }
    }
}
