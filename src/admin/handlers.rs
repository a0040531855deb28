//! Admin API handlers. Each change goes through the state writer; reads use the
//! current snapshot.

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::json;

use super::view::route_view;
use super::{json_error, json_response, AdminBody};
use crate::config::weight_to_bp;
use crate::state::{ChangeError, RolloutAction, Source, StateHandle};

/// The fleet this replica belongs to: its store, the revision applied, and whether the
/// store answers. `backend: "none"` on a single node.
pub fn fleet(state: &StateHandle) -> Response<AdminBody> {
    match state.shared.fleet.get() {
        Some(fleet) => json_response(StatusCode::OK, &fleet.view()),
        None => json_response(StatusCode::OK, &json!({ "backend": "none" })),
    }
}

pub fn list_routes(state: &StateHandle) -> Response<AdminBody> {
    let snapshot = state.shared.snapshot.load();
    let mut routes: Vec<_> = snapshot
        .routes
        .iter()
        .map(|r| route_view(&snapshot, r))
        .collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    json_response(
        StatusCode::OK,
        &json!({ "generation": snapshot.generation, "routes": routes }),
    )
}

pub fn show_route(state: &StateHandle, name: &str) -> Response<AdminBody> {
    let snapshot = state.shared.snapshot.load();
    match snapshot.route(name) {
        Some(route) => json_response(StatusCode::OK, &route_view(&snapshot, route)),
        None => json_error(StatusCode::NOT_FOUND, &format!("no route named {name:?}")),
    }
}

/// Parses a `PUT .../weight` body into basis points, or says what is wrong with it,
/// naming the field. Only the documented object form is accepted (serde would also
/// take a JSON array for a struct: `[20]`).
pub fn parse_weight(body: &[u8]) -> Result<u32, String> {
    const FORM: &str = "the body is {\"canary_weight\": PERCENT}";
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON ({e}); {FORM}"))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(format!("body must be a JSON object; {FORM}"));
    };
    if let Some(unknown) = fields.keys().find(|k| *k != "canary_weight") {
        return Err(format!("unknown field {unknown:?}; {FORM}"));
    }
    let weight = fields
        .get("canary_weight")
        .ok_or_else(|| format!("canary_weight: missing; {FORM}"))?;
    let percent = weight
        .as_f64()
        .ok_or_else(|| format!("canary_weight: {weight} is not a number"))?;
    weight_to_bp(percent).map_err(|e| format!("canary_weight: {e}"))
}

pub async fn set_weight(
    state: &StateHandle,
    name: &str,
    body: &Bytes,
    source: Source,
) -> Response<AdminBody> {
    let weight_bp = match parse_weight(body) {
        Ok(bp) => bp,
        Err(reason) => return json_error(StatusCode::BAD_REQUEST, &reason),
    };
    let result = state.set_weight(name, weight_bp, source).await;
    after_change(state, name, result)
}

pub async fn rollback(state: &StateHandle, name: &str, source: Source) -> Response<AdminBody> {
    let result = state.set_weight(name, 0, source).await;
    after_change(state, name, result)
}

pub async fn reset(state: &StateHandle, name: &str, source: Source) -> Response<AdminBody> {
    let result = state.reset(name, source).await;
    after_change(state, name, result)
}

pub async fn rollout(
    state: &StateHandle,
    name: &str,
    action: &str,
    source: Source,
) -> Response<AdminBody> {
    let action = match action {
        "start" => RolloutAction::Start,
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "abort" => RolloutAction::Abort,
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                "rollout actions are start, pause, resume and abort",
            )
        }
    };
    let result = state.rollout(name, action, source).await;
    after_change(state, name, result)
}

pub async fn reload(state: &StateHandle, source: Source) -> Response<AdminBody> {
    match state.reload(source).await {
        Ok(warnings) => {
            let generation = state.shared.snapshot.load().generation;
            json_response(
                StatusCode::OK,
                &json!({ "status": "reloaded", "generation": generation, "warnings": warnings }),
            )
        }
        Err(ChangeError::Config(error)) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "config rejected; nothing changed", "errors": error.messages() }),
        ),
        Err(error) => change_error(error),
    }
}

/// Replies with the route's new state, or the reason nothing changed.
fn after_change(
    state: &StateHandle,
    name: &str,
    result: Result<(), ChangeError>,
) -> Response<AdminBody> {
    match result {
        Ok(()) => show_route(state, name),
        Err(error) => change_error(error),
    }
}

pub(super) fn change_error(error: ChangeError) -> Response<AdminBody> {
    let status = match &error {
        ChangeError::UnknownRoute(_)
        | ChangeError::UnknownUpstream(_)
        | ChangeError::UnknownInstance { .. } => StatusCode::NOT_FOUND,
        ChangeError::Tripped { .. } => StatusCode::CONFLICT,
        ChangeError::NoCanary(_)
        | ChangeError::Tls(_)
        | ChangeError::Invalid(_)
        | ChangeError::Config(_)
        | ChangeError::NoConfigFile => StatusCode::BAD_REQUEST,
        ChangeError::HandedOver | ChangeError::StoreUnavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ChangeError::Conflict(_) => StatusCode::CONFLICT,
        ChangeError::Persist(_)
        | ChangeError::StateDir(_)
        | ChangeError::Stopped
        | ChangeError::NotSaved { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, &error.to_string())
}
