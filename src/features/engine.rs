//! One event against the state: which entities it touches, their keys, idle expiry, the
//! global-table lookups, the feature rows from the state before it, and the update after.
//! Shared by the online pipeline (state loaded from RocksDB into a [`StateBatch`]) and by
//! `fraudstream replay` (all state in a [`StateBatch`] in memory), so the two cannot drift.
//!
//! No I/O here: a [`Loader`] (the store, or nothing in replay) supplies entities missing from
//! the batch.

use std::collections::hash_map::Entry;

use crate::decode::{NavigationEvent, Transaction};
use crate::features::{self, Context, Entity, FeatureSet, GlobalHits, Ids};
use crate::state::global::{self, EntityHashes, GlobalTables};
use crate::state::{keys, Hasher, Key, Loader, SessionState, StateBatch, StateError};

fn session_key(hasher: &Hasher, partition: i32, customer: &str, session: &str) -> Key {
    keys::key(partition, &hasher.entity_pair("session", customer, session))
}

fn session<'a>(
    state: &'a mut StateBatch,
    loader: &impl Loader,
    key: Key,
    t: i64,
) -> Result<&'a mut SessionState, StateError> {
    let s = match state.sessions.entry(key) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(loader.session(&key)?.unwrap_or_default()),
    };
    let last = (s.events > 0).then_some(s.last_event_ms);
    features::expire_idle(s, last, t);
    Ok(s)
}

/// Applies a navigation event of input partition `partition` to its session.
pub fn navigation(
    partition: i32,
    n: &NavigationEvent,
    hasher: &Hasher,
    state: &mut StateBatch,
    loader: &impl Loader,
) -> Result<(), StateError> {
    let key = session_key(hasher, partition, &n.customer_id, &n.session_id);
    let device = n.device_id.as_deref().map(|v| hasher.short("device", v));
    let ip = n.ip.as_deref().map(|v| hasher.short("ip", v));
    let s = session(state, loader, key, n.event_time_ms)?;
    features::apply_navigation(n, device, ip, s);
    Ok(())
}

/// Appends the transaction's row for each feature set (from the state before it), then
/// applies it to its customer and merchant.
pub fn transaction(
    partition: i32,
    tx: &Transaction,
    hasher: &Hasher,
    tables: &GlobalTables,
    state: &mut StateBatch,
    loader: &impl Loader,
    rows: &mut [(&FeatureSet, &mut Vec<f32>)],
) -> Result<(), StateError> {
    let h = hasher;
    let t = tx.event_time_ms;
    let customer_hash = h.entity("customer", &tx.customer_id);
    let ck = keys::key(partition, &customer_hash);
    let mk = keys::key(partition, &h.entity("merchant", &tx.merchant_id));
    let ids = Ids {
        card: tx.card_id.as_deref().map(|v| h.short("card", v)),
        device: tx.device_id.as_deref().map(|v| h.short("device", v)),
        ip: tx.ip.as_deref().map(|v| h.short("ip", v)),
    };
    let global_hits = if tables.sizes() == (0, 0) {
        GlobalHits::default()
    } else {
        let mut e: EntityHashes = [None; 6];
        for entity in Entity::ALL {
            e[entity.index()] = entity_hash(h, tx, entity);
        }
        tables.hits(&e, t)
    };
    let sk = tx
        .session_id
        .as_deref()
        .map(|s| session_key(h, partition, &tx.customer_id, s));
    // A transaction reads its session and does not change it: a session that had no
    // navigation event is never written (it reads as an empty one).
    let loaded;
    let stored = match sk {
        Some(k) => match state.sessions.get(&k) {
            Some(s) => Some(s),
            None => {
                loaded = loader.session(&k)?;
                loaded.as_ref()
            }
        },
        None => None,
    };
    let empty = SessionState::default();
    let session = sk.map(|_| match stored {
        Some(s) if s.events > 0 && !features::expired(s.last_event_ms, t) => s,
        _ => &empty,
    });
    let customer = match state.customers.entry(ck) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(loader.customer(&ck)?.unwrap_or_default()),
    };
    let last = customer.last_event_ms;
    features::expire_idle(customer, last, t);
    let merchant = match state.merchants.entry(mk) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(loader.merchant(&mk)?.unwrap_or_default()),
    };
    let last = merchant.last_event_ms;
    features::expire_idle(merchant, last, t);
    let ctx = Context {
        customer,
        merchant,
        session,
        ids,
        global: global_hits,
    };
    for (set, out) in rows.iter_mut() {
        set.extend_row(tx, &ctx, out);
    }
    features::apply(tx, &ids, customer, merchant);
    Ok(())
}

/// A transaction's identifier of `entity` (the e-mail's domain for `EmailDomain`).
pub fn entity_id(tx: &Transaction, entity: Entity) -> Option<&str> {
    match entity {
        Entity::Customer => Some(&tx.customer_id),
        Entity::Card => tx.card_id.as_deref(),
        Entity::Email => tx.email.as_deref(),
        Entity::EmailDomain => tx.email.as_deref().and_then(global::email_domain),
        Entity::Device => tx.device_id.as_deref(),
        Entity::Ip => tx.ip.as_deref(),
    }
}

/// The keyed hash under which the global tables know a transaction's `entity`.
pub fn entity_hash(h: &Hasher, tx: &Transaction, entity: Entity) -> Option<u64> {
    entity_id(tx, entity).map(|id| global::hash(h, entity, id))
}
