//! A consumed message becomes a record of its task: decoded once, and routed.
//!
//! Routing is co-partitioning: a transaction or navigation event belongs to the task of
//! partition murmur2(customer id) mod n, the Java client's choice for a record keyed by its
//! customer. One that arrived on another partition (unkeyed, keyed otherwise, or written by a
//! producer with another partitioner, such as librdkafka's CRC32 default) is forwarded to the
//! repartition topic's partition for its customer instead, its value framed by a line saying
//! what it is and where it was read (its source partition and offset: [`frame`]). Records
//! read from the repartition topic are processed where they are.
//!
//! Every assigned input partition has a queue of its own ([`Queues`]), split off the
//! consumer's once its state is restored, and the loop takes an equal share from each in
//! turn: librdkafka's one consumer queue would hand out what it prefetched in the order it
//! was fetched, so a partition behind another's backlog would wait for that backlog.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};

use super::merge::{Queued, NAV, REPARTITION, TX};
use super::rebalance::{GroupConsumer, GroupContext};
use crate::decode::{DecodeError, Decoder, NavigationEvent, Transaction};
use crate::source::partitioner::partition_for;
use crate::source::{QueueLength, Wake};
use crate::state::SourcePartition;

/// What a consumed message is, once decoded and routed.
pub enum Event {
    Tx(Box<Transaction>),
    Nav(NavigationEvent),
    /// Poison: dead-lettered with the reason.
    Bad(DecodeError),
    /// On the wrong partition for its customer: re-keyed through the repartition topic.
    Forward {
        kind: &'static str,
        customer: String,
        partition: i32,
    },
}

pub struct Record {
    pub msg: OwnedMessage,
    pub event: Event,
    /// Read from the repartition topic: where it was read before it was forwarded, and at
    /// which offset (`None` if the forwarding version did not say).
    pub forwarded_from: Option<(SourcePartition, i64)>,
    /// The length of the forward's frame before the original value in `msg`'s (0 if none).
    pub frame: usize,
}

impl Record {
    pub fn partition(&self) -> i32 {
        self.msg.partition()
    }
}

/// The longest [`frame`] line [`unframe`] looks for, its newline included (the longest
/// written, `navigation -2147483648 -9223372036854775808`, is 44 bytes;
/// docs/configuration.md promises 64).
const MAX_FRAME_LINE: usize = 64;

/// A forwarded record's value: a line `<kind> <partition> <offset>`, what it is
/// (`transaction` or `navigation`) and where it was read, then the original value. In the
/// value, not in a header: each header is an allocation to build, parse, copy and free on
/// both sides of the hop (headers cost 8 % of the scorer's CPU with navigation).
pub fn frame(kind: &str, partition: i32, offset: i64, value: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(32 + value.len());
    writeln!(out, "{kind} {partition} {offset}").expect("writes to a Vec");
    out.extend_from_slice(value);
    out
}

/// A value read from the repartition topic: its input ([`TX`] or [`NAV`]), where it was
/// read before it was forwarded, and the length of its [`frame`]. A value without a frame
/// (forwarded by a version before frames) is read as a transaction without a source.
pub(super) fn unframe(value: Option<&[u8]>) -> (usize, Option<(SourcePartition, i64)>, usize) {
    let value = value.unwrap_or_default();
    let line = value
        .iter()
        .take(MAX_FRAME_LINE)
        .position(|&b| b == b'\n')
        .and_then(|end| Some((std::str::from_utf8(&value[..end]).ok()?, end + 1)));
    let parsed = line.and_then(|(line, len)| {
        let mut fields = line.split(' ');
        let input = match fields.next()? {
            "navigation" => NAV,
            "transaction" => TX,
            _ => return None,
        };
        let partition = fields.next()?.parse::<i32>().ok()?;
        let offset = fields.next()?.parse::<i64>().ok()?;
        let source = SourcePartition {
            input: input as u8,
            partition,
        };
        fields
            .next()
            .is_none()
            .then_some((input, Some((source, offset)), len))
    });
    parsed.unwrap_or((TX, None, 0))
}

/// Decodes `msg` of `input` and routes it among `partitions` partitions.
pub fn accept(
    decoder: &Decoder,
    input: usize,
    partitions: u32,
    msg: OwnedMessage,
    now: Instant,
) -> Queued<Record> {
    let (kind, forwarded_from, frame) = if input == REPARTITION {
        unframe(msg.payload())
    } else {
        (input, None, 0)
    };
    let value = msg.payload().map(|v| &v[frame..]);
    let p = msg.partition();
    let home = |customer: &str| {
        let target = partition_for(customer.as_bytes(), partitions);
        (input == REPARTITION || target == p)
            .then_some(())
            .ok_or(target)
    };
    let event = if kind == NAV {
        match decoder.decode_navigation(value) {
            Ok(n) => match home(&n.customer_id) {
                Ok(()) => Event::Nav(n),
                Err(partition) => Event::Forward {
                    kind: "navigation",
                    customer: n.customer_id,
                    partition,
                },
            },
            Err(e) => Event::Bad(e),
        }
    } else {
        match decoder.decode(value) {
            Ok(tx) => match home(&tx.customer_id) {
                Ok(()) => Event::Tx(Box::new(tx)),
                Err(partition) => Event::Forward {
                    kind: "transaction",
                    customer: tx.customer_id,
                    partition,
                },
            },
            Err(e) => Event::Bad(e),
        }
    };
    let time = match &event {
        Event::Tx(tx) => tx.event_time_ms,
        Event::Nav(n) => n.event_time_ms,
        Event::Bad(_) | Event::Forward { .. } => i64::MIN,
    };
    let bytes = held_bytes(&msg);
    Queued {
        input,
        partition: p,
        time,
        arrived: now,
        bytes,
        item: Record {
            msg,
            event,
            forwarded_from,
            frame,
        },
    }
}

/// Memory a buffered record holds: its message (key, value, headers), what was decoded from
/// it (at most as much again: its fields are the value's), and the record itself.
fn held_bytes(msg: &OwnedMessage) -> usize {
    use rdkafka::message::Headers;
    let value = msg.payload().map_or(0, <[u8]>::len);
    let headers = msg.headers().map_or(0, |h| {
        h.iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum()
    });
    msg.key().map_or(0, <[u8]>::len)
        + 2 * value
        + headers
        + std::mem::size_of::<Record>()
        + std::mem::size_of::<Transaction>()
}

/// The assigned input partitions' own queues, read in turn.
pub struct Queues {
    /// By (input, partition), with the queue's length.
    queues: Vec<((usize, i32), PartitionQueue<GroupContext>, QueueLength)>,
    /// Which queue goes first in the next [`Queues::fill`].
    turn: usize,
    /// Queues found empty in the current fill.
    empty: Vec<bool>,
    wake: Arc<Wake>,
}

impl Queues {
    pub fn new(wake: Arc<Wake>) -> Queues {
        Queues {
            queues: Vec::new(),
            turn: 0,
            empty: Vec::new(),
            wake,
        }
    }

    /// Splits the queue of `topic`'s partition `p` (`input`) off the consumer's. Done after
    /// every assignment, while the partition is paused: what librdkafka fetched for it
    /// before stays in the consumer's queue (and is dropped, see [`Queues::is_split`]).
    /// Returns false when librdkafka has no queue for it; its records then come through
    /// the consumer's queue.
    pub fn split(
        &mut self,
        consumer: &Arc<GroupConsumer>,
        input: usize,
        topic: &str,
        p: i32,
    ) -> bool {
        self.queues.retain(|(k, _, _)| *k != (input, p));
        // The length first: once split, the partition's records reach only this queue.
        let Some(length) = QueueLength::partition(consumer.as_ref(), topic, p) else {
            return false;
        };
        let Some(mut queue) = consumer.split_partition_queue(topic, p) else {
            return false;
        };
        let wake = self.wake.clone();
        queue.set_nonempty_callback(move || wake.notify());
        self.queues.push(((input, p), queue, length));
        true
    }

    pub fn is_split(&self, input: usize, p: i32) -> bool {
        self.queues.iter().any(|(k, _, _)| *k == (input, p))
    }

    /// Drops a revoked partition's queues.
    pub fn drop_partition(&mut self, p: i32) {
        self.queues.retain(|((_, q), _, _)| *q != p);
    }

    /// Drops every queue (they hold the consumer: before it is closed).
    pub fn clear(&mut self) {
        self.queues.clear();
    }

    /// Moves records into `into` until it holds `max` or every queue is empty or `held`:
    /// an equal share of what is left from each queue in turn, the first turn going round
    /// the queues from one call to the next. A queue is empty when its length says so:
    /// `poll` also returns `None` after serving a transaction marker, with records behind it.
    pub fn fill(
        &mut self,
        into: &mut Vec<OwnedMessage>,
        max: usize,
        held: &BTreeSet<(usize, i32)>,
    ) {
        let n = self.queues.len();
        if n == 0 || into.len() >= max {
            return;
        }
        self.empty.clear();
        self.empty
            .extend(self.queues.iter().map(|(key, _, _)| held.contains(key)));
        let mut open = self.empty.iter().filter(|&&e| !e).count();
        let first = self.turn % n;
        self.turn = first + 1;
        while open > 0 && into.len() < max {
            let share = ((max - into.len()) / open).max(1);
            for k in 0..n {
                let i = (first + k) % n;
                if self.empty[i] {
                    continue;
                }
                let (_, queue, length) = &self.queues[i];
                for _ in 0..share {
                    if into.len() >= max {
                        return;
                    }
                    match queue.poll(Duration::ZERO) {
                        Some(r) => take(r, into),
                        None if length.get() > 0 => {}
                        None => {
                            self.empty[i] = true;
                            open -= 1;
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// A polled message, detached from the consumer; an error is logged (librdkafka reports
/// broker trouble this way and retries on its own).
pub fn take(r: KafkaResult<BorrowedMessage<'_>>, into: &mut Vec<OwnedMessage>) {
    match r {
        Ok(m) => into.push(m.detach()),
        Err(e) => tracing::warn!(error = %e, "Consumer error."),
    }
}
