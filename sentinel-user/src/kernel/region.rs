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
//! The program reads these elements while the daemon writes them. Slots
//! are written with single aligned 32-bit stores (never torn); a rule's
//! fields are written one by one with aligned stores, its `in_use` flag
//! last when it is added and first when it is removed, with a release
//! fence between. Nothing here ever makes a Rust reference into the shared
//! memory: every access goes through raw pointers.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{MapData, MapError};

/// `BPF_F_MMAPABLE` from include/uapi/linux/bpf.h.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

fn mmap_error(io_error: io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call: "mmap",
        io_error,
    })
}

/// A flat array of `T` shared with the program (or, in unit tests, plain
/// heap memory standing in for it).
pub struct Region<T> {
    base: NonNull<T>,
    len: usize,
    backing: Backing,
}

enum Backing {
    /// A mapping of `bytes` bytes of an array map; unmapped on drop. The
    /// map's descriptor is kept with it.
    Mapped { bytes: usize, _map: MapData },
    /// Heap memory, zeroed, for tests of the index logic.
    #[cfg(test)]
    Heap(#[allow(dead_code)] Vec<u64>),
}

// SAFETY: the region owns its mapping (or buffer); all accesses are raw
// pointer reads and writes that the owner serialises (`&mut self` for
// writes through the index types that hold it).
unsafe impl<T: Send> Send for Region<T> {}

impl<T: Copy> Region<T> {
    /// Maps the whole of `map`, a `BPF_F_MMAPABLE` array, as `T`s.
    pub fn map(map: MapData) -> Result<Self, MapError> {
        let info = map.info()?;
        let value_size = info.value_size() as usize;
        let item = std::mem::size_of::<T>();
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(mmap_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the array was not created with BPF_F_MMAPABLE",
            )));
        }
        if item == 0 || !value_size.is_multiple_of(8) || !value_size.is_multiple_of(item) {
            return Err(mmap_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{value_size}-byte elements cannot be viewed as {item}-byte items"),
            )));
        }
        let bytes = value_size * info.max_entries() as usize;
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
            return Err(mmap_error(io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<T>())
            .ok_or_else(|| mmap_error(io::Error::other("mmap returned a null mapping")))?;
        Ok(Self {
            base,
            len: bytes / item,
            backing: Backing::Mapped { bytes, _map: map },
        })
    }

    /// `len` zeroed items on the heap.
    #[cfg(test)]
    pub fn heap(len: usize) -> Self {
        // u64 words: 8-byte alignment, what every item type here needs.
        let words = (len * std::mem::size_of::<T>()).div_ceil(8).max(1);
        let mut buffer = vec![0u64; words];
        let base = NonNull::new(buffer.as_mut_ptr().cast::<T>()).expect("vec pointer");
        Self {
            base,
            len,
            backing: Backing::Heap(buffer),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Pointer to item `index`. Indexes are bounds-checked: every index
    /// used comes from the index logic or from a map entry validated
    /// against `len` first, so a failure is a bug, not bad input.
    pub fn ptr(&self, index: usize) -> *mut T {
        assert!(
            index < self.len,
            "index {index} outside a region of {}",
            self.len
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.base.as_ptr().add(index) }
    }

    /// A copy of item `index`, read with a volatile load (the program may
    /// be updating it).
    pub fn read(&self, index: usize) -> T {
        // SAFETY: `ptr` is in bounds and aligned (the mapping is
        // page-aligned, items are laid out at multiples of their size).
        unsafe { std::ptr::read_volatile(self.ptr(index)) }
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
}

/// Slots compared at a time by [`Region::sync`].
const CHUNK: usize = 4096;

impl Region<u32> {
    /// Makes the slots equal to `want` (all zero when `None`), storing only
    /// those that differ; returns how many it stored. Chunks are compared
    /// with `memcmp` first, so a table that is already right costs one
    /// pass of it (tens of milliseconds for 64 MiB, even unoptimised).
    ///
    /// Only for regions the program never writes (direct tables,
    /// filters): the comparison reads a chunk as a plain slice.
    pub fn sync(&self, want: Option<&[u32]>) -> usize {
        static ZEROS: [u32; CHUNK] = [0; CHUNK];
        assert!(want.is_none_or(|w| w.len() == self.len));
        let mut stored = 0;
        let mut start = 0;
        while start < self.len {
            let end = (start + CHUNK).min(self.len);
            let target = match want {
                Some(w) => &w[start..end],
                None => &ZEROS[..end - start],
            };
            // SAFETY: in bounds; nothing writes the slots while this
            // short-lived slice exists (the program only reads them, and
            // the stores below come after it is dropped).
            let same = unsafe {
                std::slice::from_raw_parts(self.base.as_ptr().add(start), end - start) == target
            };
            if !same {
                for (offset, want) in target.iter().enumerate() {
                    if self.load(start + offset) != *want {
                        self.store(start + offset, *want);
                        stored += 1;
                    }
                }
            }
            start = end;
        }
        stored
    }
}

impl<T> Drop for Region<T> {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: unmapping the mapping made in `map`; no pointer into
            // it outlives the region.
            Backing::Mapped { bytes, .. } => unsafe {
                libc::munmap(self.base.as_ptr().cast(), bytes);
            },
            #[cfg(test)]
            Backing::Heap(_) => {}
        }
    }
}
