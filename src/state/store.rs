//! The RocksDB store: one database per instance, a column family per entity kind, and per
//! partition in `meta` the changelog checkpoint (the changelog offset the state reflects),
//! the stream time and the forward marks (see [`StateBatch::first_forward`]).
//!
//! The store is a cache of the changelog: it is only ever written with state that a Kafka
//! transaction has committed ([`Store::commit`], after the transaction), or with records read
//! from the changelog ([`Store::restore`]), each time with the checkpoint it reflects in the
//! same `WriteBatch`. A crash between the transaction and the write leaves the store behind
//! the changelog, never ahead of it; the restore on assignment reads the difference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};

use super::entities::{
    last_event_ms, CodecError, CustomerState, EntityKind, MerchantState, SessionState, KNOWN_CAP,
};
use super::keys::{self, Key};

const META: &str = "meta";

/// Entities idle longer than this (in event time) are forgotten: logically when read (see
/// [`crate::features::expire_idle`]), physically once their partition's stream time has
/// passed it by [`EXPIRY_GRACE_MS`] more (a changelog tombstone). The longest window.
pub const ENTITY_TTL_MS: i64 = 7 * 86_400_000;

/// How far behind its partition's stream time an event may still arrive and find the
/// entities it would have found: physical expiry waits this much longer than the logical
/// one, so a late event within it computes what it would have without expiry.
pub const EXPIRY_GRACE_MS: i64 = 86_400_000;

/// RocksDB's memtable budget over all column families.
const STORE_WRITE_BUFFER_BYTES: usize = 32 << 20;

/// The default `state.cache-bytes`: memory per store for committed entities kept decoded
/// (see [`Recent`]), a third for each kind: some 18,000 customers, 280,000 sessions and
/// 450,000 merchants; the rest are read from RocksDB.
pub const DEFAULT_CACHE_BYTES: usize = 96 << 20;

/// Changelog key tag of a partition's stream time (entities use [`EntityKind::tag`]).
const STREAM_TIME_TAG: u8 = b't';

/// Changelog key tag of a forward mark: the last source offset of one source partition whose
/// forwarded record a task applied.
const FORWARD_MARK_TAG: u8 = b'f';

/// State errors are fatal: the transaction is not committed, and a restart resumes from the
/// last committed one.
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
    /// Written through by every write of the store, cleared by restores and drops.
    recent: std::cell::RefCell<RecentEntities>,
}

struct RecentEntities {
    customers: Recent<CustomerState>,
    merchants: Recent<MerchantState>,
    sessions: Recent<SessionState>,
}

impl RecentEntities {
    /// At most about `bytes` in all, a third for each kind.
    fn new(bytes: usize) -> RecentEntities {
        RecentEntities {
            customers: Recent::new(bytes / 3),
            merchants: Recent::new(bytes / 3),
            sessions: Recent::new(bytes / 3),
        }
    }

    fn clear(&mut self) {
        self.customers.clear();
        self.merchants.clear();
        self.sessions.clear();
    }
}

/// Committed entities recently read or written, decoded: the entities of a busy customer,
/// merchant or session are read from here instead of searched for in RocksDB's memtable and
/// decoded again for each batch. Two generations of at most half of `capacity` each: when
/// the young one is full it becomes the old one and the old one is dropped; an entity found
/// in the old one moves to the young one. Holds exactly what the store holds for its keys:
/// every write of the store goes through it.
struct Recent<V> {
    young: HashMap<Key, V>,
    old: HashMap<Key, V>,
    capacity: usize,
}

/// Memory an entity takes among the recent ones, about: key, value, what the value holds on
/// the heap at most, and the hash table's own (a control byte, and an eighth free). A table
/// grows by doubling, so a generation may take up to twice its share for a while.
trait Footprint: Sized {
    const HEAP: usize;
    const BYTES: usize = (std::mem::size_of::<(Key, Self)>() + 1) * 8 / 7 + Self::HEAP;
}

impl Footprint for CustomerState {
    /// Cards, devices and IPs: at most [`KNOWN_CAP`] hashes each.
    const HEAP: usize = 3 * KNOWN_CAP * std::mem::size_of::<u64>();
}

impl Footprint for MerchantState {
    const HEAP: usize = 0;
}

impl Footprint for SessionState {
    const HEAP: usize = 0;
}

impl<V: Footprint> Recent<V> {
    /// Room for about `bytes` of entities (at least two).
    fn new(bytes: usize) -> Recent<V> {
        Recent {
            young: HashMap::new(),
            old: HashMap::new(),
            capacity: (bytes / V::BYTES).max(2),
        }
    }
}

impl<V: Clone> Recent<V> {
    fn get(&mut self, key: &Key) -> Option<V> {
        if let Some(v) = self.young.get(key) {
            return Some(v.clone());
        }
        let v = self.old.remove(key)?;
        self.put(*key, v.clone());
        Some(v)
    }

    fn put(&mut self, key: Key, value: V) {
        if self.young.len() >= self.capacity / 2 && !self.young.contains_key(&key) {
            // The old generation goes; its table's room serves the new young one.
            std::mem::swap(&mut self.young, &mut self.old);
            self.young.clear();
        }
        self.old.remove(&key);
        self.young.insert(key, value);
    }

    fn remove(&mut self, key: &Key) {
        self.young.remove(key);
        self.old.remove(key);
    }

    fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }
}

/// Where entities not yet in a [`StateBatch`] come from: the store online, nothing in replay.
pub trait Loader {
    fn customer(&self, key: &Key) -> Result<Option<CustomerState>, StateError>;
    fn merchant(&self, key: &Key) -> Result<Option<MerchantState>, StateError>;
    fn session(&self, key: &Key) -> Result<Option<SessionState>, StateError>;
    /// The committed forward mark of `task` for `source` (see [`StateBatch::first_forward`]).
    fn forward_mark(&self, task: i32, source: SourcePartition) -> Result<Option<i64>, StateError>;
}

/// Where a forwarded record was read before it was forwarded: its input (the merge's index)
/// and partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourcePartition {
    pub input: u8,
    pub partition: i32,
}

/// Reads through a batch being committed (its transaction in flight) until the store has
/// it: its entities, its forward marks, and as absent what it expired; the rest, and
/// everything when no batch is in flight, from `below`.
pub struct Committing<'a, L> {
    /// The batch and the entities it expired.
    pub batch: Option<(&'a StateBatch, &'a HashSet<(EntityKind, Key)>)>,
    pub below: &'a L,
}

impl<L: Loader> Committing<'_, L> {
    fn read<V: Clone>(
        &self,
        kind: EntityKind,
        key: &Key,
        held: fn(&StateBatch) -> &HashMap<Key, V>,
        below: impl FnOnce() -> Result<Option<V>, StateError>,
    ) -> Result<Option<V>, StateError> {
        if let Some((batch, expired)) = self.batch {
            if let Some(v) = held(batch).get(key) {
                return Ok(Some(v.clone()));
            }
            if expired.contains(&(kind, *key)) {
                return Ok(None);
            }
        }
        below()
    }
}

impl<L: Loader> Loader for Committing<'_, L> {
    fn customer(&self, key: &Key) -> Result<Option<CustomerState>, StateError> {
        self.read(
            EntityKind::Customer,
            key,
            |b| &b.customers,
            || self.below.customer(key),
        )
    }
    fn merchant(&self, key: &Key) -> Result<Option<MerchantState>, StateError> {
        self.read(
            EntityKind::Merchant,
            key,
            |b| &b.merchants,
            || self.below.merchant(key),
        )
    }
    fn session(&self, key: &Key) -> Result<Option<SessionState>, StateError> {
        self.read(
            EntityKind::Session,
            key,
            |b| &b.sessions,
            || self.below.session(key),
        )
    }
    fn forward_mark(&self, task: i32, source: SourcePartition) -> Result<Option<i64>, StateError> {
        match self
            .batch
            .and_then(|(b, _)| b.forward_marks.get(&(task, source)))
        {
            Some(&m) => Ok(Some(m)),
            None => self.below.forward_mark(task, source),
        }
    }
}

/// Everything is in the batch already (replay).
pub struct InMemory;

impl Loader for InMemory {
    fn customer(&self, _: &Key) -> Result<Option<CustomerState>, StateError> {
        Ok(None)
    }
    fn merchant(&self, _: &Key) -> Result<Option<MerchantState>, StateError> {
        Ok(None)
    }
    fn session(&self, _: &Key) -> Result<Option<SessionState>, StateError> {
        Ok(None)
    }
    fn forward_mark(&self, _: i32, _: SourcePartition) -> Result<Option<i64>, StateError> {
        Ok(None)
    }
}

/// State changes not yet committed: read before the store by the events after them, written
/// to the changelog in the transaction that commits them, then to the store.
#[derive(Default)]
pub struct StateBatch {
    pub customers: HashMap<Key, CustomerState>,
    pub merchants: HashMap<Key, MerchantState>,
    pub sessions: HashMap<Key, SessionState>,
    /// Entities expired since the last commit: tombstones in the changelog, deletes in the
    /// store.
    pub expired: Vec<(EntityKind, Key)>,
    /// Partition → its stream time (the newest event time applied), where it moved.
    pub stream_time: BTreeMap<i32, i64>,
    /// (task, source) → the source offset of the last forwarded record the task applied,
    /// where it moved.
    pub forward_marks: BTreeMap<(i32, SourcePartition), i64>,
}

impl StateBatch {
    pub fn clear(&mut self) {
        self.customers.clear();
        self.merchants.clear();
        self.sessions.clear();
        self.expired.clear();
        self.stream_time.clear();
        self.forward_marks.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.customers.is_empty()
            && self.merchants.is_empty()
            && self.sessions.is_empty()
            && self.expired.is_empty()
            && self.stream_time.is_empty()
            && self.forward_marks.is_empty()
    }

    /// Drops what the batch holds for `partition` (revoked: its state is the next owner's).
    pub fn drop_partition(&mut self, partition: i32) {
        self.customers
            .retain(|k, _| keys::partition_of(k) != partition);
        self.merchants
            .retain(|k, _| keys::partition_of(k) != partition);
        self.sessions
            .retain(|k, _| keys::partition_of(k) != partition);
        self.expired
            .retain(|(_, k)| keys::partition_of(k) != partition);
        self.stream_time.remove(&partition);
        self.forward_marks.retain(|(task, _), _| *task != partition);
    }

    /// Whether the forwarded record read at `offset` of `source` is new to `task`, and if so
    /// marks it applied. Under at-least-once a record is forwarded outside the transaction,
    /// so a crash before the commit forwards it again (identical): the copy comes after the
    /// first in the repartition partition, since a source partition's records are forwarded
    /// in offset order by an idempotent producer, and each owner starts where the last
    /// committed; so a record at or below the mark was applied already.
    pub fn first_forward(
        &mut self,
        task: i32,
        source: SourcePartition,
        offset: i64,
        loader: &impl Loader,
    ) -> Result<bool, StateError> {
        let mark = match self.forward_marks.get(&(task, source)) {
            Some(&m) => Some(m),
            None => loader.forward_mark(task, source)?,
        };
        if mark.is_some_and(|m| offset <= m) {
            return Ok(false);
        }
        self.forward_marks.insert((task, source), offset);
        Ok(true)
    }

    /// Raises `partition`'s stream time to `event_time_ms`; `known` is its committed value.
    pub fn advance(&mut self, partition: i32, event_time_ms: i64, known: Option<i64>) {
        let t = self
            .stream_time
            .entry(partition)
            .or_insert(known.unwrap_or(i64::MIN));
        *t = (*t).max(event_time_ms);
    }

    /// Expires the entities of `partition` this batch holds that were last seen before
    /// `cutoff`: out of the batch, into [`StateBatch::expired`]. Returns how many.
    pub fn expire_idle(&mut self, partition: i32, cutoff: i64) -> usize {
        let before = self.expired.len();
        let idle = |k: &Key, last: Option<i64>| {
            keys::partition_of(k) == partition && last.is_some_and(|t| t < cutoff)
        };
        let expired = &mut self.expired;
        self.customers.retain(|k, v| {
            let gone = idle(k, v.last_event_ms);
            if gone {
                expired.push((EntityKind::Customer, *k));
            }
            !gone
        });
        self.merchants.retain(|k, v| {
            let gone = idle(k, v.last_event_ms);
            if gone {
                expired.push((EntityKind::Merchant, *k));
            }
            !gone
        });
        self.sessions.retain(|k, v| {
            let gone = idle(k, Some(v.last_event_ms));
            if gone {
                expired.push((EntityKind::Session, *k));
            }
            !gone
        });
        self.expired.len() - before
    }

    /// The batch as changelog records: (partition, key, value; `None` is a tombstone). The
    /// key is a tag (the entity kind's, or `t` for the stream time) and the state key (or
    /// the partition).
    pub fn changelog_records(&self) -> impl Iterator<Item = ChangelogRecord> + '_ {
        fn entity(kind: EntityKind, k: &Key, value: Option<Vec<u8>>) -> ChangelogRecord {
            let mut key = Vec::with_capacity(21);
            key.push(kind.tag());
            key.extend_from_slice(k);
            (keys::partition_of(k), key, value)
        }
        fn encoded(capacity: usize, encode: impl FnOnce(&mut Vec<u8>)) -> Option<Vec<u8>> {
            let mut b = Vec::with_capacity(capacity);
            encode(&mut b);
            Some(b)
        }
        let customers = self
            .customers
            .iter()
            .map(|(k, v)| entity(EntityKind::Customer, k, encoded(256, |b| v.encode(b))));
        let merchants = self
            .merchants
            .iter()
            .map(|(k, v)| entity(EntityKind::Merchant, k, encoded(64, |b| v.encode(b))));
        let sessions = self
            .sessions
            .iter()
            .map(|(k, v)| entity(EntityKind::Session, k, encoded(64, |b| v.encode(b))));
        let expired = self.expired.iter().map(|(kind, k)| entity(*kind, k, None));
        let stream_time = self
            .stream_time
            .iter()
            .map(|(&p, &t)| (p, stream_time_key(p), Some(t.to_le_bytes().to_vec())));
        let forward_marks = self.forward_marks.iter().map(|(&(task, source), &offset)| {
            let value = offset.to_le_bytes().to_vec();
            (task, forward_mark_key(source), Some(value))
        });
        customers
            .chain(merchants)
            .chain(sessions)
            .chain(expired)
            .chain(stream_time)
            .chain(forward_marks)
    }
}

/// (partition, key, value; `None` is a tombstone): see [`StateBatch::changelog_records`].
pub type ChangelogRecord = (i32, Vec<u8>, Option<Vec<u8>>);

fn in_key_order<V>(entities: &HashMap<Key, V>) -> Vec<(&Key, &V)> {
    let mut sorted: Vec<_> = entities.iter().collect();
    sorted.sort_unstable_by_key(|&(k, _)| k);
    sorted
}

fn stream_time_key(partition: i32) -> Vec<u8> {
    let mut key = vec![STREAM_TIME_TAG];
    key.extend_from_slice(&(partition as u32).to_be_bytes());
    key
}

fn checkpoint_key(partition: i32) -> Vec<u8> {
    format!("checkpoint/{partition}").into_bytes()
}

fn checkpoint_time_key(partition: i32) -> Vec<u8> {
    format!("checkpoint-time/{partition}").into_bytes()
}

fn meta_stream_time_key(partition: i32) -> Vec<u8> {
    format!("stream-time/{partition}").into_bytes()
}

/// A forward mark's changelog key (in its task's partition): the tag, the source's input and
/// partition.
fn forward_mark_key(source: SourcePartition) -> Vec<u8> {
    let mut key = vec![FORWARD_MARK_TAG, source.input];
    key.extend_from_slice(&(source.partition as u32).to_be_bytes());
    key
}

/// The inverse of [`forward_mark_key`], from what follows the tag.
fn forward_mark_source(rest: &[u8]) -> Option<SourcePartition> {
    let (&input, partition) = rest.split_first()?;
    Some(SourcePartition {
        input,
        partition: u32::from_be_bytes(partition.try_into().ok()?) as i32,
    })
}

/// The forward marks of `task`, each `forward/<task>/<input>/<source partition>`.
fn meta_forward_prefix(task: i32) -> Vec<u8> {
    format!("forward/{task}/").into_bytes()
}

fn meta_forward_key(task: i32, source: SourcePartition) -> Vec<u8> {
    let mut key = meta_forward_prefix(task);
    key.extend_from_slice(format!("{}/{}", source.input, source.partition).as_bytes());
    key
}

const INSTANCE_KEY: &[u8] = b"instance-id";

/// Every event reads its entities by key, and many keys are new (a first transaction, a new
/// session): whole-key Bloom filters in the tables and the memtable answer "not here"
/// without a search, so a read costs one lookup where the key is, not one per table and
/// memtable it is not in.
fn entity_cf_options() -> Options {
    let mut cf = Options::default();
    cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    cf.set_block_based_table_factory(&table);
    cf.set_memtable_prefix_bloom_ratio(0.05);
    cf.set_memtable_whole_key_filtering(true);
    cf
}

/// A partition's checkpoint: the changelog offset its state reflects, and when it was
/// written (wall clock, ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The offset of the next changelog record to apply.
    pub next: i64,
    pub written_at_ms: i64,
}

impl Store {
    /// Opens (or creates) the store at `path`, keeping about `cache_bytes` of committed
    /// entities decoded in memory (`state.cache-bytes`).
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store, StateError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Memtables of all column families together: a bound on the memory a restore (a
        // partition's whole changelog written in chunks) can take, whatever its size.
        opts.set_db_write_buffer_size(STORE_WRITE_BUFFER_BYTES);
        let mut cfs: Vec<ColumnFamilyDescriptor> = EntityKind::ALL
            .into_iter()
            .map(|k| ColumnFamilyDescriptor::new(k.name(), entity_cf_options()))
            .collect();
        cfs.push(ColumnFamilyDescriptor::new(META, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StateError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Store {
            db,
            recent: RecentEntities::new(cache_bytes).into(),
        })
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
            recent: RecentEntities::new(0).into(),
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// An entity of `kind`: from the recent ones (`recent` picks its kind's), else from
    /// RocksDB, decoded and kept among the recent ones.
    fn read<V: Clone>(
        &self,
        kind: EntityKind,
        key: &Key,
        recent: fn(&mut RecentEntities) -> &mut Recent<V>,
        decode: fn(&[u8]) -> Result<V, CodecError>,
    ) -> Result<Option<V>, StateError> {
        let mut all = self.recent.borrow_mut();
        let recent = recent(&mut all);
        if let Some(v) = recent.get(key) {
            return Ok(Some(v));
        }
        match self.db.get_pinned_cf(self.cf(kind.name()), key)? {
            Some(v) => {
                let v = decode(&v)?;
                recent.put(*key, v.clone());
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }

    pub fn customer(&self, key: &Key) -> Result<Option<CustomerState>, StateError> {
        self.read(
            EntityKind::Customer,
            key,
            |r| &mut r.customers,
            CustomerState::decode,
        )
    }

    pub fn merchant(&self, key: &Key) -> Result<Option<MerchantState>, StateError> {
        self.read(
            EntityKind::Merchant,
            key,
            |r| &mut r.merchants,
            MerchantState::decode,
        )
    }

    pub fn session(&self, key: &Key) -> Result<Option<SessionState>, StateError> {
        self.read(
            EntityKind::Session,
            key,
            |r| &mut r.sessions,
            SessionState::decode,
        )
    }

    fn meta_i64(&self, key: &[u8]) -> Result<Option<i64>, StateError> {
        match self.db.get_pinned_cf(self.cf(META), key)? {
            Some(v) if v.len() == 8 => Ok(Some(i64::from_le_bytes(v[..8].try_into().expect("8")))),
            Some(_) => Err(CodecError("meta value is not 8 bytes".into()).into()),
            None => Ok(None),
        }
    }

    /// This instance's id: made at the store's first open and kept with it, so a restarted
    /// instance is known as the same one (its Kafka transactional id).
    pub fn instance_id(&self) -> Result<String, StateError> {
        if let Some(v) = self.db.get_cf(self.cf(META), INSTANCE_KEY)? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "{:016x}",
            (nanos as u64) ^ (u64::from(std::process::id()) << 40)
        );
        self.db.put_cf(self.cf(META), INSTANCE_KEY, id.as_bytes())?;
        Ok(id)
    }

    /// The changelog checkpoint of `partition`, if its state was ever written.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<Checkpoint>, StateError> {
        let Some(next) = self.meta_i64(&checkpoint_key(partition))? else {
            return Ok(None);
        };
        let written_at_ms = self.meta_i64(&checkpoint_time_key(partition))?.unwrap_or(0);
        Ok(Some(Checkpoint {
            next,
            written_at_ms,
        }))
    }

    /// The stream time of `partition` as last committed.
    pub fn stream_time(&self, partition: i32) -> Result<Option<i64>, StateError> {
        self.meta_i64(&meta_stream_time_key(partition))
    }

    /// The forward mark of `task` for `source` as last committed.
    pub fn forward_mark(
        &self,
        task: i32,
        source: SourcePartition,
    ) -> Result<Option<i64>, StateError> {
        self.meta_i64(&meta_forward_key(task, source))
    }

    /// Writes a committed batch with the changelog checkpoints it reflects (partition → next
    /// changelog offset), atomically, and empties it (its entities move to the recent ones).
    /// Not synced: a write lost to a machine crash leaves the store behind its changelog,
    /// which the next restore reads.
    pub fn commit(
        &self,
        batch: &mut StateBatch,
        checkpoints: &BTreeMap<i32, i64>,
        now_ms: i64,
    ) -> Result<(), StateError> {
        let mut wb = WriteBatch::default();
        let mut buf = Vec::with_capacity(512);
        // In key order: RocksDB's memtable (a skip list) inserts the next of an ascending
        // run from where the last one went, instead of searching from its top each time.
        for (k, v) in in_key_order(&batch.customers) {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf("customer"), k, &buf);
        }
        for (k, v) in in_key_order(&batch.merchants) {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf("merchant"), k, &buf);
        }
        for (k, v) in in_key_order(&batch.sessions) {
            buf.clear();
            v.encode(&mut buf);
            wb.put_cf(self.cf("session"), k, &buf);
        }
        for (kind, k) in &batch.expired {
            wb.delete_cf(self.cf(kind.name()), k);
        }
        for (p, t) in &batch.stream_time {
            wb.put_cf(self.cf(META), meta_stream_time_key(*p), t.to_le_bytes());
        }
        for (&(task, source), offset) in &batch.forward_marks {
            wb.put_cf(
                self.cf(META),
                meta_forward_key(task, source),
                offset.to_le_bytes(),
            );
        }
        for (p, next) in checkpoints {
            wb.put_cf(self.cf(META), checkpoint_key(*p), next.to_le_bytes());
            wb.put_cf(self.cf(META), checkpoint_time_key(*p), now_ms.to_le_bytes());
        }
        self.db.write(wb)?;
        let mut recent = self.recent.borrow_mut();
        for (k, v) in batch.customers.drain() {
            recent.customers.put(k, v);
        }
        for (k, v) in batch.merchants.drain() {
            recent.merchants.put(k, v);
        }
        for (k, v) in batch.sessions.drain() {
            recent.sessions.put(k, v);
        }
        for (kind, k) in &batch.expired {
            match kind {
                EntityKind::Customer => recent.customers.remove(k),
                EntityKind::Merchant => recent.merchants.remove(k),
                EntityKind::Session => recent.sessions.remove(k),
            }
        }
        batch.clear();
        Ok(())
    }

    /// Deletes everything the store holds for `partition`: entities, stream time and
    /// checkpoint (state that cannot be trusted, before a restore from the changelog's start).
    pub fn drop_partition(&self, partition: i32) -> Result<(), StateError> {
        let (from, to) = keys::partition_range(partition);
        let mut wb = WriteBatch::default();
        for kind in EntityKind::ALL {
            wb.delete_range_cf(self.cf(kind.name()), from, to);
        }
        wb.delete_cf(self.cf(META), checkpoint_key(partition));
        wb.delete_cf(self.cf(META), checkpoint_time_key(partition));
        wb.delete_cf(self.cf(META), meta_stream_time_key(partition));
        let marks = meta_forward_prefix(partition);
        let mut end = marks.clone();
        *end.last_mut().expect("not empty") += 1;
        wb.delete_range_cf(self.cf(META), marks, end);
        self.recent.borrow_mut().clear();
        self.db.write(wb)?;
        Ok(())
    }

    /// Applies changelog records of `partition`, read in order up to (not including) offset
    /// `next`, in one write with `next` as the checkpoint. A record with an unknown tag is an
    /// error: a changelog written by a newer version.
    pub fn restore(
        &self,
        partition: i32,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
        next: i64,
        now_ms: i64,
    ) -> Result<(), StateError> {
        let mut wb = WriteBatch::default();
        for (key, value) in records {
            let Some((&tag, rest)) = key.split_first() else {
                return Err(CodecError("empty changelog key".into()).into());
            };
            if tag == STREAM_TIME_TAG {
                if let Some(v) = value {
                    wb.put_cf(self.cf(META), meta_stream_time_key(partition), v);
                }
                continue;
            }
            if tag == FORWARD_MARK_TAG {
                let source = forward_mark_source(rest)
                    .ok_or_else(|| CodecError("forward mark key is not a source".into()))?;
                if let Some(v) = value {
                    wb.put_cf(self.cf(META), meta_forward_key(partition, source), v);
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
        wb.put_cf(self.cf(META), checkpoint_key(partition), next.to_le_bytes());
        wb.put_cf(
            self.cf(META),
            checkpoint_time_key(partition),
            now_ms.to_le_bytes(),
        );
        self.recent.borrow_mut().clear();
        self.db.write(wb)?;
        Ok(())
    }

    /// Goes on with an expiry scan of `partition`: looks at up to `*budget` entities from
    /// `cursor` (taking what it looks at off the budget) and appends those last seen before
    /// `cutoff` (event time, ms) to `idle`. Returns whether the scan reached the partition's
    /// end; if not, `cursor` says where the next call goes on. A scan in slices keeps a
    /// partition of millions of entities from holding up the caller's poll loop.
    pub fn idle(
        &self,
        partition: i32,
        cutoff: i64,
        cursor: &mut ScanCursor,
        budget: &mut usize,
        idle: &mut Vec<(EntityKind, Key)>,
    ) -> Result<bool, StateError> {
        let (from, to) = keys::partition_range(partition);
        while let Some(&kind) = EntityKind::ALL.get(cursor.kind) {
            if *budget == 0 {
                return Ok(false);
            }
            // The smallest key after the last one looked at is that key with a 0 byte more.
            let start = match &cursor.after {
                Some(k) => [k, &[0u8][..]].concat(),
                None => from.to_vec(),
            };
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_iterate_upper_bound(to.to_vec());
            let iter = self.db.iterator_cf_opt(
                self.cf(kind.name()),
                ro,
                rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
            );
            for item in iter {
                let (k, v) = item?;
                *budget -= 1;
                if last_event_ms(kind, &v).is_some_and(|t| t < cutoff) {
                    if let Ok(key) = Key::try_from(&k[..]) {
                        idle.push((kind, key));
                    }
                }
                if *budget == 0 {
                    cursor.after = Some(k);
                    return Ok(false);
                }
            }
            cursor.kind += 1;
            cursor.after = None;
        }
        Ok(true)
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

/// Where an expiry scan of a partition goes on: the entity kind (its index in
/// [`EntityKind::ALL`]) and the last key looked at in it. The default is the beginning.
#[derive(Debug, Default)]
pub struct ScanCursor {
    kind: usize,
    after: Option<Box<[u8]>>,
}

/// The online pipeline's entities come from here when not in the uncommitted batch.
impl Loader for Store {
    fn customer(&self, key: &Key) -> Result<Option<CustomerState>, StateError> {
        Store::customer(self, key)
    }
    fn merchant(&self, key: &Key) -> Result<Option<MerchantState>, StateError> {
        Store::merchant(self, key)
    }
    fn session(&self, key: &Key) -> Result<Option<SessionState>, StateError> {
        Store::session(self, key)
    }
    fn forward_mark(&self, task: i32, source: SourcePartition) -> Result<Option<i64>, StateError> {
        Store::forward_mark(self, task, source)
    }
}

/// What a changelog record holds, for `state-export` and tests: an entity kind's name,
/// `stream-time` or `forward-mark`; `None` for an unknown tag.
pub fn describe_changelog_key(key: &[u8]) -> Option<&'static str> {
    let (&tag, _) = key.split_first()?;
    if tag == STREAM_TIME_TAG {
        return Some("stream-time");
    }
    if tag == FORWARD_MARK_TAG {
        return Some("forward-mark");
    }
    EntityKind::from_tag(tag).map(EntityKind::name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::keys::{key, Hasher};

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fraudstream-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// The recent entities never answer differently from RocksDB: after commits, expiry, a
    /// restore that rewrites an entity, a dropped partition, and more entities than it holds.
    #[test]
    fn recent_entities_hold_what_the_store_holds() {
        let dir = temp("recent");
        // Room for about 1,000 customers.
        let store = Store::open(&dir, 3_000 * CustomerState::BYTES).unwrap();
        let capacity = store.recent.borrow().customers.capacity;
        assert!((900..=1_000).contains(&capacity), "{capacity}");
        let h = Hasher::new(b"s");
        let k = key(1, &h.entity("customer", "a"));
        let customer = |t: i64| CustomerState {
            last_event_ms: Some(t),
            ..Default::default()
        };
        let from_db = |store: &Store, k: &Key| {
            store
                .db
                .get_pinned_cf(store.cf("customer"), k)
                .unwrap()
                .map(|v| CustomerState::decode(&v).unwrap())
        };
        let mut b = StateBatch::default();
        b.customers.insert(k, customer(1));
        store.commit(&mut b, &BTreeMap::new(), 0).unwrap();
        assert!(b.is_empty(), "the commit empties the batch");
        assert_eq!(store.customer(&k).unwrap(), Some(customer(1)));

        b.customers.insert(k, customer(2));
        store.commit(&mut b, &BTreeMap::new(), 0).unwrap();
        assert_eq!(store.customer(&k).unwrap(), Some(customer(2)));

        // A restore rewrites it from the changelog: the read sees the restored value.
        let mut v = Vec::new();
        customer(3).encode(&mut v);
        let mut ck = vec![EntityKind::Customer.tag()];
        ck.extend_from_slice(&k);
        store.restore(1, &[(ck.clone(), Some(v))], 10, 0).unwrap();
        assert_eq!(store.customer(&k).unwrap(), Some(customer(3)));

        // Expired: gone from both.
        b.expired.push((EntityKind::Customer, k));
        store.commit(&mut b, &BTreeMap::new(), 0).unwrap();
        assert_eq!(store.customer(&k).unwrap(), None);
        assert_eq!(from_db(&store, &k), None);

        // Dropped partition: gone from both.
        b.customers.insert(k, customer(4));
        store.commit(&mut b, &BTreeMap::new(), 0).unwrap();
        assert_eq!(store.customer(&k).unwrap(), Some(customer(4)));
        store.drop_partition(1).unwrap();
        assert_eq!(store.customer(&k).unwrap(), None);

        // More entities than it holds: every one still reads as written.
        let n = 3 * capacity + 100;
        let keys: Vec<Key> = (0..n)
            .map(|i| key(2, &h.entity("customer", &i.to_string())))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            b.customers.insert(*k, customer(i as i64));
            if b.customers.len() == 1000 {
                store.commit(&mut b, &BTreeMap::new(), 0).unwrap();
            }
        }
        store.commit(&mut b, &BTreeMap::new(), 0).unwrap();
        for (i, k) in keys.iter().enumerate().rev() {
            assert_eq!(store.customer(k).unwrap(), Some(customer(i as i64)));
            assert_eq!(from_db(&store, k), Some(customer(i as i64)));
        }
        let recent = store.recent.borrow();
        assert!(recent.customers.young.len() + recent.customers.old.len() <= capacity);
        drop(recent);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What the default budget holds, as its documentation says.
    #[test]
    fn the_default_cache_holds_the_entities_it_is_documented_to() {
        let r = RecentEntities::new(DEFAULT_CACHE_BYTES);
        let about = |n: usize, want: usize| n.abs_diff(want) * 10 < want;
        assert!(
            about(r.customers.capacity, 18_000),
            "{}",
            r.customers.capacity
        );
        assert!(
            about(r.sessions.capacity, 280_000),
            "{}",
            r.sessions.capacity
        );
        assert!(
            about(r.merchants.capacity, 450_000),
            "{}",
            r.merchants.capacity
        );
    }

    #[test]
    fn batch_is_written_with_its_checkpoint_and_survives_reopen() {
        let dir = temp("store");
        let h = Hasher::new(b"s");
        let k = key(3, &h.entity("customer", "c1"));
        let id;
        {
            let store = Store::open(&dir, DEFAULT_CACHE_BYTES).unwrap();
            id = store.instance_id().unwrap();
            assert_eq!(store.checkpoint(3).unwrap(), None);
            let mut b = StateBatch::default();
            let mut c = CustomerState::default();
            c.amounts.add(12.0);
            c.last_event_ms = Some(5);
            b.customers.insert(k, c);
            b.merchants.insert(k, MerchantState::default());
            b.advance(3, 5, None);
            store
                .commit(&mut b, &BTreeMap::from([(3, 42)]), 1000)
                .unwrap();
        }
        let store = Store::open(&dir, DEFAULT_CACHE_BYTES).unwrap();
        assert_eq!(
            store.instance_id().unwrap(),
            id,
            "the id stays with the store"
        );
        assert_eq!(
            store.checkpoint(3).unwrap(),
            Some(Checkpoint {
                next: 42,
                written_at_ms: 1000
            })
        );
        assert_eq!(store.checkpoint(4).unwrap(), None);
        assert_eq!(store.stream_time(3).unwrap(), Some(5));
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

    #[test]
    fn changelog_records_restore_the_same_state_and_idle_entities_are_found() {
        let (a, b) = (temp("store-a"), temp("store-b"));
        let h = Hasher::new(b"s");
        let old = key(1, &h.entity("customer", "old"));
        let new = key(1, &h.entity("customer", "new"));
        let other = key(2, &h.entity("customer", "old"));
        let mut batch = StateBatch::default();
        for (k, t) in [(old, 1_000), (new, 9_000_000), (other, 1_000)] {
            let c = CustomerState {
                last_event_ms: Some(t),
                ..Default::default()
            };
            batch.customers.insert(k, c);
        }
        batch.advance(1, 9_000_000, None);
        let committed: Vec<_> = batch.changelog_records().collect();
        let source = Store::open(&a, DEFAULT_CACHE_BYTES).unwrap();
        source.commit(&mut batch, &BTreeMap::new(), 0).unwrap();
        let idle = |partition, budget| {
            let mut found = Vec::new();
            let mut cursor = ScanCursor::default();
            let mut slices = 0;
            loop {
                slices += 1;
                let mut left = budget;
                if source
                    .idle(partition, 5_000, &mut cursor, &mut left, &mut found)
                    .unwrap()
                {
                    return (found, slices);
                }
                assert_eq!(left, 0, "a slice stops only when its budget is spent");
            }
        };
        assert_eq!(idle(1, 100), (vec![(EntityKind::Customer, old)], 1));
        assert_eq!(idle(2, 100), (vec![(EntityKind::Customer, other)], 1));
        // A scan one entity at a time goes on where it stopped and finds the same: partition
        // 1 holds two customers and a stream time, which is no entity.
        assert_eq!(idle(1, 1), (vec![(EntityKind::Customer, old)], 3));

        // Partition 1 through its changelog records, then a tombstone for the idle one.
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = committed
            .into_iter()
            .filter(|(p, _, _)| *p == 1)
            .map(|(_, k, v)| (k, v))
            .collect();
        let expired = StateBatch {
            expired: vec![(EntityKind::Customer, old)],
            ..Default::default()
        };
        records.extend(expired.changelog_records().map(|(_, k, v)| (k, v)));
        let copy = Store::open(&b, DEFAULT_CACHE_BYTES).unwrap();
        copy.restore(1, &records, 17, 5).unwrap();
        assert_eq!(copy.checkpoint(1).unwrap().map(|c| c.next), Some(17));
        assert_eq!(copy.stream_time(1).unwrap(), Some(9_000_000));
        assert!(copy.customer(&old).unwrap().is_none(), "tombstone applied");
        assert_eq!(
            copy.customer(&new).unwrap().unwrap().last_event_ms,
            Some(9_000_000)
        );
        assert!(
            copy.customer(&other).unwrap().is_none(),
            "another partition"
        );
        copy.drop_partition(1).unwrap();
        assert!(copy.customer(&new).unwrap().is_none());
        assert_eq!(copy.checkpoint(1).unwrap(), None);
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    /// A forwarded record at or below its task's mark for its source is a copy: skipped
    /// whether the mark is in the batch, committed to the store, or restored from the
    /// changelog; marks are per task and source, and go with a dropped partition.
    #[test]
    fn forward_marks_tell_copies_from_new_records() {
        let (a, b) = (temp("marks-a"), temp("marks-b"));
        let store = Store::open(&a, DEFAULT_CACHE_BYTES).unwrap();
        let tx0 = SourcePartition {
            input: 2,
            partition: 0,
        };
        let nav0 = SourcePartition {
            input: 0,
            partition: 0,
        };
        let mut batch = StateBatch::default();
        assert!(batch.first_forward(1, tx0, 10, &store).unwrap());
        assert!(batch.first_forward(1, tx0, 12, &store).unwrap());
        assert!(!batch.first_forward(1, tx0, 12, &store).unwrap(), "a copy");
        assert!(!batch.first_forward(1, tx0, 11, &store).unwrap(), "older");
        assert!(
            batch.first_forward(1, nav0, 5, &store).unwrap(),
            "another input"
        );
        assert!(
            batch.first_forward(2, tx0, 3, &store).unwrap(),
            "another task"
        );
        let records: Vec<_> = batch.changelog_records().collect();
        store.commit(&mut batch, &BTreeMap::new(), 0).unwrap();
        assert_eq!(store.forward_mark(1, tx0).unwrap(), Some(12));

        // Committed: the next batch reads the mark from the store.
        let mut next = StateBatch::default();
        assert!(!next.first_forward(1, tx0, 12, &store).unwrap());
        assert!(next.first_forward(1, tx0, 13, &store).unwrap());

        // Restored from the changelog (task 1's records) into another store.
        let task1: Vec<(Vec<u8>, Option<Vec<u8>>)> = records
            .into_iter()
            .filter(|(p, _, _)| *p == 1)
            .map(|(_, k, v)| (k, v))
            .collect();
        assert_eq!(task1.len(), 2);
        assert!(task1
            .iter()
            .all(|(k, _)| describe_changelog_key(k) == Some("forward-mark")));
        let copy = Store::open(&b, DEFAULT_CACHE_BYTES).unwrap();
        copy.restore(1, &task1, 2, 0).unwrap();
        assert_eq!(copy.forward_mark(1, tx0).unwrap(), Some(12));
        assert_eq!(copy.forward_mark(1, nav0).unwrap(), Some(5));
        assert_eq!(
            copy.forward_mark(2, tx0).unwrap(),
            None,
            "task 2's is not here"
        );
        copy.drop_partition(1).unwrap();
        assert_eq!(copy.forward_mark(1, tx0).unwrap(), None);
        store.drop_partition(1).unwrap();
        assert_eq!(
            store.forward_mark(2, tx0).unwrap(),
            Some(3),
            "another task's stays"
        );
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    /// A batch in flight answers first for what it holds and for what it expired; the rest,
    /// and everything without one, from below.
    #[test]
    fn committing_batch_is_read_before_the_store() {
        let dir = temp("committing");
        let store = Store::open(&dir, DEFAULT_CACHE_BYTES).unwrap();
        let h = Hasher::new(b"s");
        let [old, gone, changed] =
            ["old", "gone", "changed"].map(|c| key(0, &h.entity("customer", c)));
        let seen = |t| CustomerState {
            last_event_ms: Some(t),
            ..CustomerState::default()
        };
        let mut committed = StateBatch::default();
        for k in [old, gone, changed] {
            committed.customers.insert(k, seen(1));
        }
        store.commit(&mut committed, &BTreeMap::new(), 0).unwrap();

        let mut flying = StateBatch::default();
        flying.customers.insert(changed, seen(2));
        flying.expired.push((EntityKind::Customer, gone));
        let mark = SourcePartition {
            input: 2,
            partition: 1,
        };
        flying.forward_marks.insert((0, mark), 7);
        let expired = flying.expired.iter().copied().collect();
        let through = Committing {
            batch: Some((&flying, &expired)),
            below: &store,
        };
        let last = |l: &dyn Fn(&Key) -> Option<CustomerState>, k| l(&k).map(|c| c.last_event_ms);
        let read = |k: &Key| through.customer(k).unwrap();
        assert_eq!(last(&read, changed), Some(Some(2)), "the batch's value");
        assert_eq!(last(&read, gone), None, "expired by the batch");
        assert_eq!(last(&read, old), Some(Some(1)), "from the store");
        assert!(through.merchant(&old).unwrap().is_none());
        assert_eq!(through.forward_mark(0, mark).unwrap(), Some(7));

        let none = Committing {
            batch: None,
            below: &store,
        };
        assert_eq!(
            none.customer(&gone).unwrap().and_then(|c| c.last_event_ms),
            Some(1)
        );
        assert_eq!(none.forward_mark(0, mark).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
