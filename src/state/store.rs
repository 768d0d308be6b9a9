//! The RocksDB store: one database per instance, a column family per entity kind, and the
//! last applied offset of each input partition in `meta`, all written by one `WriteBatch`
//! per batch so state and offsets move together or not at all.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};

use super::entities::{
    last_event_ms, CodecError, CustomerState, EntityKind, MerchantState, SessionState,
};
use super::keys::{self, Key};

const META: &str = "meta";

/// Entities idle longer than this (in event time) are forgotten: logically when read (see
/// [`crate::features::expire_idle`]), physically by RocksDB compaction. The longest window.
pub const ENTITY_TTL_MS: i64 = 7 * 86_400_000;

/// State errors are fatal: the batch's offsets are not stored, and a restart re-applies
/// from the last applied offset.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("state store I/O failed: {0}")]
    Io(#[from] rocksdb::Error),
    #[error(transparent)]
    Corrupt(#[from] CodecError),
}

pub struct Store {
    db: DB,
    /// The newest event time applied by this instance: compaction drops entities idle for
    /// [`ENTITY_TTL_MS`] before it.
    watermark: Arc<AtomicI64>,
}

/// Everything one batch changes: entity states, applied offsets and changelog positions.
#[derive(Default)]
pub struct StateBatch {
    pub customers: HashMap<Key, CustomerState>,
    pub merchants: HashMap<Key, MerchantState>,
    pub sessions: HashMap<Key, SessionState>,
    /// (topic, partition) → offset of the last message applied.
    pub applied: BTreeMap<(String, i32), i64>,
    /// Partition → offset of the last changelog record this batch's state includes.
    pub changelog: BTreeMap<i32, i64>,
}

impl StateBatch {
    pub fn clear(&mut self) {
        self.customers.clear();
        self.merchants.clear();
        self.sessions.clear();
        self.applied.clear();
        self.changelog.clear();
    }

    /// The batch's entity states as changelog records: (partition, key, value), the key
    /// being the entity kind's tag and the state key. The batch's markers
    /// ([`marker_record`]) go after them, once these and the verdicts are acknowledged.
    pub fn changelog_records(&self) -> Vec<(i32, Vec<u8>, Vec<u8>)> {
        let mut out =
            Vec::with_capacity(self.customers.len() + self.merchants.len() + self.sessions.len());
        fn entity(kind: EntityKind, k: &Key, value: Vec<u8>) -> (i32, Vec<u8>, Vec<u8>) {
            let mut key = Vec::with_capacity(21);
            key.push(kind.tag());
            key.extend_from_slice(k);
            (keys::partition_of(k), key, value)
        }
        for (k, v) in &self.customers {
            let mut b = Vec::with_capacity(256);
            v.encode(&mut b);
            out.push(entity(EntityKind::Customer, k, b));
        }
        for (k, v) in &self.merchants {
            let mut b = Vec::with_capacity(64);
            v.encode(&mut b);
            out.push(entity(EntityKind::Merchant, k, b));
        }
        for (k, v) in &self.sessions {
            let mut b = Vec::with_capacity(64);
            v.encode(&mut b);
            out.push(entity(EntityKind::Session, k, b));
        }
        out
    }
}

/// A batch's marker for one partition: `a` + partition → every applied offset of the
/// partition (`[n][len][topic][offset LE]…`). A restore applies entity records only up to
/// the last marker: records after it are from a batch whose output was not all
/// acknowledged, and are discarded (and re-written by the next batch, see
/// [`Restored::repair`]).
pub fn marker_record(partition: i32, applied: &[(String, i64)]) -> (Vec<u8>, Vec<u8>) {
    let mut key = vec![b'a'];
    key.extend_from_slice(&(partition as u32).to_be_bytes());
    let mut value = vec![applied.len() as u8];
    for (topic, offset) in applied {
        value.push(topic.len().min(255) as u8);
        value.extend_from_slice(&topic.as_bytes()[..topic.len().min(255)]);
        value.extend_from_slice(&offset.to_le_bytes());
    }
    (key, value)
}

fn parse_marker(value: &[u8]) -> Result<Vec<(String, i64)>, CodecError> {
    let bad = || CodecError("malformed changelog marker".into());
    let (&n, mut rest) = value.split_first().ok_or_else(bad)?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (&len, r) = rest.split_first().ok_or_else(bad)?;
        if r.len() < len as usize + 8 {
            return Err(bad());
        }
        let topic = String::from_utf8_lossy(&r[..len as usize]).into_owned();
        let offset = i64::from_le_bytes(r[len as usize..len as usize + 8].try_into().expect("8"));
        out.push((topic, offset));
        rest = &r[len as usize + 8..];
    }
    Ok(out)
}

/// What a restore found after the partition's last marker: entity keys whose changelog
/// value may be ahead of the marker, to be re-written from the restored state.
#[derive(Debug, Default)]
pub struct Restored {
    pub repair: Vec<(EntityKind, Key)>,
}

fn applied_key(topic: &str, partition: i32) -> Vec<u8> {
    format!("applied/{topic}/{partition}").into_bytes()
}

fn changelog_key(partition: i32) -> Vec<u8> {
    format!("changelog/{partition}").into_bytes()
}

fn entity_cf_options(kind: EntityKind, watermark: &Arc<AtomicI64>) -> Options {
    let mut cf = Options::default();
    cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let watermark = watermark.clone();
    cf.set_compaction_filter(kind.name(), move |_level, _key, value| {
        let now = watermark.load(Ordering::Relaxed);
        match last_event_ms(kind, value) {
            Some(t) if now != i64::MIN && t < now - ENTITY_TTL_MS => {
                rocksdb::CompactionDecision::Remove
            }
            _ => rocksdb::CompactionDecision::Keep,
        }
    });
    cf
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StateError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let watermark = Arc::new(AtomicI64::new(i64::MIN));
        let mut cfs: Vec<ColumnFamilyDescriptor> = EntityKind::ALL
            .into_iter()
            .map(|k| ColumnFamilyDescriptor::new(k.name(), entity_cf_options(k, &watermark)))
            .collect();
        cfs.push(ColumnFamilyDescriptor::new(META, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StateError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Store { db, watermark })
    }

    /// Opens an existing store for reading only, beside a running scorer (no lock taken).
    pub fn open_read_only(path: &Path) -> Result<Store, StateError> {
        let names = EntityKind::ALL.map(|k| k.name());
        let db = DB::open_cf_for_read_only(
            &Options::default(),
            path,
            names.into_iter().chain([META]),
            false,
        )
        .map_err(|e| StateError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Store {
            db,
            watermark: Arc::new(AtomicI64::new(i64::MIN)),
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Raises the event time before which idle entities may be compacted away.
    pub fn advance_watermark(&self, event_time_ms: i64) {
        self.watermark.fetch_max(event_time_ms, Ordering::Relaxed);
    }

    pub fn customer(&self, key: &Key) -> Result<Option<CustomerState>, StateError> {
        match self.db.get_pinned_cf(self.cf("customer"), key)? {
            Some(v) => Ok(Some(CustomerState::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn merchant(&self, key: &Key) -> Result<Option<MerchantState>, StateError> {
        match self.db.get_pinned_cf(self.cf("merchant"), key)? {
            Some(v) => Ok(Some(MerchantState::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn session(&self, key: &Key) -> Result<Option<SessionState>, StateError> {
        match self.db.get_pinned_cf(self.cf("session"), key)? {
            Some(v) => Ok(Some(SessionState::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn meta_i64(&self, key: Vec<u8>) -> Result<Option<i64>, StateError> {
        match self.db.get_pinned_cf(self.cf(META), key)? {
            Some(v) if v.len() == 8 => Ok(Some(i64::from_le_bytes(v[..8].try_into().expect("8")))),
            Some(_) => Err(CodecError("meta value is not 8 bytes".into()).into()),
            None => Ok(None),
        }
    }

    /// The offset of the last message of `topic`/`partition` whose effects are in the store.
    pub fn applied_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        self.meta_i64(applied_key(topic, partition))
    }

    /// The offset of the last changelog record of `partition` the store includes.
    pub fn changelog_position(&self, partition: i32) -> Result<Option<i64>, StateError> {
        self.meta_i64(changelog_key(partition))
    }

    /// Writes the batch atomically (and durably: the write-ahead log is synced).
    pub fn commit(&self, batch: &StateBatch) -> Result<(), StateError> {
        let mut wb = WriteBatch::default();
        let mut buf = Vec::with_capacity(512);
        for (k, v) in &batch.customers {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf("customer"), k, &buf);
        }
        for (k, v) in &batch.merchants {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf("merchant"), k, &buf);
        }
        for (k, v) in &batch.sessions {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf("session"), k, &buf);
        }
        for ((topic, partition), offset) in &batch.applied {
            wb.put_cf(
                self.cf(META),
                applied_key(topic, *partition),
                offset.to_le_bytes(),
            );
        }
        for (partition, offset) in &batch.changelog {
            wb.put_cf(
                self.cf(META),
                changelog_key(*partition),
                offset.to_le_bytes(),
            );
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(wb, &opts)?;
        Ok(())
    }

    /// Deletes everything the store holds for `partition`: its entities, applied offsets
    /// and changelog position (before a restore from the changelog's start).
    pub fn drop_partition(&self, partition: i32, topics: &[&str]) -> Result<(), StateError> {
        let (from, to) = keys::partition_range(partition);
        let mut wb = WriteBatch::default();
        for kind in EntityKind::ALL {
            wb.delete_range_cf(self.cf(kind.name()), from, to);
        }
        for t in topics {
            wb.delete_cf(self.cf(META), applied_key(t, partition));
        }
        wb.delete_cf(self.cf(META), changelog_key(partition));
        self.db.write(wb)?;
        Ok(())
    }

    /// Applies changelog records of `partition` (read in order, ending with a marker at
    /// offset `position`) in one write. Records with an unknown tag are an error: a
    /// changelog written by a newer version.
    pub fn restore(
        &self,
        partition: i32,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
        position: i64,
    ) -> Result<(), StateError> {
        let mut wb = WriteBatch::default();
        for (key, value) in records {
            let Some((&tag, rest)) = key.split_first() else {
                return Err(CodecError("empty changelog key".into()).into());
            };
            if tag == b'a' {
                for (topic, offset) in parse_marker(value.as_deref().unwrap_or_default())? {
                    wb.put_cf(
                        self.cf(META),
                        applied_key(&topic, partition),
                        offset.to_le_bytes(),
                    );
                }
                continue;
            }
            let kind = EntityKind::from_tag(tag)
                .ok_or_else(|| CodecError(format!("unknown changelog tag {tag}")))?;
            if rest.len() != 20 {
                return Err(CodecError("changelog key is not a state key".into()).into());
            }
            match value {
                Some(v) => wb.put_cf(self.cf(kind.name()), rest, v),
                None => wb.delete_cf(self.cf(kind.name()), rest),
            }
        }
        wb.put_cf(
            self.cf(META),
            changelog_key(partition),
            position.to_le_bytes(),
        );
        self.db.write(wb)?;
        Ok(())
    }

    /// The keys of changelog records found after the last marker (see [`Restored`]).
    pub fn tail_keys(records: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<(EntityKind, Key)> {
        records
            .iter()
            .filter_map(|(k, _)| {
                let (&tag, rest) = k.split_first()?;
                let kind = EntityKind::from_tag(tag)?;
                Some((kind, rest.try_into().ok()?))
            })
            .collect()
    }

    /// Entities and their key + value bytes (uncompressed), per kind: the
    /// bytes-per-customer report of `fraudstream state-stats`. Scans the whole store.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64, u64)>, StateError> {
        let mut out = Vec::new();
        for kind in EntityKind::ALL.map(|k| k.name()) {
            let (mut n, mut bytes) = (0u64, 0u64);
            for item in self
                .db
                .iterator_cf(self.cf(kind), rocksdb::IteratorMode::Start)
            {
                let (k, v) = item?;
                bytes += (k.len() + v.len()) as u64;
                n += 1;
            }
            out.push((kind, n, bytes));
        }
        Ok(out)
    }
}

/// The online pipeline's entities come from here when not in the batch.
impl crate::features::engine::Loader for Store {
    fn customer(&self, key: &Key) -> Result<Option<CustomerState>, StateError> {
        Store::customer(self, key)
    }
    fn merchant(&self, key: &Key) -> Result<Option<MerchantState>, StateError> {
        Store::merchant(self, key)
    }
    fn session(&self, key: &Key) -> Result<Option<SessionState>, StateError> {
        Store::session(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::keys::{key, Hasher};

    #[test]
    fn batch_is_written_with_its_offsets_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("fraudstream-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = Hasher::new(b"s");
        let k = key(3, &h.entity("customer", "c1"));
        {
            let store = Store::open(&dir).unwrap();
            assert_eq!(store.applied_offset("tx", 3).unwrap(), None);
            let mut b = StateBatch::default();
            let mut c = CustomerState::default();
            c.amounts.add(12.0);
            c.last_event_ms = Some(5);
            b.customers.insert(k, c);
            b.merchants.insert(k, MerchantState::default());
            b.applied.insert(("tx".into(), 3), 41);
            store.commit(&b).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.applied_offset("tx", 3).unwrap(), Some(41));
        assert_eq!(store.applied_offset("tx", 4).unwrap(), None);
        let c = store.customer(&k).unwrap().unwrap();
        assert_eq!(c.amounts.n, 1);
        assert_eq!(c.last_event_ms, Some(5));
        assert!(store
            .customer(&key(4, &h.entity("customer", "c1")))
            .unwrap()
            .is_none());
        drop(store);
        let ro = Store::open_read_only(&dir).unwrap();
        let stats = ro.stats().unwrap();
        assert_eq!(stats[0].0, "customer");
        assert_eq!(stats[0].1, 1);
        assert!(stats[0].2 > 20);
        assert_eq!(stats[1].1, 1, "one merchant");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
