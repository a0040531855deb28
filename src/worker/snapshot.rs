//! Each worker's cached copy of the current snapshot. Requests clone a per-worker
//! `Arc` (its count on a cache line only that worker writes) instead of loading the
//! shared one (whose count every worker would write on every request); a change the
//! writer publishes bumps `Shared.generation`, which the next request on every worker
//! sees.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::state::{Shared, Snapshot};

thread_local! {
    /// This thread's copy of the current snapshot: the `Shared` it came from (by id),
    /// its generation, the copy.
    static SNAPSHOT: RefCell<Option<(u64, u64, Arc<Local>)>> = const { RefCell::new(None) };
}

/// A worker's own handle on a snapshot. Requests clone this `Arc`, whose count lives
/// on a cache line only its worker writes, instead of the shared snapshot's (which
/// every worker would otherwise write on every request).
pub struct Local(Arc<Snapshot>);

impl std::ops::Deref for Local {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

/// How often an idle worker lets go of a snapshot the writer has replaced (and with
/// it the old upstream pools and their idle connections).
pub const SNAPSHOT_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Drops this thread's cached snapshot if the writer has published a newer one.
pub fn sweep(shared: &Shared) {
    let generation = shared.generation.load(Ordering::Acquire);
    SNAPSHOT.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached
            .as_ref()
            .is_some_and(|(owner, seen, _)| *owner == shared.id && *seen != generation)
        {
            *cached = None;
        }
    });
}

/// The current snapshot for a request on this thread: the cached copy while the
/// writer's generation has not moved, else a fresh load. A change the writer has
/// published is seen by the next request on every worker.
pub fn snapshot(shared: &Arc<Shared>) -> Arc<Local> {
    let key = shared.id;
    let generation = shared.generation.load(Ordering::Acquire);
    SNAPSHOT.with(|cell| {
        let mut cached = cell.borrow_mut();
        match cached.as_ref() {
            Some((owner, seen, local)) if *owner == key && *seen == generation => local.clone(),
            _ => {
                let local = Arc::new(Local(shared.snapshot.load_full()));
                *cached = Some((key, generation, local.clone()));
                local
            }
        }
    })
}
