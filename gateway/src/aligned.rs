//! Heap buffers aligned for `O_DIRECT` I/O.
//!
//! `O_DIRECT` wants the buffer address, the length and the file offset all aligned to the
//! device's logical block size; [`AlignedBuf`] owns such a buffer and is `Send`, so it can cross
//! from a gRPC task to an I/O thread and back without copies.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment used for every buffer and every device offset (a multiple of any logical block size
/// we support: 512 and 4096).
pub const ALIGN: usize = 4096;

/// Rounds `n` up to the next multiple of [`ALIGN`].
pub const fn align_up(n: u64) -> u64 {
    (n + ALIGN as u64 - 1) & !(ALIGN as u64 - 1)
}

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Allocated bytes; `len <= cap`. Buffers of [`POOLED_CAPACITY`] go back to the pool.
    cap: usize,
}

/// Capacity of pooled buffers: the largest record (4 MiB of data plus header, key and padding).
pub const POOLED_CAPACITY: usize = (shared::BLOCK_SIZE as usize) + 2 * ALIGN;
/// Buffers kept for reuse; beyond that they are freed. 64 x 4 MiB = 256 MiB at most.
const POOL_LIMIT: usize = 64;
/// Requests at least this large are served from the pool.
const POOL_MIN: usize = 256 * 1024;

/// Large record buffers are reused: a fresh 4 MiB allocation costs an mmap, a page fault per
/// 4 KiB page and an munmap, which at device speed is a large share of the write path's CPU.
static POOL: std::sync::Mutex<Vec<SendPtr>> = std::sync::Mutex::new(Vec::new());

struct SendPtr(NonNull<u8>);
// SAFETY: the pool owns the allocations it holds; nobody else has a pointer to them.
unsafe impl Send for SendPtr {}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes, which must be a non-zero multiple of [`ALIGN`].
    pub fn zeroed(len: usize) -> Self {
        assert!(
            len > 0 && len.is_multiple_of(ALIGN),
            "aligned buffer length {len} must be a positive multiple of {ALIGN}"
        );
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap: len }
    }

    /// A buffer of `len` bytes (a positive multiple of [`ALIGN`]) whose content is unspecified:
    /// for data about to be overwritten whole (device reads, records being filled). Large ones
    /// come from a pool.
    pub fn uninit(len: usize) -> Self {
        assert!(
            len > 0 && len.is_multiple_of(ALIGN),
            "aligned buffer length {len} must be a positive multiple of {ALIGN}"
        );
        if !(POOL_MIN..=POOLED_CAPACITY).contains(&len) {
            return Self::zeroed(len);
        }
        let reused = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(SendPtr(ptr)) => AlignedBuf {
                ptr,
                len,
                cap: POOLED_CAPACITY,
            },
            None => {
                let mut buf = Self::zeroed(POOLED_CAPACITY);
                buf.len = len;
                buf
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == POOLED_CAPACITY {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_LIMIT {
                pool.push(SendPtr(self.ptr));
                return;
            }
        }
        // SAFETY: allocated in `zeroed` with exactly this size and alignment.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

// SAFETY: the pointer is stable for the buffer's lifetime and all `len` bytes are initialised.
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
    fn bytes_total(&self) -> usize {
        self.len
    }
}

// SAFETY: as above; every byte is always initialised (zeroed at allocation).
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    unsafe fn set_init(&mut self, _pos: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_reused_with_the_requested_length() {
        let first = AlignedBuf::uninit(4 << 20);
        let ptr = first.as_ptr();
        assert_eq!(first.len(), 4 << 20);
        drop(first);
        let second = AlignedBuf::uninit(1 << 20);
        assert_eq!(second.len(), 1 << 20);
        assert_eq!(second.as_ptr() as usize % ALIGN, 0);
        // Another test may race for the pool; when it does not, the allocation is reused.
        let _maybe_reused = second.as_ptr() == ptr;
        assert_eq!(AlignedBuf::uninit(ALIGN).len(), ALIGN);
    }

    #[test]
    fn is_aligned_and_zeroed() {
        let buf = AlignedBuf::zeroed(3 * ALIGN);
        assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
        assert_eq!(align_up(0), 0);
    }
}
