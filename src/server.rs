//! Listeners: accept with a connection cap, per-connection hyper setup with limits, the
//! idle timeout, and graceful drain.

pub mod activity;
pub mod connection;
pub mod head_scan;
pub mod listener;
pub mod rewind;
pub mod tls;

pub use listener::serve;

/// Resolves once the shutdown flag is true (at once if it already is).
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stopping| stopping).await;
}
