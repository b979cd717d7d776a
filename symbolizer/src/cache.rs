//! The result cache: symbols by (object contents, address), LRU with a
//! memory bound. Objects are named by their build id when they have one, so
//! the same library mapped by many processes, from different paths or
//! mount namespaces, is symbolized once.

use std::{collections::HashMap, fmt, sync::Arc};

use lru::LruCache;

use crate::{Symbol, elf::hex};

/// Identity of an object file's contents.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    /// The ELF build id (`NT_GNU_BUILD_ID`).
    BuildId(Arc<[u8]>),
    /// Files without a build id: the file's identity and version.
    File {
        dev: u64,
        inode: u64,
        size: u64,
        mtime_ns: i128,
    },
    /// The running kernel (kallsyms).
    Kernel,
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::BuildId(id) => write!(f, "build-id:{}", hex(id)),
            ObjectKey::File {
                dev, inode, size, ..
            } => write!(f, "file:{dev:x}:{inode}:{size}"),
            ObjectKey::Kernel => f.write_str("kernel"),
        }
    }
}

impl ObjectKey {
    /// The key of an open file: its build id, else its identity and version.
    pub fn of_file(build_id: Option<&[u8]>, metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        match build_id {
            Some(id) if !id.is_empty() => ObjectKey::BuildId(id.into()),
            _ => ObjectKey::File {
                dev: metadata.dev(),
                inode: metadata.ino(),
                size: metadata.size(),
                mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                    + i128::from(metadata.mtime_nsec()),
            },
        }
    }
}

/// How addresses of an object are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Addressing {
    /// File offsets, as `/proc/PID/maps` and the kernel's stacks give them.
    FileOffset,
    /// ELF virtual addresses, as `nm` and `addr2line` show them.
    Virtual,
}

/// Interned (object, addressing): one small integer per object in the
/// cache's keys.
type ObjectSlot = u32;

/// Approximate heap bytes of one cached result (key, LRU node, frames).
fn entry_bytes(symbol: &Symbol) -> usize {
    const OVERHEAD: usize = 96;
    match symbol {
        Symbol::Known(frames) => {
            OVERHEAD
                + frames
                    .iter()
                    .map(|f| {
                        std::mem::size_of_val(f)
                            + f.function.capacity()
                            + f.system_name.capacity()
                            + f.file.as_ref().map_or(0, String::capacity)
                    })
                    .sum::<usize>()
        }
        Symbol::Unknown(_) => OVERHEAD + 32,
    }
}

/// Symbols by (object, address), bounded by `max_bytes`.
pub struct SymbolCache {
    slots: HashMap<(ObjectKey, Addressing), ObjectSlot>,
    /// Cached addresses per slot, to drop an object's entries at once.
    entries_per_slot: HashMap<ObjectSlot, u64>,
    next_slot: ObjectSlot,
    lru: LruCache<(ObjectSlot, u64), (Arc<Symbol>, u32)>,
    bytes: usize,
    max_bytes: usize,
}

impl fmt::Debug for SymbolCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SymbolCache")
            .field("entries", &self.lru.len())
            .field("bytes", &self.bytes)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl SymbolCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            slots: HashMap::new(),
            entries_per_slot: HashMap::new(),
            next_slot: 0,
            lru: LruCache::unbounded(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Objects (by key and addressing) with a slot.
    pub fn objects(&self) -> usize {
        self.slots.len()
    }

    /// The slot of an object, creating it.
    pub fn slot(&mut self, key: &ObjectKey, addressing: Addressing) -> ObjectSlot {
        if let Some(&slot) = self.slots.get(&(key.clone(), addressing)) {
            return slot;
        }
        let slot = self.next_slot;
        self.next_slot = self.next_slot.wrapping_add(1);
        self.slots.insert((key.clone(), addressing), slot);
        slot
    }

    pub fn get(&mut self, slot: ObjectSlot, addr: u64) -> Option<Arc<Symbol>> {
        self.lru.get(&(slot, addr)).map(|(s, _)| Arc::clone(s))
    }

    pub fn insert(&mut self, slot: ObjectSlot, addr: u64, symbol: Arc<Symbol>) {
        let size = entry_bytes(&symbol);
        if size > self.max_bytes {
            return;
        }
        let size32 = u32::try_from(size).unwrap_or(u32::MAX);
        if let Some((_, old)) = self.lru.put((slot, addr), (symbol, size32)) {
            self.bytes -= old as usize;
        } else {
            *self.entries_per_slot.entry(slot).or_default() += 1;
        }
        self.bytes += size;
        while self.bytes > self.max_bytes {
            let Some(((slot, _), (_, size))) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= size as usize;
            self.forget_one(slot);
        }
    }

    fn forget_one(&mut self, slot: ObjectSlot) {
        if let Some(n) = self.entries_per_slot.get_mut(&slot) {
            *n -= 1;
            if *n == 0 {
                self.entries_per_slot.remove(&slot);
            }
        }
    }

    /// Drops everything cached for `key` (no live process maps it any more).
    pub fn remove_object(&mut self, key: &ObjectKey) {
        let slots: Vec<ObjectSlot> = [Addressing::FileOffset, Addressing::Virtual]
            .iter()
            .filter_map(|&a| self.slots.remove(&(key.clone(), a)))
            .collect();
        for slot in slots {
            if self.entries_per_slot.remove(&slot).is_none() {
                continue;
            }
            // A scan, but only when an object goes away, and LRU entries are
            // small; objects come and go far less often than lookups.
            let doomed: Vec<(ObjectSlot, u64)> = self
                .lru
                .iter()
                .filter(|((s, _), _)| *s == slot)
                .map(|(k, _)| *k)
                .collect();
            for k in doomed {
                if let Some((_, size)) = self.lru.pop(&k) {
                    self.bytes -= size as usize;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Frame, Unknown};

    fn known(name: &str) -> Arc<Symbol> {
        Arc::new(Symbol::Known(vec![Frame {
            function: name.into(),
            system_name: name.into(),
            file: Some("a.c".into()),
            line: Some(1),
        }]))
    }

    #[test]
    fn same_build_id_shares_entries_and_bytes_stay_bounded() {
        let mut cache = SymbolCache::new(10_000);
        let libc = ObjectKey::BuildId(Arc::from(&[1u8, 2, 3][..]));
        let a = cache.slot(&libc, Addressing::FileOffset);
        assert_eq!(cache.slot(&libc.clone(), Addressing::FileOffset), a);
        assert_ne!(cache.slot(&libc, Addressing::Virtual), a);
        for addr in 0..1000 {
            cache.insert(a, addr, known(&format!("f{addr}")));
            assert!(cache.bytes() <= 10_000);
        }
        // The newest survive, the oldest went.
        assert!(cache.get(a, 999).is_some());
        assert!(cache.get(a, 0).is_none());
        assert!(cache.len() > 10 && cache.len() < 1000, "{}", cache.len());
    }

    #[test]
    fn removing_an_object_frees_its_entries_only() {
        let mut cache = SymbolCache::new(1 << 20);
        let one = ObjectKey::BuildId(Arc::from(&[1u8][..]));
        let two = ObjectKey::Kernel;
        let (s1, s2) = (
            cache.slot(&one, Addressing::FileOffset),
            cache.slot(&two, Addressing::Virtual),
        );
        cache.insert(s1, 1, known("a"));
        cache.insert(s1, 2, Arc::new(Symbol::Unknown(Unknown::NoSymbol)));
        cache.insert(s2, 1, known("b"));
        let bytes_two = entry_bytes(&known("b"));
        cache.remove_object(&one);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), bytes_two);
        assert!(cache.get(s2, 1).is_some());
        // A new slot for the same key starts empty.
        let s1 = cache.slot(&one, Addressing::FileOffset);
        assert!(cache.get(s1, 1).is_none());
    }
}
