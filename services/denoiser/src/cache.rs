//! The conditioning cache: text contexts kept on the model's device, keyed by the caller's
//! `context_id`, so a generation sends its context once instead of with every step (and a hit
//! also skips the host-to-device copy).
//!
//! Bounded two ways: a byte budget (the least recently used entries are evicted to make room;
//! an entry larger than the whole budget is not cached) and a time-to-live counted from an
//! entry's last use (a generation that keeps stepping keeps its entry). Expired entries are
//! dropped lazily, on the next insert or lookup, from the least recently used end, so no
//! timer thread is needed and each call does O(log n) work plus the entries it drops.
//!
//! One mutex guards the map; every critical section is a few map operations (no tensor work,
//! and evicted tensors are freed after the lock is released), so neither the gRPC handlers
//! (lookups) nor the model thread (inserts) hold it for long.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tch::Tensor;

/// Budget and time-to-live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Most bytes of cached tensors (device bytes: elements x element size); 0 disables.
    pub max_bytes: u64,
    /// An entry unused for this long is dropped.
    pub ttl: Duration,
}

struct Entry {
    tensor: Tensor,
    bytes: u64,
    last_used: Instant,
    /// Position in `Inner::order` (larger: used more recently).
    seq: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// seq -> id, oldest use first.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    bytes: u64,
}

impl Inner {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.order.remove(&entry.seq);
        self.bytes -= entry.bytes;
        Some(entry)
    }

    /// Removes the least recently used entry.
    fn pop_oldest(&mut self) -> Option<Entry> {
        let (_, id) = self.order.pop_first()?;
        let entry = self.entries.remove(&id)?;
        self.bytes -= entry.bytes;
        Some(entry)
    }

    /// Drops entries unused for longer than `ttl` (they are all at the old end).
    fn expire(&mut self, now: Instant, ttl: Duration, dropped: &mut Vec<Tensor>) -> u64 {
        let mut n = 0;
        while let Some((_, id)) = self.order.first_key_value() {
            let stale = self
                .entries
                .get(id)
                .is_none_or(|e| now.saturating_duration_since(e.last_used) > ttl);
            if !stale {
                break;
            }
            if let Some(e) = self.pop_oldest() {
                dropped.push(e.tensor);
            }
            n += 1;
        }
        n
    }

    fn touch(&mut self, id: &str, now: Instant) {
        let seq = self.next_seq;
        if let Some(e) = self.entries.get_mut(id) {
            self.order.remove(&e.seq);
            e.seq = seq;
            e.last_used = now;
            self.order.insert(seq, id.to_string());
            self.next_seq += 1;
        }
    }
}

/// Counters since start (monotonic) and the current size; the type the metrics report.
pub use sd_server::telemetry::metrics::ContextCacheReading as CacheStats;

/// The cache. Shared by the gRPC handlers (lookups) and the model thread (inserts).
pub struct ContextCache {
    config: CacheConfig,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    oversize: AtomicU64,
}

impl std::fmt::Debug for ContextCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextCache")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Bytes a tensor occupies (elements x element size).
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

impl ContextCache {
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            oversize: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> CacheConfig {
        self.config
    }

    /// Whether an entry of `bytes` would be cached (the cache is on and it fits the budget).
    pub fn admits(&self, bytes: u64) -> bool {
        self.config.max_bytes > 0 && bytes <= self.config.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The context cached under `id` (a cheap handle to the same storage), refreshing its
    /// last use; `None` when absent or expired.
    pub fn get(&self, id: &str) -> Option<Tensor> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Tensor> {
        let mut dropped = Vec::new();
        let found = {
            let mut inner = self.lock();
            let expired = inner.expire(now, self.config.ttl, &mut dropped);
            self.expirations.fetch_add(expired, Ordering::Relaxed);
            inner.touch(id, now);
            inner.entries.get(id).map(|e| e.tensor.shallow_clone())
        };
        drop(dropped);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches `tensor` under `id`, replacing an entry of that id and evicting the least
    /// recently used entries until it fits. Returns false (and caches nothing) when the cache
    /// is off or the tensor alone exceeds the budget.
    pub fn insert(&self, id: &str, tensor: Tensor) -> bool {
        self.insert_at(id, tensor, Instant::now())
    }

    fn insert_at(&self, id: &str, tensor: Tensor, now: Instant) -> bool {
        let bytes = tensor_bytes(&tensor);
        if !self.admits(bytes) {
            if self.config.max_bytes > 0 {
                self.oversize.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        let mut dropped = Vec::new();
        {
            let mut inner = self.lock();
            let expired = inner.expire(now, self.config.ttl, &mut dropped);
            self.expirations.fetch_add(expired, Ordering::Relaxed);
            if let Some(old) = inner.remove(id) {
                dropped.push(old.tensor);
            }
            let mut evicted = 0;
            while inner.bytes + bytes > self.config.max_bytes {
                match inner.pop_oldest() {
                    Some(e) => {
                        dropped.push(e.tensor);
                        evicted += 1;
                    }
                    None => break,
                }
            }
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.order.insert(seq, id.to_string());
            inner.entries.insert(
                id.to_string(),
                Entry {
                    tensor,
                    bytes,
                    last_used: now,
                    seq,
                },
            );
            inner.bytes += bytes;
        }
        // Evicted tensors (device memory) are freed here, outside the lock.
        drop(dropped);
        self.inserts.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = {
            let inner = self.lock();
            (inner.entries.len() as u64, inner.bytes)
        };
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
            oversize: self.oversize.load(Ordering::Relaxed),
            entries,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A float tensor of `n` elements (4n bytes) filled with `v`.
    fn t(n: i64, v: f64) -> Tensor {
        Tensor::full([n], v, (Kind::Float, Device::Cpu))
    }

    fn cache(max_bytes: u64, ttl_secs: u64) -> ContextCache {
        ContextCache::new(CacheConfig {
            max_bytes,
            ttl: Duration::from_secs(ttl_secs),
        })
    }

    #[test]
    fn hits_return_the_stored_tensor_and_misses_are_counted() {
        let c = cache(1000, 60);
        assert!(c.get("a").is_none());
        assert!(c.insert("a", t(10, 3.0)));
        let got = c.get("a").unwrap();
        assert_eq!(got.double_value(&[9]), 3.0);
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.inserts, s.entries, s.bytes),
            (1, 1, 1, 1, 40)
        );
        // Re-storing an id replaces its entry.
        assert!(c.insert("a", t(20, 5.0)));
        assert_eq!(c.get("a").unwrap().double_value(&[19]), 5.0);
        let s = c.stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (1, 80, 0));
    }

    #[test]
    fn entries_expire_after_the_ttl_counted_from_last_use() {
        let c = cache(1000, 10);
        let t0 = Instant::now();
        assert!(c.insert_at("a", t(1, 1.0), t0));
        assert!(c.insert_at("b", t(1, 2.0), t0));
        // "a" used at 8 s: alive at 15 s (7 s idle), while "b" (15 s idle) has expired.
        assert!(c.get_at("a", t0 + Duration::from_secs(8)).is_some());
        assert!(c.get_at("b", t0 + Duration::from_secs(15)).is_none());
        assert!(c.get_at("a", t0 + Duration::from_secs(15)).is_some());
        let s = c.stats();
        assert_eq!((s.expirations, s.entries, s.bytes), (1, 1, 4));
        assert!(c.get_at("a", t0 + Duration::from_secs(26)).is_none());
        assert_eq!(c.stats().entries, 0);
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn the_byte_budget_evicts_least_recently_used_first() {
        let c = cache(120, 60); // room for three 40-byte entries
        for id in ["a", "b", "c"] {
            assert!(c.insert(id, t(10, 1.0)));
        }
        assert!(c.get("a").is_some()); // "b" is now the least recently used
        assert!(c.insert("d", t(10, 1.0)));
        assert!(c.get("b").is_none(), "b should have been evicted");
        for id in ["a", "c", "d"] {
            assert!(c.get(id).is_some(), "{id} should still be cached");
        }
        // A large entry evicts as many as it needs.
        assert!(c.insert("big", t(25, 1.0)));
        let s = c.stats();
        assert_eq!((s.evictions, s.entries, s.bytes), (4, 1, 100));
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_cached_and_zero_disables() {
        let c = cache(100, 60);
        assert!(c.insert("small", t(10, 1.0)));
        assert!(!c.admits(104));
        assert!(!c.insert("huge", t(26, 1.0)));
        assert!(c.get("huge").is_none());
        assert!(
            c.get("small").is_some(),
            "an oversize insert evicts nothing"
        );
        assert_eq!(c.stats().oversize, 1);
        let off = cache(0, 60);
        assert!(!off.admits(1));
        assert!(!off.insert("a", t(1, 1.0)));
        assert!(off.get("a").is_none());
        assert_eq!(off.stats().oversize, 0);
    }
}
