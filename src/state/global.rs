//! Global tables: fraud labels and the blocklist, read in full by every instance (not
//! partitioned) and kept in memory, keyed by the same keyed hashes as the state: an e-mail or
//! card number is never held in the clear.
//!
//! Pure: [`crate::source::global`] feeds records in; the pipeline asks [`GlobalTables::hits`]
//! per transaction. Labels count only when their `label_time` is at or before the
//! transaction's event time, so a training table built from the same labels has no leakage;
//! the blocklist is an operational control and applies from the moment it is read (an
//! entry's `expires_at` is compared with event time).

use std::collections::HashMap;

use crate::decode::{BlockEntry, Label};
use crate::state::Hasher;

/// The entities global tables know about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    Customer,
    Card,
    Email,
    EmailDomain,
    Device,
    Ip,
}

impl Entity {
    pub const ALL: [Entity; 6] = [
        Entity::Customer,
        Entity::Card,
        Entity::Email,
        Entity::EmailDomain,
        Entity::Device,
        Entity::Ip,
    ];

    /// The prefix of a blocklist key (`email:…`) and the hashing kind.
    pub fn name(self) -> &'static str {
        match self {
            Entity::Customer => "customer",
            Entity::Card => "card",
            Entity::Email => "email",
            Entity::EmailDomain => "email_domain",
            Entity::Device => "device",
            Entity::Ip => "ip",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What the global tables say about a transaction's entities, looked up before features.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GlobalHits {
    /// Per [`Entity::index`].
    pub labels: [u32; 6],
    pub blocked: [bool; 6],
}

/// An identifier as a verdict's reason may show it: enough for an analyst to recognise it,
/// not enough to read it (an e-mail's domain, a card's last four, an IP address's /24 or
/// /48, the last four characters of anything else).
pub fn mask(entity: Entity, id: &str) -> String {
    fn last4(id: &str) -> String {
        let tail: String = id
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if id.chars().count() <= 4 {
            "****".into()
        } else {
            format!("…{tail}")
        }
    }
    match entity {
        Entity::EmailDomain => id.to_ascii_lowercase(),
        Entity::Email => match email_domain(id) {
            Some(d) => format!("***@{}", d.to_ascii_lowercase()),
            None => "***".into(),
        },
        Entity::Ip => match id.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => {
                let [a, b, c, _] = v4.octets();
                format!("{a}.{b}.{c}.0/24")
            }
            Ok(std::net::IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
            }
            Err(_) => last4(id),
        },
        Entity::Card | Entity::Device | Entity::Customer => last4(id),
    }
}

/// The keyed hash of each entity of a transaction, by [`Entity::index`].
pub type EntityHashes = [Option<u64>; 6];

/// Label times kept per entity: the earliest this many (a `fraud_labels_*` feature saturates
/// there; no model tells 1,000 frauds from 1,001).
pub const MAX_LABELS_PER_ENTITY: usize = 1000;

/// Longest blocklist reason kept (bytes); a longer one is cut.
pub const MAX_REASON_BYTES: usize = 256;

/// An entity a full table refused (`state.max-global-entries`).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the {0} table is full ({1} entities, state.max-global-entries): a new entity is refused")]
pub struct TableFull(pub &'static str, pub usize);

pub struct GlobalTables {
    /// Label times per entity, sorted, at most [`MAX_LABELS_PER_ENTITY`].
    labels: HashMap<(Entity, u64), Vec<i64>>,
    /// Expiry (event time, exclusive; `i64::MAX` when it does not expire) and reason per
    /// blocked entity.
    blocklist: HashMap<(Entity, u64), (i64, String)>,
    /// Most entities per table.
    max_entries: usize,
}

impl Default for GlobalTables {
    fn default() -> Self {
        GlobalTables::with_limit(crate::config::DEFAULT_MAX_GLOBAL_ENTRIES)
    }
}

/// An identifier as hashed: e-mails and domains compare case-insensitively.
pub fn hash(hasher: &Hasher, entity: Entity, id: &str) -> u64 {
    match entity {
        Entity::Email | Entity::EmailDomain => {
            hasher.short(entity.name(), &id.trim().to_ascii_lowercase())
        }
        _ => hasher.short(entity.name(), id),
    }
}

/// The domain of an e-mail address (after the last `@`), if it has one.
pub fn email_domain(email: &str) -> Option<&str> {
    let (_, d) = email.rsplit_once('@')?;
    (!d.trim().is_empty()).then_some(d)
}

/// A blocklist key that is not `<entity>:<id>`. Its text says how it is wrong without
/// quoting it: a key is an identifier (an e-mail, a card), which no log may hold.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("a blocklist key of {0} bytes is not `<entity>:<id>` with entity one of customer, card, email, email_domain, device, ip")]
pub struct BadEntityRef(pub usize);

/// Why a blocklist record was not applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GlobalError {
    #[error(transparent)]
    BadKey(#[from] BadEntityRef),
    #[error(transparent)]
    Full(#[from] TableFull),
}

/// `email:a@b.c` → (Email, "a@b.c").
pub fn parse_entity_ref(key: &[u8]) -> Result<(Entity, &str), BadEntityRef> {
    let bad = || BadEntityRef(key.len());
    let s = std::str::from_utf8(key).map_err(|_| bad())?;
    let (kind, id) = s.split_once(':').ok_or_else(bad)?;
    let e = Entity::ALL
        .into_iter()
        .find(|e| e.name() == kind)
        .ok_or_else(bad)?;
    if id.is_empty() {
        return Err(bad());
    }
    Ok((e, id))
}

impl GlobalTables {
    /// Empty tables of at most `max_entries` entities each.
    pub fn with_limit(max_entries: usize) -> GlobalTables {
        GlobalTables {
            labels: HashMap::new(),
            blocklist: HashMap::new(),
            max_entries,
        }
    }

    /// Adds a label to each entity it names. An entity new to a full table is refused (the
    /// others are still labelled).
    pub fn apply_label(&mut self, hasher: &Hasher, label: &Label) -> Result<(), TableFull> {
        let named = [
            (Entity::Customer, &label.customer_id),
            (Entity::Card, &label.card_id),
            (Entity::Email, &label.email),
            (Entity::Device, &label.device_id),
            (Entity::Ip, &label.ip),
        ];
        let mut refused = Ok(());
        for (e, id) in named {
            let Some(id) = id else { continue };
            let key = (e, hash(hasher, e, id));
            if !self.labels.contains_key(&key) && self.labels.len() >= self.max_entries {
                refused = Err(TableFull("labels", self.max_entries));
                continue;
            }
            let times = self.labels.entry(key).or_default();
            let t = label.label_time_ms;
            let at = times.partition_point(|&x| x <= t);
            if at < MAX_LABELS_PER_ENTITY {
                times.insert(at, t);
                times.truncate(MAX_LABELS_PER_ENTITY);
            }
        }
        refused
    }

    /// A blocklist record: an entry, or a tombstone (`None`) that lifts it.
    pub fn apply_block(
        &mut self,
        hasher: &Hasher,
        key: &[u8],
        entry: Option<&BlockEntry>,
    ) -> Result<(), GlobalError> {
        let (e, id) = parse_entity_ref(key)?;
        let k = (e, hash(hasher, e, id));
        match entry {
            Some(b) => {
                if !self.blocklist.contains_key(&k) && self.blocklist.len() >= self.max_entries {
                    return Err(TableFull("blocklist", self.max_entries).into());
                }
                let mut end = b.reason.len().min(MAX_REASON_BYTES);
                while !b.reason.is_char_boundary(end) {
                    end -= 1;
                }
                let reason = b.reason[..end].to_string();
                self.blocklist
                    .insert(k, (b.expires_at_ms.unwrap_or(i64::MAX), reason));
            }
            None => {
                self.blocklist.remove(&k);
            }
        }
        Ok(())
    }

    /// What the tables say about these entities at event time `t`.
    pub fn hits(&self, ids: &EntityHashes, t: i64) -> GlobalHits {
        let mut out = GlobalHits::default();
        if self.labels.is_empty() && self.blocklist.is_empty() {
            return out;
        }
        for e in Entity::ALL {
            let Some(h) = ids[e.index()] else { continue };
            if let Some(times) = self.labels.get(&(e, h)) {
                out.labels[e.index()] = times.partition_point(|&lt| lt <= t) as u32;
            }
            if let Some((expires, _)) = self.blocklist.get(&(e, h)) {
                out.blocked[e.index()] = t < *expires;
            }
        }
        out
    }

    /// The reason of the blocklist entry for this entity hash, if one applies at time `t`.
    pub fn block_reason(&self, entity: Entity, hash: u64, t: i64) -> Option<&str> {
        self.blocklist
            .get(&(entity, hash))
            .filter(|(expires, _)| t < *expires)
            .map(|(_, reason)| reason.as_str())
    }

    /// (labelled entities, blocked entities).
    pub fn sizes(&self) -> (usize, usize) {
        (self.labels.len(), self.blocklist.len())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masks_show_no_whole_identifier() {
        assert_eq!(
            mask(Entity::Email, "Fraudster@Example.com"),
            "***@example.com"
        );
        assert_eq!(mask(Entity::Card, "4111111111111111"), "…1111");
        assert_eq!(mask(Entity::Ip, "203.0.113.77"), "203.0.113.0/24");
        assert_eq!(
            mask(Entity::Ip, "2001:db8:85a3::8a2e:370:7334"),
            "2001:db8:85a3::/48"
        );
        assert_eq!(mask(Entity::Device, "dev-abcdef"), "…cdef");
        assert_eq!(mask(Entity::Customer, "c1"), "****");
        assert_eq!(mask(Entity::EmailDomain, "Evil.Example"), "evil.example");
    }

    use super::*;

    #[test]
    fn labels_count_up_to_event_time_and_tombstones_lift_blocks() {
        let h = Hasher::new(b"k");
        let mut g = GlobalTables::default();
        let label = Label {
            label_time_ms: 100,
            kind: "fraud".into(),
            email: Some("Fraud@Example.com".into()),
            card_id: Some("card-1".into()),
            ..Label::default()
        };
        g.apply_label(&h, &label).unwrap();
        g.apply_label(
            &h,
            &Label {
                label_time_ms: 300,
                ..label.clone()
            },
        )
        .unwrap();
        let mut ids: EntityHashes = [None; 6];
        ids[Entity::Email.index()] = Some(hash(&h, Entity::Email, "fraud@example.com "));
        ids[Entity::EmailDomain.index()] = Some(hash(&h, Entity::EmailDomain, "EXAMPLE.com"));
        assert_eq!(g.hits(&ids, 99).labels[Entity::Email.index()], 0);
        assert_eq!(g.hits(&ids, 100).labels[Entity::Email.index()], 1);
        assert_eq!(g.hits(&ids, 1000).labels[Entity::Email.index()], 2);
        assert_eq!(
            g.hits(&ids, 1000).labels[Entity::Card.index()],
            0,
            "card not asked"
        );

        let entry = BlockEntry {
            added_at_ms: 0,
            reason: "r".into(),
            expires_at_ms: Some(500),
        };
        g.apply_block(&h, b"email_domain:example.com", Some(&entry))
            .unwrap();
        assert!(g.hits(&ids, 499).blocked[Entity::EmailDomain.index()]);
        let domain = ids[Entity::EmailDomain.index()].unwrap();
        assert_eq!(g.block_reason(Entity::EmailDomain, domain, 499), Some("r"));
        assert_eq!(g.block_reason(Entity::EmailDomain, domain, 500), None);
        assert!(
            !g.hits(&ids, 500).blocked[Entity::EmailDomain.index()],
            "expired"
        );
        g.apply_block(&h, b"email_domain:example.com", None)
            .unwrap();
        assert!(!g.hits(&ids, 1).blocked[Entity::EmailDomain.index()]);
        assert_eq!(g.sizes(), (2, 0));
        for bad in [&b"nope"[..], b"phone:123", b"email:", b"\xff:x"] {
            assert!(g.apply_block(&h, bad, Some(&entry)).is_err());
        }
        assert_eq!(email_domain("a@b.c"), Some("b.c"));
        assert_eq!(email_domain("nodomain"), None);
    }

    #[test]
    fn tables_are_bounded_and_label_counts_saturate() {
        let h = Hasher::new(b"k");
        let mut g = GlobalTables::with_limit(3);
        let label = |card: &str, t: i64| Label {
            label_time_ms: t,
            kind: "fraud".into(),
            card_id: Some(card.into()),
            ..Label::default()
        };
        // One card labelled 1,500 times, latest first: the earliest 1,000 are kept, in order.
        for t in (0..1500).rev() {
            g.apply_label(&h, &label("c0", t)).unwrap();
        }
        let mut ids: EntityHashes = [None; 6];
        ids[Entity::Card.index()] = Some(hash(&h, Entity::Card, "c0"));
        assert_eq!(g.hits(&ids, 9).labels[Entity::Card.index()], 10);
        assert_eq!(
            g.hits(&ids, 5000).labels[Entity::Card.index()],
            MAX_LABELS_PER_ENTITY as u32
        );
        g.apply_label(&h, &label("c1", 1)).unwrap();
        g.apply_label(&h, &label("c2", 1)).unwrap();
        assert_eq!(
            g.apply_label(&h, &label("c3", 1)),
            Err(TableFull("labels", 3))
        );
        g.apply_label(&h, &label("c2", 2)).unwrap();
        assert_eq!(g.sizes().0, 3);

        let entry = BlockEntry {
            added_at_ms: 0,
            reason: "é".repeat(MAX_REASON_BYTES),
            expires_at_ms: None,
        };
        for i in 0..3 {
            g.apply_block(&h, format!("ip:10.0.0.{i}").as_bytes(), Some(&entry))
                .unwrap();
        }
        assert_eq!(
            g.apply_block(&h, b"ip:10.0.0.9", Some(&entry)),
            Err(GlobalError::Full(TableFull("blocklist", 3)))
        );
        let ip = hash(&h, Entity::Ip, "10.0.0.1");
        let reason = g.block_reason(Entity::Ip, ip, 0).unwrap();
        assert!(reason.len() <= MAX_REASON_BYTES && reason.starts_with('é'));
        g.apply_block(&h, b"ip:10.0.0.1", None).unwrap();
        g.apply_block(&h, b"ip:10.0.0.9", Some(&entry)).unwrap();
    }
}
