//! Array maps shared with the program through `mmap`.
//!
//! An array map created with `BPF_F_MMAPABLE` can be mapped into the
//! daemon's memory (`array_map_mmap` in kernel/bpf/arraymap.c): offset 0 is
//! the first element, and the pages are the very ones the program reads. A
//! store from userspace is then a store into the map, with no syscall, which
//! is what makes loading a large prefix list cheap. The kernel pads each
//! element to a multiple of 8 bytes; the maps used here have element sizes
//! that are already multiples of 8, so the mapping is one flat array.
//!
//! The kernel inserts every page of such a mapping when it is made
//! (`remap_vmalloc_range`), so a mapped array counts whole in the daemon's
//! resident memory, although the memory is the kernel's and allocated when
//! the map was created. A region is therefore mapped only while its index
//! needs it ([`Region::ensure_mapped`], [`Region::unmap`]): an empty index
//! maps nothing, and reads it with [`Region::scan`], which goes through
//! `BPF_MAP_LOOKUP_BATCH` when the region is not mapped.
//!
//! The program reads these elements while the daemon writes them. Slots
//! are written with single aligned 32-bit stores (never torn); a rule's
//! fields are written one by one with aligned stores, its `in_use` flag
//! last when it is added and first when it is removed, with a release
//! fence between. Nothing here ever makes a Rust reference into the shared
//! memory: every access goes through raw pointers.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{MapData, MapError};

use super::sys::{self, BatchAttr};

/// `BPF_F_MMAPABLE` from include/uapi/linux/bpf.h.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

fn syscall_error(call: &'static str, io_error: io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

/// A flat array of `T` shared with the program (or, in unit tests, plain
/// heap memory standing in for it).
pub struct Region<T> {
    /// Set while mapped (always, for heap memory).
    base: Option<NonNull<T>>,
    len: usize,
    backing: Backing,
}

enum Backing {
    /// An array map of `entries` elements of `value_size` bytes.
    Map {
        map: MapData,
        value_size: usize,
        entries: u32,
    },
    /// Heap memory, zeroed, for tests of the index logic. It is "mapped"
    /// and "unmapped" like an array map, so that the tests hold the index
    /// to the same discipline.
    #[cfg(test)]
    Heap(Vec<u64>),
}

// SAFETY: the region owns its mapping (or buffer); all accesses are raw
// pointer reads and writes that the owner serialises (`&mut self` for
// writes through the index types that hold it).
unsafe impl<T: Send> Send for Region<T> {}

impl<T: Copy> Region<T> {
    /// A view of `map`, a `BPF_F_MMAPABLE` array, as `T`s; not mapped yet.
    pub fn new(map: MapData) -> Result<Self, MapError> {
        let info = map.info()?;
        let value_size = info.value_size() as usize;
        let item = std::mem::size_of::<T>();
        let invalid = |detail: String| {
            syscall_error("mmap", io::Error::new(io::ErrorKind::InvalidInput, detail))
        };
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(invalid(
                "the array was not created with BPF_F_MMAPABLE".to_owned(),
            ));
        }
        if item == 0 || !value_size.is_multiple_of(8) || !value_size.is_multiple_of(item) {
            return Err(invalid(format!(
                "{value_size}-byte elements cannot be viewed as {item}-byte items"
            )));
        }
        let entries = info.max_entries();
        Ok(Self {
            base: None,
            len: value_size * entries as usize / item,
            backing: Backing::Map {
                map,
                value_size,
                entries,
            },
        })
    }

    /// `len` zeroed items on the heap, not "mapped" yet.
    #[cfg(test)]
    pub fn heap(len: usize) -> Self {
        // u64 words: 8-byte alignment, what every item type here needs.
        let words = (len * std::mem::size_of::<T>()).div_ceil(8).max(1);
        Self {
            base: None,
            len,
            backing: Backing::Heap(vec![0u64; words]),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_mapped(&self) -> bool {
        self.base.is_some()
    }

    /// Maps the whole array, if it is not mapped yet.
    pub fn ensure_mapped(&mut self) -> Result<(), MapError> {
        let (map, value_size, entries) = match &self.backing {
            Backing::Map {
                map,
                value_size,
                entries,
            } => (map, value_size, entries),
            #[cfg(test)]
            Backing::Heap(buffer) => {
                self.base = NonNull::new(buffer.as_ptr().cast::<T>().cast_mut());
                return Ok(());
            }
        };
        if self.base.is_some() {
            return Ok(());
        }
        let bytes = value_size * *entries as usize;
        // SAFETY: a fresh shared mapping of the map's descriptor; the kernel
        // checks the length against the array's size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(syscall_error("mmap", io::Error::last_os_error()));
        }
        self.base = NonNull::new(ptr.cast::<T>());
        if self.base.is_none() {
            return Err(syscall_error(
                "mmap",
                io::Error::other("mmap returned a null mapping"),
            ));
        }
        Ok(())
    }

    /// Unmaps the array (the map and its contents stay).
    pub fn unmap(&mut self) {
        let Some(base) = self.base.take() else {
            return;
        };
        match &self.backing {
            Backing::Map {
                value_size,
                entries,
                ..
            } => {
                // SAFETY: unmapping the mapping made in `ensure_mapped`; no
                // pointer into it outlives this call (accessors need `base`).
                unsafe { libc::munmap(base.as_ptr().cast(), value_size * *entries as usize) };
            }
            #[cfg(test)]
            Backing::Heap(_) => {}
        }
    }

    /// Pointer to item `index` of the mapping. Indexes are bounds-checked,
    /// and the region must be mapped: every index used comes from the index
    /// logic or from a map entry validated against `len`, and the indexes
    /// map their regions before touching them, so a failure is a bug, not
    /// bad input.
    pub fn ptr(&self, index: usize) -> *mut T {
        assert!(
            index < self.len,
            "index {index} outside a region of {}",
            self.len
        );
        let Some(base) = self.base else {
            panic!("a prefix index touched an array it had not mapped");
        };
        // SAFETY: in bounds, checked above.
        unsafe { base.as_ptr().add(index) }
    }

    /// A copy of item `index`, read with a volatile load (the program may
    /// be updating it).
    pub fn read(&self, index: usize) -> T {
        // SAFETY: `ptr` is in bounds and aligned (the mapping is
        // page-aligned, items are laid out at multiples of their size).
        unsafe { std::ptr::read_volatile(self.ptr(index)) }
    }

    /// Calls `f(first, items)` for the items from 0 on, a few thousand at a
    /// time, until it returns `false` or the items run out: from the
    /// mapping when mapped, otherwise through `BPF_MAP_LOOKUP_BATCH`, so
    /// that reading an array does not map it.
    pub fn scan(&self, mut f: impl FnMut(usize, &[T]) -> bool) -> Result<(), MapError> {
        const ITEMS: usize = 16 * 1024;
        if self.base.is_some() {
            let mut chunk = Vec::with_capacity(ITEMS);
            let mut first = 0;
            while first < self.len {
                let end = (first + ITEMS).min(self.len);
                chunk.clear();
                chunk.extend((first..end).map(|i| self.read(i)));
                if !f(first, &chunk) {
                    return Ok(());
                }
                first = end;
            }
            return Ok(());
        }
        let (map, value_size) = match &self.backing {
            Backing::Map {
                map, value_size, ..
            } => (map, value_size),
            // Heap memory "not mapped": read it as it is.
            #[cfg(test)]
            Backing::Heap(buffer) => {
                // SAFETY: the buffer holds `len` items (see `heap`).
                let items =
                    unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<T>(), self.len) };
                for (n, chunk) in items.chunks(ITEMS).enumerate() {
                    if !f(n * ITEMS, chunk) {
                        break;
                    }
                }
                return Ok(());
            }
        };
        let per_element = value_size / std::mem::size_of::<T>();
        let elements = (ITEMS / per_element).max(1);
        // The kernel copies the values straight into a buffer of `T`s: the
        // elements are `value_size` bytes each, a whole number of items.
        let mut items: Vec<MaybeUninit<T>> = Vec::with_capacity(elements * per_element);
        array_batches(
            map.fd().as_fd(),
            elements,
            items.as_mut_ptr().cast::<u8>(),
            |first_element, got| {
                // SAFETY: the kernel wrote `got` whole elements, that is
                // `got * per_element` items of plain data, to the buffer.
                let read = unsafe {
                    std::slice::from_raw_parts(items.as_ptr().cast::<T>(), got * per_element)
                };
                f(first_element * per_element, read)
            },
        )
        .map_err(|e| syscall_error("bpf_map_lookup_batch", e))
    }
}

impl Region<u32> {
    /// Slot `index`, loaded atomically.
    pub fn load(&self, index: usize) -> u32 {
        // SAFETY: in bounds and 4-byte aligned; `AtomicU32` has `u32`'s
        // layout, and the memory is only ever accessed atomically or by the
        // program's aligned 32-bit loads.
        unsafe { (*self.ptr(index).cast::<AtomicU32>()).load(Ordering::Relaxed) }
    }

    /// Stores slot `index` with release ordering: whatever it points to was
    /// written before.
    pub fn store(&self, index: usize, value: u32) {
        // SAFETY: as in `load`.
        unsafe { (*self.ptr(index).cast::<AtomicU32>()).store(value, Ordering::Release) }
    }

    /// Makes the slots equal to `want` (all zero when `None`), storing only
    /// those that differ; returns how many it stored. The comparison reads
    /// the array with [`Region::scan`], so an array that is already right
    /// is not mapped for it; it is mapped to store differences, and left as
    /// it was found.
    pub fn sync(&mut self, want: Option<&[u32]>) -> Result<usize, MapError> {
        static ZEROS: [u32; 16 * 1024] = [0; 16 * 1024];
        assert!(want.is_none_or(|w| w.len() == self.len));
        let mut differ: Vec<(usize, u32)> = Vec::new();
        let mut compare = |first: usize, have: &[u32]| {
            let target = match want {
                Some(w) => &w[first..first + have.len()],
                None => &ZEROS[..have.len()],
            };
            // `memcmp` first: nearly every chunk is already right.
            if have != target {
                for (offset, (slot, want)) in have.iter().zip(target).enumerate() {
                    if slot != want {
                        differ.push((first + offset, *want));
                    }
                }
            }
        };
        match self.base {
            // SAFETY (both): in bounds; the program never writes the slots
            // of a direct table or filter, and nothing here does while the
            // short-lived slice exists.
            Some(base) => {
                let mut first = 0;
                while first < self.len {
                    let end = (first + ZEROS.len()).min(self.len);
                    let have = unsafe {
                        std::slice::from_raw_parts(base.as_ptr().add(first), end - first)
                    };
                    compare(first, have);
                    first = end;
                }
            }
            None => self.scan(|first, have| {
                compare(first, have);
                true
            })?,
        }
        if differ.is_empty() {
            return Ok(0);
        }
        let was_mapped = self.is_mapped();
        self.ensure_mapped()?;
        for (slot, value) in &differ {
            self.store(*slot, *value);
        }
        if !was_mapped {
            self.unmap();
        }
        Ok(differ.len())
    }
}

impl<T> Drop for Region<T> {
    fn drop(&mut self) {
        if let (
            Backing::Map {
                value_size,
                entries,
                ..
            },
            Some(base),
        ) = (&self.backing, self.base)
        {
            // SAFETY: unmapping the mapping made in `ensure_mapped`; no
            // pointer into it outlives the region.
            unsafe { libc::munmap(base.as_ptr().cast(), value_size * *entries as usize) };
        }
    }
}

/// Reads an array map with `BPF_MAP_LOOKUP_BATCH`, `elements` at a time
/// into `values`, calling `f` after each batch until it returns `false` or
/// the array ends.
///
/// The kernel's generic batch walk (`generic_map_lookup_batch`) continues
/// after the key given in `in_batch` (from the start without one) and
/// writes the last key it read to `out_batch`; for an array the keys are
/// the indexes, in order. `ENOENT` ends the walk.
///
/// `values` must have room for `elements` values; `f` gets the index of
/// the first element and how many were written there.
fn array_batches(
    fd: std::os::fd::BorrowedFd<'_>,
    elements: usize,
    values: *mut u8,
    mut f: impl FnMut(usize, usize) -> bool,
) -> io::Result<()> {
    let mut keys: Vec<MaybeUninit<u32>> = Vec::with_capacity(elements);
    let mut token_in = 0u32;
    let mut token_out = 0u32;
    let mut first = true;
    let mut next = 0usize;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw mut token_in) as u64 },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values as u64,
            count: elements as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the key and value buffers have room for `count` elements
        // (the caller's promise for `values`) and the tokens hold a 4-byte
        // key; all outlive the call.
        let done = match unsafe { sys::bpf(sys::BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let got = (attr.count as usize).min(elements);
        if got > 0 && !f(next, got) {
            return Ok(());
        }
        next += got;
        if done || got == 0 {
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}
