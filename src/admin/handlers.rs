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
    let freeze = state.freeze();
    let mut routes: Vec<_> = snapshot
        .routes
        .iter()
        .map(|r| {
            route_view(
                &snapshot,
                r,
                freeze.as_ref(),
                state.recent_trips(&r.spec.name),
            )
        })
        .collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    json_response(
        StatusCode::OK,
        &json!({ "generation": snapshot.generation, "frozen": freeze, "routes": routes }),
    )
}

pub fn show_route(state: &StateHandle, name: &str) -> Response<AdminBody> {
    let snapshot = state.shared.snapshot.load();
    match snapshot.route(name) {
        Some(route) => json_response(
            StatusCode::OK,
            &route_view(
                &snapshot,
                route,
                state.freeze().as_ref(),
                state.recent_trips(&route.spec.name),
            ),
        ),
        None => json_error(StatusCode::NOT_FOUND, &format!("no route named {name:?}")),
    }
}

/// Parses a `PUT .../weight` body into basis points and the `force` flag, or says what
/// is wrong with it, naming the field. Only the documented object form is accepted
/// (serde would also take a JSON array for a struct: `[20]`).
pub fn parse_weight(body: &[u8]) -> Result<(u32, bool), String> {
    const FORM: &str =
        "the body is {\"canary_weight\": PERCENT} (and \"force\": true to end a running rollout)";
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON ({e}); {FORM}"))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(format!("body must be a JSON object; {FORM}"));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| *k != "canary_weight" && *k != "force")
    {
        return Err(format!("unknown field {unknown:?}; {FORM}"));
    }
    let weight = fields
        .get("canary_weight")
        .ok_or_else(|| format!("canary_weight: missing; {FORM}"))?;
    let percent = weight
        .as_f64()
        .ok_or_else(|| format!("canary_weight: {weight} is not a number"))?;
    let force = match fields.get("force") {
        None => false,
        Some(serde_json::Value::Bool(force)) => *force,
        Some(other) => return Err(format!("force: {other} is not true or false")),
    };
    let bp = weight_to_bp(percent).map_err(|e| format!("canary_weight: {e}"))?;
    Ok((bp, force))
}

pub async fn set_weight(
    state: &StateHandle,
    name: &str,
    body: &Bytes,
    source: Source,
) -> Response<AdminBody> {
    let (weight_bp, force) = match parse_weight(body) {
        Ok(parsed) => parsed,
        Err(reason) => return json_error(StatusCode::BAD_REQUEST, &reason),
    };
    let result = state.set_weight(name, weight_bp, force, source).await;
    after_change(state, name, result)
}

pub async fn rollback(state: &StateHandle, name: &str, source: Source) -> Response<AdminBody> {
    // A rollback is an emergency: it ends a running rollout.
    let result = state.set_weight(name, 0, true, source).await;
    after_change(state, name, result)
}

pub async fn reset(state: &StateHandle, name: &str, source: Source) -> Response<AdminBody> {
    let result = state.reset(name, source).await;
    after_change(state, name, result)
}

/// `POST /admin/routes/{name}/rollout/{action}`, with an optional body:
/// `{"from_current": true}` for start, `{"full": true}` for promote.
pub async fn rollout(
    state: &StateHandle,
    name: &str,
    action: &str,
    body: &Bytes,
    source: Source,
) -> Response<AdminBody> {
    let options: serde_json::Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
    };
    let Some(fields) = options.as_object() else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "body must be empty or a JSON object",
        );
    };
    let allowed: &[&str] = match action {
        "start" => &["from_current"],
        "promote" => &["full", "step"],
        _ => &[],
    };
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("unknown field {unknown:?} for rollout {action} (it takes {allowed:?})"),
        );
    }
    let flag = |name: &str| {
        fields
            .get(name)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    if let Some((name, value)) = fields
        .iter()
        .find(|(k, v)| !v.is_boolean() && !(*k == "step" && (v.is_u64() || v.is_null())))
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("{name}: {value} is not true or false"),
        );
    }
    let action = match action {
        "start" => RolloutAction::Start {
            from_current: flag("from_current"),
        },
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "abort" => RolloutAction::Abort,
        "promote" => RolloutAction::Promote {
            full: flag("full"),
            seen: fields
                .get("step")
                .and_then(serde_json::Value::as_u64)
                .map(|s| s as usize),
        },
        "retry" => RolloutAction::Retry,
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                "rollout actions are start, pause, resume, abort, promote and retry",
            )
        }
    };
    let result = state.rollout(name, action, source).await;
    after_change(state, name, result)
}

/// `GET /admin/freeze`: the freeze in force (`{"frozen": null}` when none).
pub fn freeze(state: &StateHandle) -> Response<AdminBody> {
    json_response(StatusCode::OK, &json!({ "frozen": state.freeze() }))
}

/// `PUT /admin/freeze` with `{"frozen": true, "reason": "incident 42"}` or
/// `{"frozen": false}`.
pub async fn set_freeze(state: &StateHandle, body: &Bytes, source: Source) -> Response<AdminBody> {
    const FORM: &str = "the body is {\"frozen\": true, \"reason\": TEXT} or {\"frozen\": false}";
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("body is not JSON ({e}); {FORM}"),
            )
        }
    };
    let Some(fields) = value.as_object() else {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("body must be a JSON object; {FORM}"),
        );
    };
    if let Some(unknown) = fields.keys().find(|k| *k != "frozen" && *k != "reason") {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("unknown field {unknown:?}; {FORM}"),
        );
    }
    let Some(frozen) = fields.get("frozen").and_then(serde_json::Value::as_bool) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("frozen: missing or not true/false; {FORM}"),
        );
    };
    let reason = match fields.get("reason") {
        None => "no reason given".to_string(),
        Some(serde_json::Value::String(reason)) if reason.len() <= 200 => reason.clone(),
        Some(_) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "reason: must be text of at most 200 bytes",
            )
        }
    };
    let by = match state.shared.fleet.get() {
        Some(fleet) => format!("{} on {}", source.as_str(), fleet.settings.replica),
        None => source.as_str().to_string(),
    };
    let wanted = frozen.then(|| crate::state::Freeze {
        reason,
        by,
        at: crate::timefmt::now_rfc3339(),
    });
    match state.set_freeze(wanted).await {
        Ok(()) => freeze(state),
        Err(error) => change_error(error),
    }
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
        ChangeError::Conflict(_) | ChangeError::RolloutRunning(..) | ChangeError::Refused(_) => {
            StatusCode::CONFLICT
        }
        ChangeError::Persist(_)
        | ChangeError::StateDir(_)
        | ChangeError::Stopped
        | ChangeError::NotSaved { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, &error.to_string())
}
