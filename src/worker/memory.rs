//! Giving freed memory back to the system while a worker is quiet. mimalloc returns a
//! thread's free pages to the system only when that thread allocates or frees again;
//! a worker whose connections all went idle (their buffers released, see
//! `server::connection`) would keep the pages of the burst that preceded, so its RSS
//! stays at the peak. HAProxy trims its pools for the same reason.

/// Makes mimalloc return this thread's free pages now (forced: cheap when there is
/// nothing to give back, a few µs otherwise; every 5 s). Without mimalloc, nothing. The crate's only `unsafe`: an FFI
/// call with no arguments (`unsafe_code` is denied everywhere else).
#[allow(unsafe_code)]
pub fn give_back_free_pages() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any
    // time; it only walks and trims the calling thread's own heap.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}
