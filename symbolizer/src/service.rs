//! The symbolizer on its own thread: blazesym's `Symbolizer` is not `Send`,
//! so one thread owns it (and the result cache) and serves batched requests
//! from a bounded queue. Objects are leased: while any [`Lease`] of an object
//! lives, its symbols stay cached; when the last one drops (no live process
//! maps the file any more), its results and blazesym's parsed data go.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, SyncSender},
    },
};

use crate::{
    Symbol, Symbolizer, SymbolizerConfig,
    cache::{Addressing, ObjectKey, SymbolCache},
};

/// Requests waiting for the symbolizer thread before senders block.
const QUEUE: usize = 16;

/// Addresses of one object to symbolize.
#[derive(Clone, Debug)]
pub struct ObjectRequest {
    /// What the object is (cache key).
    pub key: ObjectKey,
    /// Where to read it (an open descriptor's `/proc/self/fd/N` path works,
    /// and keeps working after the file was deleted or its process exited).
    pub path: PathBuf,
    pub addressing: Addressing,
    pub addrs: Vec<u64>,
}

/// One batch: kernel addresses and addresses of any number of objects.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub kernel: Vec<u64>,
    pub objects: Vec<ObjectRequest>,
}

/// Results in request order: one symbol per address.
#[derive(Clone, Debug, Default)]
pub struct Response {
    pub kernel: Vec<Arc<Symbol>>,
    pub objects: Vec<Vec<Arc<Symbol>>>,
}

/// What the symbolizer did, for the agent's self-metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Addresses answered from the result cache.
    pub hits: u64,
    /// Addresses symbolized (cache misses).
    pub misses: u64,
    /// Unresolved addresses among the misses, by reason
    /// ([`crate::Unknown::label`]).
    pub unknown: BTreeMap<&'static str, u64>,
    pub cache_entries: u64,
    pub cache_bytes: u64,
    /// Objects (by key and addressing) the cache keeps a slot for.
    pub cache_objects: u64,
    /// Objects some live lease holds.
    pub objects_live: u64,
    /// Objects whose data was dropped after their last lease went.
    pub objects_evicted: u64,
    pub requests: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("starting the symbolizer thread: {0}")]
    Spawn(std::io::Error),
    #[error("the symbolizer thread is gone")]
    Gone,
}

enum Message {
    Symbolize(Request, SyncSender<Response>),
    Lease(ObjectKey),
    Release(ObjectKey),
}

/// Keeps an object's symbols cached while held; see the module docs.
#[derive(Debug)]
pub struct Lease {
    key: ObjectKey,
    tx: SyncSender<Message>,
}

impl Lease {
    pub fn key(&self) -> &ObjectKey {
        &self.key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // If the thread is gone there is nothing left to release.
        let _ = self.tx.send(Message::Release(self.key.clone()));
    }
}

/// Handle of the symbolizer thread. Cheap to clone; `Send`.
#[derive(Clone, Debug)]
pub struct SymbolizerService {
    tx: SyncSender<Message>,
    stats: Arc<Mutex<ServiceStats>>,
}

impl SymbolizerService {
    /// Starts the thread; `config.cache_bytes` bounds the result cache.
    pub fn spawn(config: SymbolizerConfig) -> Result<Self, ServiceError> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let stats = Arc::new(Mutex::new(ServiceStats::default()));
        let shared = Arc::clone(&stats);
        // The thread ends when the last handle and lease are gone.
        std::thread::Builder::new()
            .name("fathom-symbolizer".into())
            .spawn(move || Worker::new(&config, shared).run(rx))
            .map_err(ServiceError::Spawn)?;
        Ok(Self { tx, stats })
    }

    /// Symbolizes one batch, waiting for the answer.
    pub fn symbolize(&self, request: Request) -> Result<Response, ServiceError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .send(Message::Symbolize(request, reply))
            .map_err(|_| ServiceError::Gone)?;
        answer.recv().map_err(|_| ServiceError::Gone)
    }

    /// Takes a lease on an object (see [`Lease`]).
    pub fn lease(&self, key: ObjectKey) -> Lease {
        let _ = self.tx.send(Message::Lease(key.clone()));
        Lease {
            key,
            tx: self.tx.clone(),
        }
    }

    pub fn stats(&self) -> ServiceStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Worker {
    symbolizer: Symbolizer,
    cache: SymbolCache,
    /// Live leases per object, and the paths blazesym read it from.
    objects: HashMap<ObjectKey, (u64, Vec<PathBuf>)>,
    stats: ServiceStats,
    shared: Arc<Mutex<ServiceStats>>,
}

impl Worker {
    fn new(config: &SymbolizerConfig, shared: Arc<Mutex<ServiceStats>>) -> Self {
        Self {
            symbolizer: Symbolizer::new(config),
            cache: SymbolCache::new(config.cache_bytes),
            objects: HashMap::new(),
            stats: ServiceStats::default(),
            shared,
        }
    }

    fn run(mut self, rx: Receiver<Message>) {
        while let Ok(message) = rx.recv() {
            match message {
                Message::Symbolize(request, reply) => {
                    let response = self.serve(request);
                    // Stats first: a requester reading them after its answer
                    // sees its own request counted.
                    self.publish();
                    // The requester may have given up; nothing to do then.
                    let _ = reply.send(response);
                    continue;
                }
                Message::Lease(key) => self.objects.entry(key).or_default().0 += 1,
                Message::Release(key) => self.release(key),
            }
            self.publish();
        }
    }

    fn release(&mut self, key: ObjectKey) {
        let Some(entry) = self.objects.get_mut(&key) else {
            return;
        };
        entry.0 = entry.0.saturating_sub(1);
        if entry.0 > 0 {
            return;
        }
        let (_, paths) = self.objects.remove(&key).unwrap_or_default();
        self.cache.remove_object(&key);
        for path in paths {
            self.symbolizer.evict_elf(&path);
        }
        self.stats.objects_evicted += 1;
    }

    fn serve(&mut self, request: Request) -> Response {
        self.stats.requests += 1;
        let kernel = self.lookup(
            &ObjectKey::Kernel,
            Addressing::Virtual,
            &request.kernel,
            |s, a| s.kernel(a),
        );
        let mut objects = Vec::with_capacity(request.objects.len());
        for object in &request.objects {
            if let Some((_, paths)) = self.objects.get_mut(&object.key)
                && !paths.contains(&object.path)
            {
                paths.push(object.path.clone());
            }
            let path = object.path.clone();
            objects.push(match object.addressing {
                Addressing::FileOffset => {
                    self.lookup(&object.key, object.addressing, &object.addrs, |s, a| {
                        s.elf_file_offsets(&path, a)
                    })
                }
                Addressing::Virtual => {
                    self.lookup(&object.key, object.addressing, &object.addrs, |s, a| {
                        s.elf_virtual_addresses(&path, a)
                    })
                }
            });
        }
        Response { kernel, objects }
    }

    /// Cached results, symbolizing the misses in one call.
    fn lookup(
        &mut self,
        key: &ObjectKey,
        addressing: Addressing,
        addrs: &[u64],
        symbolize: impl FnOnce(&Symbolizer, &[u64]) -> Vec<Symbol>,
    ) -> Vec<Arc<Symbol>> {
        if addrs.is_empty() {
            return Vec::new();
        }
        // Only leased objects (and the kernel) are cached: nobody would tell
        // us when an unleased one goes away.
        let slot = (*key == ObjectKey::Kernel || self.objects.contains_key(key))
            .then(|| self.cache.slot(key, addressing));
        let mut out: Vec<Option<Arc<Symbol>>> = match slot {
            Some(slot) => addrs.iter().map(|&a| self.cache.get(slot, a)).collect(),
            None => vec![None; addrs.len()],
        };
        let mut missing: Vec<u64> = addrs
            .iter()
            .zip(&out)
            .filter(|(_, s)| s.is_none())
            .map(|(&a, _)| a)
            .collect();
        self.stats.hits += (addrs.len() - missing.len()) as u64;
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            self.stats.misses += missing.len() as u64;
            let symbols = symbolize(&self.symbolizer, &missing);
            let mut fresh: HashMap<u64, Arc<Symbol>> = HashMap::with_capacity(missing.len());
            for (addr, symbol) in missing.iter().zip(symbols) {
                if let Symbol::Unknown(why) = &symbol {
                    *self.stats.unknown.entry(why.label()).or_default() += 1;
                }
                let symbol = Arc::new(symbol);
                if let Some(slot) = slot {
                    self.cache.insert(slot, *addr, Arc::clone(&symbol));
                }
                fresh.insert(*addr, symbol);
            }
            for (slot_out, addr) in out.iter_mut().zip(addrs) {
                if slot_out.is_none() {
                    *slot_out = fresh.get(addr).cloned();
                }
            }
        }
        out.into_iter()
            .map(|s| s.unwrap_or_else(|| Arc::new(Symbol::Unknown(crate::Unknown::NoSymbol))))
            .collect()
    }

    fn publish(&mut self) {
        self.stats.cache_entries = self.cache.len() as u64;
        self.stats.cache_bytes = self.cache.bytes() as u64;
        self.stats.cache_objects = self.cache.objects() as u64;
        self.stats.objects_live = self.objects.len() as u64;
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = self.stats.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::nm_address;

    #[test]
    fn caches_leased_objects_by_key_and_evicts_on_last_release() {
        let exe = std::env::current_exe().unwrap();
        let layout = crate::elf::ElfLayout::read(&std::fs::File::open(&exe).unwrap()).unwrap();
        let key = ObjectKey::of_file(
            layout.build_id.as_deref(),
            &std::fs::metadata(&exe).unwrap(),
        );
        let service = SymbolizerService::spawn(SymbolizerConfig::default()).unwrap();
        let addr = nm_address("caches_leased_objects_by_key_and_evicts_on_last_release");
        let request = |path: PathBuf| Request {
            kernel: Vec::new(),
            objects: vec![ObjectRequest {
                key: key.clone(),
                path,
                addressing: Addressing::Virtual,
                addrs: vec![addr, addr, u64::MAX - 1],
            }],
        };
        let lease = service.lease(key.clone());
        let second = service.lease(key.clone());
        let first = service.symbolize(request(exe.clone())).unwrap();
        let symbols = &first.objects[0];
        assert_eq!(symbols.len(), 3);
        let Symbol::Known(frames) = &*symbols[0] else {
            panic!("{symbols:?}");
        };
        assert!(
            frames
                .last()
                .unwrap()
                .function
                .ends_with("caches_leased_objects_by_key_and_evicts_on_last_release")
        );
        assert_eq!(symbols[0], symbols[1]);
        assert!(matches!(&*symbols[2], Symbol::Unknown(_)));
        let stats = service.stats();
        assert_eq!((stats.hits, stats.misses), (0, 2));
        assert_eq!(stats.unknown.values().sum::<u64>(), 1);

        // Same contents under another path: answered from the cache.
        let copy = tempfile::tempdir().unwrap();
        let other = copy.path().join("same-binary");
        std::fs::copy(&exe, &other).unwrap();
        let again = service.symbolize(request(other)).unwrap();
        assert_eq!(again.objects[0], first.objects[0]);
        let stats = service.stats();
        assert_eq!((stats.hits, stats.misses), (3, 2));
        assert_eq!(stats.cache_entries, 2);
        assert_eq!(stats.objects_live, 1);
        assert_eq!(stats.cache_objects, 1);

        // One lease left: still cached. None: gone.
        drop(lease);
        service.symbolize(Request::default()).unwrap();
        assert_eq!(service.stats().cache_entries, 2);
        drop(second);
        service.symbolize(Request::default()).unwrap();
        let stats = service.stats();
        assert_eq!((stats.cache_entries, stats.objects_live), (0, 0));
        assert_eq!(stats.objects_evicted, 1);
        assert_eq!(stats.cache_bytes, 0);
        assert_eq!(stats.cache_objects, 0);
    }

    #[test]
    fn unleased_objects_are_symbolized_but_not_cached() {
        let service = SymbolizerService::spawn(SymbolizerConfig::default()).unwrap();
        let request = Request {
            kernel: Vec::new(),
            objects: vec![ObjectRequest {
                key: ObjectKey::BuildId(Arc::from(&[9u8; 20][..])),
                path: PathBuf::from("/nonexistent"),
                addressing: Addressing::FileOffset,
                addrs: vec![1, 2],
            }],
        };
        let response = service.symbolize(request.clone()).unwrap();
        assert!(
            response.objects[0]
                .iter()
                .all(|s| matches!(&**s, Symbol::Unknown(crate::Unknown::Unreadable(_))))
        );
        service.symbolize(request).unwrap();
        let stats = service.stats();
        assert_eq!((stats.hits, stats.misses, stats.cache_entries), (0, 4, 0));
        assert_eq!(
            stats.cache_objects, 0,
            "no slot kept for an unleased object"
        );
        assert_eq!(stats.unknown.get("unreadable"), Some(&4));
    }
}
