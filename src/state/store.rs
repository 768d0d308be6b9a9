//! The RocksDB store: one database per instance, a column family per entity kind, and the
//! last applied offset of each input partition in `meta`, all written by one `WriteBatch`
//! per batch so state and offsets move together or not at all.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};

use super::entities::{CodecError, CustomerState, MerchantState};
use super::keys::Key;

const CUSTOMER: &str = "customer";
const MERCHANT: &str = "merchant";
const META: &str = "meta";

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
}

/// Everything one batch changes: entity states and applied offsets.
#[derive(Default)]
pub struct StateBatch {
    pub customers: HashMap<Key, CustomerState>,
    pub merchants: HashMap<Key, MerchantState>,
    /// (topic, partition) → offset of the last message applied.
    pub applied: BTreeMap<(String, i32), i64>,
}

impl StateBatch {
    pub fn clear(&mut self) {
        self.customers.clear();
        self.merchants.clear();
        self.applied.clear();
    }
}

fn applied_key(topic: &str, partition: i32) -> Vec<u8> {
    format!("applied/{topic}/{partition}").into_bytes()
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StateError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = [CUSTOMER, MERCHANT, META].into_iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StateError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Store { db })
    }

    /// Opens an existing store for reading only, beside a running scorer (no lock taken).
    pub fn open_read_only(path: &Path) -> Result<Store, StateError> {
        let db =
            DB::open_cf_for_read_only(&Options::default(), path, [CUSTOMER, MERCHANT, META], false)
                .map_err(|e| StateError::Open {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
        Ok(Store { db })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    pub fn customer(&self, key: &Key) -> Result<Option<CustomerState>, StateError> {
        match self.db.get_pinned_cf(self.cf(CUSTOMER), key)? {
            Some(v) => Ok(Some(CustomerState::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn merchant(&self, key: &Key) -> Result<Option<MerchantState>, StateError> {
        match self.db.get_pinned_cf(self.cf(MERCHANT), key)? {
            Some(v) => Ok(Some(MerchantState::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The offset of the last message of `topic`/`partition` whose effects are in the store.
    pub fn applied_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        match self
            .db
            .get_pinned_cf(self.cf(META), applied_key(topic, partition))?
        {
            Some(v) if v.len() == 8 => Ok(Some(i64::from_le_bytes(v[..8].try_into().expect("8")))),
            Some(_) => Err(CodecError("applied offset is not 8 bytes".into()).into()),
            None => Ok(None),
        }
    }

    /// Writes the batch atomically (and durably: the write-ahead log is synced).
    pub fn commit(&self, batch: &StateBatch) -> Result<(), StateError> {
        let mut wb = WriteBatch::default();
        let mut buf = Vec::with_capacity(512);
        for (k, v) in &batch.customers {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf(CUSTOMER), k, &buf);
        }
        for (k, v) in &batch.merchants {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf(MERCHANT), k, &buf);
        }
        for ((topic, partition), offset) in &batch.applied {
            wb.put_cf(
                self.cf(META),
                applied_key(topic, *partition),
                offset.to_le_bytes(),
            );
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(wb, &opts)?;
        Ok(())
    }

    /// Entities and their key + value bytes (uncompressed), per kind: the
    /// bytes-per-customer report of `fraudstream state-stats`. Scans the whole store.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64, u64)>, StateError> {
        let mut out = Vec::new();
        for kind in [CUSTOMER, MERCHANT] {
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
