//! BPF hash maps as the rule maps use them: single and batched updates,
//! whole-map reads with `BPF_MAP_LOOKUP_BATCH`, and (for unit tests) an
//! in-memory stand-in with the same contract.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData, MapError},
};

use super::sys::{self, BatchAttr, batch_unsupported};

/// A hash map from `K` to `V`.
pub trait Table<K, V>: Send {
    fn get(&self, key: &K) -> Result<Option<V>, MapError>;
    fn insert(&mut self, key: &K, value: &V) -> Result<(), MapError>;
    /// `MapError::KeyNotFound` when `key` is absent.
    fn remove(&mut self, key: &K) -> Result<(), MapError>;
    /// Writes `keys[i] -> values[i]` in order, batched where the kernel
    /// can; returns how many were written (a prefix of `keys`) and the
    /// error that stopped it.
    fn insert_batch(&mut self, keys: &[K], values: &[V]) -> (usize, Option<io::Error>);
    /// As [`Table::insert_batch`], for keys known to be absent: a kernel
    /// map writes them on several threads ([`insert_new_batch`]).
    fn insert_new_batch(&mut self, keys: &[K], values: &[V]) -> (usize, Option<io::Error>) {
        self.insert_batch(keys, values)
    }
    /// Every entry.
    fn entries(&self) -> Result<Vec<(K, V)>, MapError>;
    fn capacity(&self) -> u32;
}

/// A kernel hash map.
pub struct KernelTable<K: Pod, V: Pod> {
    map: HashMap<MapData, K, V>,
}

impl<K: Pod, V: Pod> KernelTable<K, V> {
    pub fn new(map: HashMap<MapData, K, V>) -> Self {
        Self { map }
    }
}

/// `map_update_elem` errors as the `io::Error` the batch path reports.
fn io_of(error: MapError) -> io::Error {
    match error {
        MapError::SyscallError(e) => e.io_error,
        other => io::Error::other(other.to_string()),
    }
}

impl<K: Pod + Send + Sync, V: Pod + Send + Sync> Table<K, V> for KernelTable<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>, MapError> {
        match self.map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn insert(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.map.insert(key, value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        self.map.remove(key)
    }

    fn insert_batch(&mut self, keys: &[K], values: &[V]) -> (usize, Option<io::Error>) {
        let count = keys.len().min(values.len());
        let (done, error) = update_batch(self.map.map().fd().as_fd(), &keys[..count], values);
        match error {
            Some(e) if done == 0 && batch_unsupported(&e) => {
                tracing::debug!(error = %e, "no batch updates for this map; writing one by one");
                for (i, (key, value)) in keys.iter().zip(values).enumerate() {
                    if let Err(e) = self.map.insert(key, value, 0) {
                        return (i, Some(io_of(e)));
                    }
                }
                (count, None)
            }
            other => (done, other),
        }
    }

    fn insert_new_batch(&mut self, keys: &[K], values: &[V]) -> (usize, Option<io::Error>) {
        let count = keys.len().min(values.len());
        match insert_new_batch(self.map.map().fd().as_fd(), &keys[..count], values) {
            // One by one, as `insert_batch` falls back.
            (0, Some(e)) if batch_unsupported(&e) => self.insert_batch(keys, values),
            other => other,
        }
    }

    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        match lookup_all::<K, V>(self.map.map().fd().as_fd()) {
            Ok(entries) => Ok(entries),
            Err(e) if batch_unsupported(&e) => self.map.iter().collect(),
            Err(io_error) => Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error,
            })),
        }
    }

    fn capacity(&self) -> u32 {
        self.map.map().info().map(|i| i.max_entries()).unwrap_or(0)
    }
}

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6+). Returns how many elements were
/// written before the first failure, and that failure.
///
/// The kernel accepts no per-element flag but `BPF_F_LOCK` here (so no
/// `BPF_NOEXIST`), and on an early error (`EINVAL`, `ENOTSUPP`) it does not
/// write `count` back: those mean nothing was written.
pub fn update_batch<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    let count = keys.len().min(values.len());
    if count == 0 {
        return (0, None);
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `count` contiguous keys and values that
    // outlive the call; the kernel reads them and writes back `count`.
    match unsafe { sys::bpf(sys::BPF_MAP_UPDATE_BATCH, &mut attr) } {
        Ok(_) => (count, None),
        Err(error) => {
            let written = if batch_unsupported(&error) {
                0
            } else {
                attr.count as usize
            };
            (written.min(count), Some(error))
        }
    }
}

/// Elements per `BPF_MAP_UPDATE_BATCH` call of [`insert_new_batch`]: the
/// kernel copies each element in and out of its own buffer, so larger
/// calls only delay the check for a signal.
const CALL_BATCH: usize = 8192;

/// Elements below which [`insert_new_batch`] stays on one thread: a
/// thread costs tens of microseconds, a batch of this size milliseconds.
const PARALLEL_FROM: usize = 2 * CALL_BATCH;

/// Writes entries whose keys are absent from the map, with the result of
/// [`update_batch`], on up to four threads that each write a contiguous
/// part with `BPF_MAP_UPDATE_BATCH` calls. The kernel's hash maps lock per
/// bucket (`htab_lock_bucket` in kernel/bpf/hashtab.c) and allocate
/// elements from per-CPU caches, so the parts are written side by side:
/// on a million entries, the kernel's work is most of an import.
///
/// When a part stops early (a full map, say), the entries that later parts
/// wrote are deleted again with `BPF_MAP_DELETE_BATCH`, so that what stays
/// written is a prefix of `keys`, as on one thread; deleting them is right
/// because they were absent before. If that fails too, its error is the
/// one returned.
pub fn insert_new_batch<K: Copy + Sync, V: Copy + Sync>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    let count = keys.len().min(values.len());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(count / PARALLEL_FROM)
        .max(1);
    let write_part = |range: std::ops::Range<usize>| {
        let mut done = 0;
        for start in range.clone().step_by(CALL_BATCH) {
            let end = (start + CALL_BATCH).min(range.end);
            let (n, error) = update_batch(fd, &keys[start..end], &values[start..end]);
            done += n;
            if error.is_some() {
                return (done, error);
            }
        }
        (done, None)
    };
    if threads == 1 {
        return write_part(0..count);
    }
    let per = count.div_ceil(threads);
    let ranges: Vec<_> = (0..threads)
        .map(|i| i * per..((i + 1) * per).min(count))
        .collect();
    let results: Vec<(usize, Option<io::Error>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|range| {
                let range = range.clone();
                scope.spawn(move || write_part(range))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (0, Some(io::Error::other("a batch thread panicked"))))
            })
            .collect()
    });
    let mut written = 0;
    let mut stop = None;
    let mut taken_out = false;
    for (range, (done, error)) in ranges.iter().zip(results) {
        match &stop {
            None => {
                written += done;
                if error.is_some() {
                    stop = error;
                }
            }
            // Past the stop: take this part's entries out again.
            Some(_) if done > 0 => {
                let part = &keys[range.start..range.start + done];
                if let Err(e) = delete_batch(fd, part) {
                    tracing::warn!(error = %e, entries = done, "cannot remove entries written past a failed batch");
                    return (written, Some(e));
                }
                taken_out = true;
            }
            Some(_) => {}
        }
    }
    if taken_out {
        // What was taken out made room (a full map is the usual stop):
        // carry on in order, as one thread would have.
        let (more, error) = write_part(written..count);
        return (written + more, error);
    }
    (written, stop)
}

/// `BPF_MAP_DELETE_BATCH` of every key in `keys` (kernel 5.6+).
pub fn delete_batch<K: Copy>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for chunk in keys.chunks(CALL_BATCH) {
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` contiguous keys that outlive
        // the call; the kernel reads them and writes back `count`.
        unsafe { sys::bpf(sys::BPF_MAP_DELETE_BATCH, &mut attr) }?;
    }
    Ok(())
}

/// Reads every entry with `BPF_MAP_LOOKUP_BATCH`, `LOOKUP_CHUNK` at a time.
///
/// The kernel walks the map from an opaque position it writes to
/// `out_batch` and reads back from `in_batch` (a bucket index for hash
/// maps, a key for the generic walk of other maps; a buffer of the key's
/// size and at least 8 bytes holds either). It answers `ENOENT` once the
/// walk is over, possibly with a last few entries.
pub fn lookup_all<K: Copy, V: Copy>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    const LOOKUP_CHUNK: usize = 4096;
    let token_len = std::mem::size_of::<K>().max(8);
    let mut token_in = vec![0u8; token_len];
    let mut token_out = vec![0u8; token_len];
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(LOOKUP_CHUNK);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(LOOKUP_CHUNK);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the key and value buffers have room for `count` elements
        // and the tokens for either kind of position; all outlive the call.
        let done = match unsafe { sys::bpf(sys::BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let got = (attr.count as usize).min(LOOKUP_CHUNK);
        for i in 0..got {
            // SAFETY: the kernel wrote `count` keys and values.
            out.push(unsafe {
                (
                    keys.as_ptr().add(i).read().assume_init(),
                    values.as_ptr().add(i).read().assume_init(),
                )
            });
        }
        if done {
            return Ok(out);
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// An in-memory table with the kernel's errors: `E2BIG` when full (what
/// `htab_map_update_elem` answers), `KeyNotFound` on removing an absent key.
#[cfg(test)]
pub struct MemTable<K, V> {
    pub entries: std::collections::HashMap<K, V>,
    pub capacity: u32,
}

#[cfg(test)]
impl<K, V> MemTable<K, V> {
    pub fn new(capacity: u32) -> Self {
        Self {
            entries: std::collections::HashMap::new(),
            capacity,
        }
    }
}

#[cfg(test)]
impl<K, V> Table<K, V> for MemTable<K, V>
where
    K: Copy + Eq + std::hash::Hash + Send,
    V: Copy + Send,
{
    fn get(&self, key: &K) -> Result<Option<V>, MapError> {
        Ok(self.entries.get(key).copied())
    }

    fn insert(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        if !self.entries.contains_key(key) && self.entries.len() >= self.capacity as usize {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: io::Error::from_raw_os_error(libc::E2BIG),
            }));
        }
        self.entries.insert(*key, *value);
        Ok(())
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        self.entries
            .remove(key)
            .map(|_| ())
            .ok_or(MapError::KeyNotFound)
    }

    fn insert_batch(&mut self, keys: &[K], values: &[V]) -> (usize, Option<io::Error>) {
        for (i, (key, value)) in keys.iter().zip(values).enumerate() {
            if let Err(e) = self.insert(key, value) {
                return (i, Some(io_of(e)));
            }
        }
        (keys.len().min(values.len()), None)
    }

    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }
}
