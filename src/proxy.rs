//! The request path: `service.rs` orders the steps; `framing.rs` rejects ambiguous
//! requests; `route.rs` matches; `split.rs` picks the side; `forward.rs` rewrites
//! headers; `error.rs` is the one place errors become responses; `outcome.rs` records
//! each request's outcome when its response ends.

pub mod body;
pub mod error;
pub mod forward;
pub mod framing;
pub mod outcome;
pub mod route;
pub mod service;
pub mod split;
pub mod upgrade;

pub use body::ProxyBody;
pub use error::ProxyError;
pub use service::{ConnInfo, ProxyService};
