//! The kernel's histograms ([`fathom_common::net::Hist`]: log-linear
//! buckets in nanoseconds) as cumulative OTLP explicit-bucket histograms in
//! seconds, and the deltas between two reads of one kernel entry.

use fathom_common::net::{HIST_BUCKETS, HIST_MIN_SHIFT, HIST_SUB, Hist};

/// Upper bounds (seconds) of every bucket but the last (open) one: OTLP's
/// `explicit_bounds`. Bucket `i` holds values in `[bound[i-1], bound[i])`.
pub fn bounds_seconds() -> Vec<f64> {
    let mut out = Vec::with_capacity(HIST_BUCKETS - 1);
    out.push((1u64 << HIST_MIN_SHIFT) as f64 / 1e9);
    for i in 1..HIST_BUCKETS - 1 {
        let e = HIST_MIN_SHIFT + (i as u32 - 1) / HIST_SUB;
        let sub = (i as u32 - 1) % HIST_SUB;
        let upper = (1u64 << e) as f64 * (1.0 + f64::from(sub + 1) / f64::from(HIST_SUB));
        out.push(upper / 1e9);
    }
    out
}

/// A cumulative histogram in user space.
#[derive(Clone, Debug, PartialEq)]
pub struct HistSum {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: Vec<u64>,
}

impl Default for HistSum {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: vec![0; HIST_BUCKETS],
        }
    }
}

impl HistSum {
    /// Adds what `now` has more than `before` (two reads of one kernel
    /// entry; `before` absent when the entry is new). An entry that went
    /// backwards (deleted and made again) counts from zero.
    pub fn add_delta(&mut self, now: &Hist, before: Option<&Hist>) {
        let reset = before.is_some_and(|b| now.count < b.count);
        let before = before.filter(|_| !reset);
        // Saturating: kernel values are not trusted to stay small.
        self.count = self
            .count
            .saturating_add(now.count - before.map_or(0, |b| b.count.min(now.count)));
        self.sum_ns = self.sum_ns.saturating_add(
            now.sum_ns
                .saturating_sub(before.map_or(0, |b| b.sum_ns.min(now.sum_ns))),
        );
        for (i, slot) in self.buckets.iter_mut().enumerate() {
            let b = before.map_or(0, |b| b.buckets[i]);
            *slot = slot.saturating_add(now.buckets[i].saturating_sub(b));
        }
    }

    /// Adds one observation (user-space-made, e.g. a DNS timeout).
    pub fn observe(&mut self, ns: u64) {
        self.count = self.count.saturating_add(1);
        self.sum_ns = self.sum_ns.saturating_add(ns);
        let slot = &mut self.buckets[fathom_common::net::bucket_index(ns)];
        *slot = slot.saturating_add(1);
    }

    pub fn merge(&mut self, other: &HistSum) {
        self.count = self.count.saturating_add(other.count);
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a = a.saturating_add(*b);
        }
    }

    /// The sum in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_common::net::bucket_index;

    /// The fuzzer's find: kernel values near u64::MAX overflowed the sums.
    #[test]
    fn huge_kernel_values_saturate() {
        let mut h = Hist {
            count: u64::MAX,
            sum_ns: u64::MAX,
            ..Hist::default()
        };
        h.buckets[0] = u64::MAX;
        let mut sum = HistSum::default();
        sum.add_delta(&h, None);
        sum.add_delta(&h, None);
        sum.observe(1);
        let other = sum.clone();
        sum.merge(&other);
        assert_eq!(
            (sum.count, sum.sum_ns, sum.buckets[0]),
            (u64::MAX, u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn bounds_match_the_kernel_buckets() {
        let bounds = bounds_seconds();
        assert_eq!(bounds.len(), HIST_BUCKETS - 1);
        assert_eq!(bounds[0], 16_384e-9);
        assert_eq!(bounds[1], 18_432e-9);
        // Every bucket's values lie below its bound and at or above the
        // previous one.
        for ns in [
            1u64,
            16_383,
            16_384,
            20_000,
            1_000_000,
            20_000_000,
            20_150_000,
            50_000_000,
            999_999_999,
            30_000_000_000,
        ] {
            let i = bucket_index(ns);
            let s = ns as f64 / 1e9;
            if i < bounds.len() {
                assert!(s < bounds[i], "{ns} below bound {i}");
            }
            if i > 0 {
                assert!(s >= bounds[i - 1], "{ns} at or above bound {}", i - 1);
            }
        }
        // Relative width of every finite bucket: at most 12.5%.
        for w in bounds.windows(2) {
            assert!(w[1] / w[0] <= 1.125 + 1e-12);
            assert!(w[1] > w[0]);
        }
    }

    #[test]
    fn deltas() {
        let mut h = Hist {
            count: 2,
            sum_ns: 40_000_000,
            ..Hist::default()
        };
        h.buckets[bucket_index(20_000_000)] = 2;
        let mut sum = HistSum::default();
        sum.add_delta(&h, None);
        let before = h;
        h.count = 3;
        h.sum_ns = 90_000_000;
        h.buckets[bucket_index(50_000_000)] = 1;
        sum.add_delta(&h, Some(&before));
        assert_eq!(sum.count, 3);
        assert_eq!(sum.sum_ns, 90_000_000);
        assert_eq!(sum.buckets.iter().sum::<u64>(), 3);
        // Made again from zero: counted from zero.
        let mut fresh = Hist {
            count: 1,
            sum_ns: 1_000,
            ..Hist::default()
        };
        fresh.buckets[0] = 1;
        sum.add_delta(&fresh, Some(&h));
        assert_eq!((sum.count, sum.sum_ns), (4, 90_001_000));
        sum.observe(5_000_000_000);
        assert_eq!(sum.count, 5);
        assert_eq!(sum.buckets[bucket_index(5_000_000_000)], 1);
    }
}
