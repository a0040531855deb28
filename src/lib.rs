//! splitgate: a traffic-splitting reverse proxy for progressive delivery.
//!
//! # Layout
//!
//! Data plane: `worker` runs N threads, each a current-thread runtime with its own
//! listening sockets (`worker::sockets`, `SO_REUSEPORT`), its own upstream pools and
//! its own cached copy of the snapshot (`worker::snapshot`), optionally pinned to a
//! CPU (`worker::pin`). A request arrives on
//! a worker's listener (`server`), which runs hyper with the configured limits and
//! drains on shutdown. The proxy service (`proxy::service`) loads the current
//! [`state::Snapshot`] once, so the whole request sees one generation; checks framing
//! (`proxy::framing`); matches a route (`proxy::route`); decides stable or canary by a
//! keyed hash of the user's key (`proxy::split`); rewrites headers (`proxy::forward`);
//! and forwards through a pooled upstream connection (`upstream`: HTTP/1.1 on a codec of
//! its own in `upstream::h1`, HTTP/2 in `upstream::h2`), streaming both bodies.
//! It records metrics (`telemetry`) and the SLO evidence (`slo`), each in the worker's
//! own shard, and logs the access line.
//!
//! Control plane, on the runtime that started it all: everything that changes at
//! runtime (weights, trips, rollouts, reloaded config) is changed by one task, the
//! state writer (`state`), which persists it before swapping in a new snapshot. The
//! admin API (`admin`), SIGHUP and the SLO guard (`slo::guard`, which runs the judge in
//! `slo::rules` and `slo::sequential`) only send it commands. `takeover` hands the
//! listening sockets and `state.dir` to a new binary (started by hand, or on SIGUSR2 by
//! `takeover::successor`); `systemd` tells a `Type=notify` unit where the process
//! stands. `config` parses and validates the file; `app` wires it all and runs the shutdown sequence. `demo` is the
//! self-contained demo, `client` the deploy CLI's admin client.

pub mod admin;
pub mod app;
pub mod client;
pub mod config;
pub mod demo;
pub mod fleet;
pub mod grpc;
pub mod notify;
pub mod proxy;
pub mod server;
pub mod slo;
pub mod state;
pub mod systemd;
pub mod takeover;
pub mod telemetry;
pub mod timefmt;
pub mod upstream;
pub mod worker;
