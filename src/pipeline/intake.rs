//! A consumed message becomes a record of its task: decoded once, and routed.
//!
//! Routing is co-partitioning: a transaction or navigation event belongs to the task of
//! partition murmur2(customer id) mod n, the Java client's choice for a record keyed by its
//! customer. One that arrived on another partition (unkeyed, keyed otherwise, or written by a
//! producer with another partitioner, such as librdkafka's CRC32 default) is forwarded to the
//! repartition topic's partition for its customer instead, with a header saying what it is.
//! Records read from the repartition topic are processed where they are.

use std::time::Instant;

use rdkafka::message::{Message, OwnedMessage};

use super::merge::{Queued, NAV, REPARTITION, TX};
use crate::decode::{DecodeError, Decoder, NavigationEvent, Transaction};
use crate::source::partitioner::partition_for;

/// Header of a repartitioned record: `transaction` or `navigation`.
pub const KIND_HEADER: &str = "fraudstream.kind";

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
}

impl Record {
    pub fn partition(&self) -> i32 {
        self.msg.partition()
    }
}

/// Decodes `msg` of `input` and routes it among `partitions` partitions.
pub fn accept(
    decoder: &Decoder,
    input: usize,
    partitions: u32,
    msg: OwnedMessage,
    now: Instant,
) -> Queued<Record> {
    let kind = if input == REPARTITION {
        match crate::sink::header(&msg, KIND_HEADER).as_deref() {
            Some("navigation") => NAV,
            _ => TX,
        }
    } else {
        input
    };
    let p = msg.partition();
    let home = |customer: &str| {
        let target = partition_for(customer.as_bytes(), partitions);
        (input == REPARTITION || target == p)
            .then_some(())
            .ok_or(target)
    };
    let event = if kind == NAV {
        match decoder.decode_navigation(msg.payload()) {
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
        match decoder.decode(msg.payload()) {
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
        item: Record { msg, event },
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
