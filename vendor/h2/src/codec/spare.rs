//! splitgate patch: per-thread spare buffers for the codec.
//!
//! Connections free their read and write buffers whenever they wait, so a connection
//! that waits between every request would otherwise go to the allocator for both on
//! every request. Freed buffers of the usual size are kept here instead, a few per
//! thread (a worker thread serves many connections), and taken back by the next
//! connection that has work.

use bytes::BytesMut;
use std::cell::RefCell;
use std::thread::LocalKey;

/// Spares kept per thread and per kind. A connection holds its buffers only from the
/// poll that finds work to the wait that ends it, so a thread rarely has more than one
/// or two out at once; 4 × 24 KiB at most stay allocated per thread.
const SPARES: usize = 4;

type Spares = RefCell<Vec<BytesMut>>;

thread_local! {
    static READ: Spares = const { RefCell::new(Vec::new()) };
    static WRITE: Spares = const { RefCell::new(Vec::new()) };
}

pub(crate) fn read_buffer(capacity: usize) -> BytesMut {
    take(&READ, capacity)
}

pub(crate) fn write_buffer(capacity: usize) -> BytesMut {
    take(&WRITE, capacity)
}

/// Returns an empty read buffer. One still shared with frames handed out (their bytes
/// are slices of it) cannot be reused and is only dropped.
pub(crate) fn give_read_buffer(buf: BytesMut, capacity: usize) {
    give(&READ, buf, capacity)
}

pub(crate) fn give_write_buffer(buf: BytesMut, capacity: usize) {
    give(&WRITE, buf, capacity)
}

fn take(spares: &'static LocalKey<Spares>, capacity: usize) -> BytesMut {
    spares
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(capacity))
}

fn give(spares: &'static LocalKey<Spares>, mut buf: BytesMut, capacity: usize) {
    buf.clear();
    // Only a buffer this connection alone holds, of the usual size (one grown for a
    // large frame goes back to the allocator).
    if !buf.try_reclaim(capacity) || buf.capacity() != capacity {
        return;
    }
    let _ = spares.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < SPARES {
            spares.push(buf);
        }
    });
}
