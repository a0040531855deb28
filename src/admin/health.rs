//! `GET /healthz?verbose=1`: what a deployment checklist asks a health answer to carry
//! (version, uptime, config, state store, workers, instances up), as JSON. Plain
//! `/healthz` stays the cheap liveness answer.

use std::sync::atomic::Ordering;

use http::{Response, StatusCode};
use serde_json::json;

use super::{json_response, AdminBody};
use crate::state::StateHandle;

/// Whether a query string asks for the verbose answer (`verbose`, `verbose=1`,
/// `verbose=true`).
pub fn wants_verbose(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "verbose" | "verbose=1" | "verbose=true"))
    })
}

/// The verbose health answer. 200 while serving; 503 while draining, or when the last
/// write of `state.dir` failed (changes are being refused), so a probe that reads the
/// status sees it too.
pub fn verbose(state: &StateHandle) -> Response<AdminBody> {
    let shared = &state.shared;
    let snapshot = shared.snapshot.load();
    let draining = shared.draining.load(Ordering::Relaxed);
    let failed_ms = shared.last_persist_failure_ms.load(Ordering::Relaxed);
    let upstreams: Vec<_> = snapshot
        .upstreams
        .iter()
        .map(|upstream| {
            let checks = upstream.checks();
            let up = upstream
                .members()
                .iter()
                .filter(|m| m.takes_requests(checks))
                .count();
            json!({
                "name": upstream.name(),
                "protocol": upstream.spec.protocol.as_str(),
                "instances": upstream.members().len(),
                "up": up,
            })
        })
        .collect();
    let fleet = shared.fleet.get().map(|fleet| {
        let view = fleet.view();
        json!({
            "synced": fleet.synced(),
            "store_up": view.store_up,
            "endpoint": view.endpoint,
            "applied_revision": view.applied_revision,
            "last_error": view.last_error,
        })
    });
    let status = match (draining, failed_ms) {
        (true, _) => "draining",
        (false, 0) => "ok",
        (false, _) => "state_write_failed",
    };
    let body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "config": {
            "file": shared.config_path.as_ref().map(|p| p.display().to_string()),
            "generation": snapshot.generation,
        },
        "workers": snapshot.settings.server.workers,
        "state": {
            "dir": snapshot.settings.state_dir.display().to_string(),
            "last_write_failed_at": (failed_ms != 0).then(|| crate::timefmt::rfc3339(failed_ms)),
        },
        "fleet": fleet,
        "upstreams": upstreams,
    });
    let code = match status {
        "ok" => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_response(code, &body)
}

#[cfg(test)]
mod tests {
    use super::wants_verbose;

    #[test]
    fn verbose_is_asked_for_by_name() {
        assert!(wants_verbose(Some("verbose=1")));
        assert!(wants_verbose(Some("x=2&verbose")));
        assert!(wants_verbose(Some("verbose=true")));
        assert!(!wants_verbose(Some("verbose=0")));
        assert!(!wants_verbose(Some("notverbose=1")));
        assert!(!wants_verbose(None));
    }
}
