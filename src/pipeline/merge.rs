//! The event-time merge of a task's inputs (Kafka Streams' record queues and partition
//! group): partition p of navigation, repartition and transactions is one task, and its
//! records are processed in event-time order across the three.
//!
//! The rule: the record with the earliest event time among the heads of the task's queues
//! goes next (at equal times, the lower input index first, so a page view of the same
//! millisecond counts for the purchase). While another input of the task has nothing
//! buffered, the task waits for it as Kafka Streams does (`PartitionGroup.readyToProcess`,
//! KIP-695): for an input with records on the broker not fetched yet, or whose position is
//! not known yet (not caught up, [`Progress`] says), until they are fetched, bounded by
//! `max_fetch_wait` only for a broker that does not answer; for an input at its end, at
//! most `max_idle` (Kafka Streams' `max.task.idle.ms`, 0 by default: a record still to be
//! produced upstream is not waited for). Both count from when the task started waiting;
//! when the wait runs out the task goes on without the input, and the merge says so once
//! per episode. Records that touch no state (bad ones, forwards) carry the earliest time and
//! never wait.
//!
//! Owns the buffered records and nothing else: no I/O; what is caught up is asked of
//! [`Progress`], which the pipeline answers from the consumer.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// The inputs of a task, in tie-break order.
pub const INPUTS: usize = 3;
pub const NAV: usize = 0;
pub const REPARTITION: usize = 1;
pub const TX: usize = 2;

/// Whether an input partition has delivered everything it has now: `false` while the
/// broker holds records of it not fetched yet, or while its position is not known.
pub trait Progress {
    fn caught_up(&mut self, input: usize, partition: i32) -> bool;
}

/// One buffered record.
#[derive(Debug)]
pub struct Queued<T> {
    pub input: usize,
    pub partition: i32,
    /// Event time; `i64::MIN` for a record that touches no state.
    pub time: i64,
    pub arrived: Instant,
    /// Memory it holds, as the caller counts it (for the merge's byte bounds).
    pub bytes: usize,
    pub item: T,
}

#[derive(Debug)]
struct Task<T> {
    queues: [VecDeque<Queued<T>>; INPUTS],
    /// Bytes of each queue.
    bytes: [usize; INPUTS],
    /// Since when the task has been waiting for an input.
    blocked_since: Option<Instant>,
    /// The wait ran out in this episode (reported once).
    gave_up: bool,
}

impl<T> Default for Task<T> {
    fn default() -> Self {
        Task {
            queues: Default::default(),
            bytes: [0; INPUTS],
            blocked_since: None,
            gave_up: false,
        }
    }
}

/// A task that stopped waiting for an input.
#[derive(Debug, PartialEq)]
pub struct GaveUp {
    pub partition: i32,
    pub waited: Duration,
    /// The input waited for had records on the broker not fetched (`max_fetch_wait` ran
    /// out), rather than being at its end (`max_idle` ran out).
    pub behind: bool,
}

/// What [`Merge::select`] noticed, for the caller to log and count.
#[derive(Debug, Default, PartialEq)]
pub struct Selected {
    /// Tasks that stopped waiting for an input this call.
    pub gave_up: Vec<GaveUp>,
    /// How long each selected transaction waited in the merge.
    pub tx_waits: Vec<Duration>,
}

#[derive(Debug)]
pub struct Merge<T> {
    tasks: BTreeMap<i32, Task<T>>,
    /// Which inputs exist (an input not read never holds a task back).
    present: [bool; INPUTS],
    /// The wait for an input at its end.
    max_idle: Duration,
    /// The wait for an input with records on the broker not fetched yet.
    max_fetch_wait: Duration,
    buffered: usize,
    buffered_bytes: usize,
    /// Where the next selection starts, so that under backlog every partition is served in
    /// turn, not the lowest-numbered first.
    next_start: i32,
}

impl<T> Merge<T> {
    pub fn new(present: [bool; INPUTS], max_idle: Duration, max_fetch_wait: Duration) -> Merge<T> {
        Merge {
            tasks: BTreeMap::new(),
            present,
            max_idle,
            max_fetch_wait,
            buffered: 0,
            buffered_bytes: 0,
            next_start: 0,
        }
    }

    pub fn push(&mut self, q: Queued<T>) {
        let task = self.tasks.entry(q.partition).or_default();
        task.bytes[q.input] += q.bytes;
        self.buffered += 1;
        self.buffered_bytes += q.bytes;
        task.queues[q.input].push_back(q);
    }

    /// Records buffered, over all partitions.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Bytes buffered, over all partitions.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Records and bytes buffered for `input` of `partition`.
    pub fn queued(&self, input: usize, partition: i32) -> (usize, usize) {
        self.tasks
            .get(&partition)
            .map_or((0, 0), |t| (t.queues[input].len(), t.bytes[input]))
    }

    /// Forgets what is buffered for `partition` (revoked, or rewound).
    pub fn drop_partition(&mut self, partition: i32) {
        if let Some(task) = self.tasks.remove(&partition) {
            self.buffered -= task.queues.iter().map(VecDeque::len).sum::<usize>();
            self.buffered_bytes -= task.bytes.iter().sum::<usize>();
        }
    }

    pub fn clear(&mut self) {
        self.tasks.clear();
        self.buffered = 0;
        self.buffered_bytes = 0;
    }

    /// Moves up to `max` records that may be processed now into `out`, each partition's in
    /// event-time order, partitions served in turn.
    pub fn select(
        &mut self,
        progress: &mut impl Progress,
        max: usize,
        now: Instant,
        out: &mut Vec<Queued<T>>,
    ) -> Selected {
        let mut seen = Selected::default();
        let limit = out.len() + max;
        let partitions: Vec<i32> = self.tasks.keys().copied().collect();
        let first = partitions
            .iter()
            .position(|&p| p >= self.next_start)
            .unwrap_or(0);
        let order = partitions[first..].iter().chain(&partitions[..first]);
        // Each partition takes at most its share of `max` in this round, so one partition's
        // backlog does not crowd out the others; what is left over goes round again.
        let share = (max / partitions.len().max(1)).max(1);
        let mut last = None;
        for &p in order {
            if out.len() >= limit {
                break;
            }
            let quota = share.min(limit - out.len());
            self.select_partition(p, progress, quota, now, out, &mut seen);
            last = Some(p);
        }
        if let Some(p) = last {
            self.next_start = p + 1;
        }
        for &p in &partitions {
            if out.len() >= limit {
                break;
            }
            let quota = limit - out.len();
            self.select_partition(p, progress, quota, now, out, &mut seen);
        }
        seen
    }

    fn select_partition(
        &mut self,
        p: i32,
        progress: &mut impl Progress,
        quota: usize,
        now: Instant,
        out: &mut Vec<Queued<T>>,
        seen: &mut Selected,
    ) {
        let Some(task) = self.tasks.get_mut(&p) else {
            return;
        };
        let mut taken = 0;
        while taken < quota {
            let head = (0..INPUTS)
                .filter_map(|i| task.queues[i].front().map(|h| (h.time, i)))
                .min();
            let Some((time, i)) = head else { break };
            if time != i64::MIN {
                // The longest wait any other input with nothing buffered asks for. Once an
                // input asks for the longest there is, the others are not asked (asking may
                // be a request to the broker).
                let longest = self.max_idle.max(self.max_fetch_wait);
                let mut wait: Option<(Duration, bool)> = None;
                for j in (0..INPUTS).filter(|&j| j != i) {
                    if wait.is_some_and(|w| w.0 >= longest) {
                        break;
                    }
                    if !self.present[j] || !task.queues[j].is_empty() {
                        continue;
                    }
                    let asks = if progress.caught_up(j, p) {
                        (self.max_idle, false)
                    } else {
                        (self.max_fetch_wait, true)
                    };
                    if wait.is_none_or(|w| asks.0 > w.0) {
                        wait = Some(asks);
                    }
                }
                match wait {
                    Some((limit, behind)) if !limit.is_zero() => {
                        // The wait counts from when the task started waiting, not from the
                        // record's arrival: a record can sit long in a backlog of its own
                        // input without any input being idle.
                        let since = *task.blocked_since.get_or_insert(now);
                        let waited = now.duration_since(since);
                        if waited < limit {
                            break;
                        }
                        if !task.gave_up {
                            task.gave_up = true;
                            seen.gave_up.push(GaveUp {
                                partition: p,
                                waited,
                                behind,
                            });
                        }
                    }
                    _ => {
                        task.blocked_since = None;
                        task.gave_up = false;
                    }
                }
            }
            let rec = task.queues[i].pop_front().expect("head");
            if i == TX {
                seen.tx_waits.push(now.duration_since(rec.arrived));
            }
            task.bytes[i] -= rec.bytes;
            self.buffered -= 1;
            self.buffered_bytes -= rec.bytes;
            out.push(rec);
            taken += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// Caught up: the inputs (by index) in the set.
    struct Caught(HashSet<usize>);

    impl Progress for Caught {
        fn caught_up(&mut self, input: usize, _: i32) -> bool {
            self.0.contains(&input)
        }
    }

    fn all() -> Caught {
        Caught((0..INPUTS).collect())
    }

    fn q(input: usize, partition: i32, time: i64, at: Instant) -> Queued<(usize, i64)> {
        Queued {
            input,
            partition,
            time,
            arrived: at,
            bytes: 100,
            item: (input, time),
        }
    }

    fn items(out: &[Queued<(usize, i64)>]) -> Vec<(usize, i64)> {
        out.iter().map(|r| r.item).collect()
    }

    #[test]
    fn earliest_head_first_and_navigation_before_a_purchase_of_the_same_time() {
        let now = Instant::now();
        let mut m = Merge::new([true; INPUTS], Duration::ZERO, FETCH_WAIT);
        m.push(q(TX, 0, 10, now));
        m.push(q(TX, 0, 30, now));
        m.push(q(NAV, 0, 5, now));
        m.push(q(NAV, 0, 30, now));
        m.push(q(REPARTITION, 0, 20, now));
        let mut out = Vec::new();
        m.select(&mut all(), 100, now, &mut out);
        assert_eq!(
            items(&out),
            vec![(NAV, 5), (TX, 10), (REPARTITION, 20), (NAV, 30), (TX, 30)]
        );
        assert_eq!(m.buffered(), 0);
        assert_eq!(m.buffered_bytes(), 0);
    }

    const FETCH_WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_late_first_fetch_is_waited_for_and_its_earlier_record_goes_first() {
        // The start-up race: the transactions' first fetch came back, the navigation's not
        // yet (its position is not known, or the broker has records of it not fetched).
        let t0 = Instant::now();
        let mut m = Merge::new([true, false, true], Duration::ZERO, FETCH_WAIT);
        m.push(q(TX, 3, 100, t0));
        let mut behind = Caught(HashSet::from([TX]));
        let mut out = Vec::new();
        for late in [0, 50, 500, 5_000] {
            let seen = m.select(&mut behind, 10, t0 + Duration::from_millis(late), &mut out);
            assert!(
                out.is_empty(),
                "{late} ms: the navigation may hold an earlier event"
            );
            assert!(seen.gave_up.is_empty());
        }
        let fetched = t0 + Duration::from_millis(5_001);
        m.push(q(NAV, 3, 99, fetched));
        m.push(q(NAV, 3, 101, fetched));
        let seen = m.select(&mut all(), 10, fetched, &mut out);
        assert_eq!(items(&out), vec![(NAV, 99), (TX, 100), (NAV, 101)]);
        assert!(seen.gave_up.is_empty());
    }

    #[test]
    fn a_broker_that_does_not_answer_is_waited_for_max_fetch_wait_then_given_up_once() {
        let t0 = Instant::now();
        let mut m = Merge::new([true, false, true], Duration::ZERO, FETCH_WAIT);
        m.push(q(TX, 3, 100, t0));
        let mut behind = Caught(HashSet::from([TX]));
        let mut out = Vec::new();
        m.select(&mut behind, 10, t0, &mut out);
        m.select(
            &mut behind,
            10,
            t0 + FETCH_WAIT - Duration::from_millis(1),
            &mut out,
        );
        assert!(out.is_empty());
        let expired = t0 + FETCH_WAIT;
        let seen = m.select(&mut behind, 10, expired, &mut out);
        assert_eq!(items(&out), vec![(TX, 100)]);
        let gave_up = GaveUp {
            partition: 3,
            waited: FETCH_WAIT,
            behind: true,
        };
        assert_eq!(seen.gave_up, vec![gave_up]);
        // Same episode: not reported again, and the task no longer waits.
        m.push(q(TX, 3, 101, expired));
        let seen = m.select(&mut behind, 10, expired, &mut out);
        assert!(seen.gave_up.is_empty());
        assert_eq!(out.len(), 2);
        // The input catches up and comes back: a new episode waits again.
        m.push(q(NAV, 3, 102, expired));
        m.select(&mut behind, 10, expired, &mut out);
        assert_eq!(items(&out)[2..], [(NAV, 102)]);
        m.push(q(TX, 3, 103, expired));
        m.select(&mut behind, 10, expired, &mut out);
        assert_eq!(out.len(), 3, "waiting for the navigation again");
    }

    #[test]
    fn an_input_at_its_end_is_waited_for_max_idle_only() {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut m = Merge::new([true, true, true], Duration::ZERO, FETCH_WAIT);
        m.push(q(TX, 0, 100, t0));
        let seen = m.select(&mut all(), 10, t0, &mut out);
        assert_eq!(
            items(&out),
            vec![(TX, 100)],
            "nothing to wait for by default"
        );
        assert!(seen.gave_up.is_empty());

        let idle = Duration::from_millis(50);
        let mut m = Merge::new([true, true, true], idle, FETCH_WAIT);
        let mut out = Vec::new();
        m.push(q(TX, 0, 100, t0));
        m.select(
            &mut all(),
            10,
            t0 + idle - Duration::from_millis(1),
            &mut out,
        );
        assert!(out.is_empty(), "a record may still be produced upstream");
        let seen = m.select(&mut all(), 10, t0 + Duration::from_secs(1), &mut out);
        assert_eq!(items(&out), vec![(TX, 100)]);
        assert_eq!(seen.gave_up.len(), 1);
        assert!(!seen.gave_up[0].behind);

        // One input at its end, one behind: the longer wait holds.
        let mut m = Merge::new([true, true, true], idle, FETCH_WAIT);
        let mut out = Vec::new();
        m.push(q(TX, 0, 100, t0));
        let mut repartition_behind = Caught(HashSet::from([NAV, TX]));
        m.select(
            &mut repartition_behind,
            10,
            t0 + Duration::from_secs(1),
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn records_that_touch_no_state_never_wait_and_absent_inputs_are_not_waited_for() {
        let now = Instant::now();
        let mut m = Merge::new([true, false, true], Duration::from_secs(60), FETCH_WAIT);
        m.push(q(TX, 0, i64::MIN, now));
        let mut nothing = Caught(HashSet::new());
        let mut out = Vec::new();
        m.select(&mut nothing, 10, now, &mut out);
        assert_eq!(out.len(), 1, "a bad record goes at once");
        let mut m = Merge::new([false, false, true], Duration::from_secs(60), FETCH_WAIT);
        m.push(q(TX, 0, 7, now));
        let mut out = Vec::new();
        m.select(&mut nothing, 10, now, &mut out);
        assert_eq!(out.len(), 1, "no other input to wait for");
    }

    #[test]
    fn partitions_are_served_in_turn_under_backlog() {
        let now = Instant::now();
        let mut m = Merge::new([false, false, true], Duration::ZERO, FETCH_WAIT);
        for p in 0..4 {
            for t in 0..100 {
                m.push(q(TX, p, t, now));
            }
        }
        let mut out = Vec::new();
        m.select(&mut all(), 40, now, &mut out);
        let mut per = [0; 4];
        for r in &out {
            per[r.partition as usize] += 1;
        }
        assert_eq!(per, [10, 10, 10, 10], "an equal share each");
        assert_eq!(m.queued(TX, 1), (90, 9_000));
        m.drop_partition(2);
        assert_eq!(m.buffered(), 400 - 40 - 90);
        assert_eq!(m.buffered_bytes(), (400 - 40 - 90) * 100);
    }

    proptest! {
        /// With every input caught up, each partition's records come out in the order of a
        /// reference k-way merge of its queues by (time, input), whatever the batch size and
        /// however the records are spread over partitions.
        #[test]
        fn order_is_the_merge_of_the_queues_by_time(
            records in proptest::collection::vec((0usize..INPUTS, 0i32..3, 0i64..50), 0..200),
            batch in 1usize..40,
        ) {
            let now = Instant::now();
            let mut m = Merge::new([true; INPUTS], Duration::ZERO, FETCH_WAIT);
            for &(input, p, t) in &records {
                m.push(q(input, p, t, now));
            }
            let mut out = Vec::new();
            while m.buffered() > 0 {
                let before = out.len();
                m.select(&mut all(), batch, now, &mut out);
                prop_assert!(out.len() > before);
                prop_assert!(out.len() - before <= batch);
            }
            for p in 0..3 {
                let mut queues: [VecDeque<i64>; INPUTS] = Default::default();
                for &(input, q_p, t) in &records {
                    if q_p == p {
                        queues[input].push_back(t);
                    }
                }
                let mut want = Vec::new();
                while let Some((t, i)) = (0..INPUTS)
                    .filter_map(|i| queues[i].front().map(|&t| (t, i)))
                    .min()
                {
                    queues[i].pop_front();
                    want.push((i, t));
                }
                let got: Vec<(usize, i64)> =
                    out.iter().filter(|r| r.partition == p).map(|r| r.item).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
