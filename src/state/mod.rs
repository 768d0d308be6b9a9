//! Per-entity state: event-time windows, entity states and their codec, keyed hashing of
//! identifiers, and the RocksDB store that caches them with each partition's changelog
//! checkpoint.
//!
//! This module owns storage only. What the state means (how a transaction updates it and
//! which features it yields) is in [`crate::features`].

pub mod entities;
pub mod global;
pub mod keys;
pub mod store;
pub mod window;

pub use entities::{CustomerState, EntityKind, MerchantState, SessionState};
pub use keys::{Hasher, Key};
pub use store::{
    Checkpoint, Committing, InMemory, Loader, SourcePartition, StateBatch, StateError, Store,
    DEFAULT_CACHE_BYTES,
};
