//! A small admin-API client for the deploy CLI (`splitgate weight`, `status`, …).

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a CLI call failed before getting an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--admin {0:?} must look like http://HOST:PORT")]
    BadUrl(String),
    #[error("cannot reach the admin API at {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("admin API at {url}: {source}")]
    Http { url: String, source: hyper::Error },
}

/// An admin API base URL, e.g. `http://127.0.0.1:9901`.
pub struct AdminClient {
    authority: String,
    url: String,
    token: Option<String>,
}

impl AdminClient {
    pub fn new(url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let authority = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| ClientError::BadUrl(url.to_string()))?;
        Ok(Self {
            authority: authority.to_string(),
            url: url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// Sends one request; returns the status and body text.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, String), ClientError> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| ClientError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let http_error = |source| ClientError::Http {
            url: self.url.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_error)?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("content-type", "application/json")
            .header(crate::admin::SOURCE_HEADER, "cli");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| ClientError::BadUrl(self.url.clone()))?;
        let response = sender.send_request(request).await.map_err(http_error)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http_error)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

/// One line per route for `splitgate status`: weight, SLO state, the canary's window
/// figures, and rollout progress.
pub fn status_table(routes: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<16} {:>7} {:>7} {:<9} {:>8} {:>7} {:>9}  {}\n",
        "ROUTE", "WEIGHT", "FILE", "SLO", "CAN.REQ", "CAN.ERR", "CAN.P99", "ROLLOUT"
    );
    for route in routes {
        let canary = &route["window"]["canary"];
        let rollout = match &route["rollout"] {
            serde_json::Value::Null => "-".to_string(),
            r => rollout_state(r),
        };
        out.push_str(&format!(
            "{:<16} {:>6}% {:>6}% {:<9} {:>8} {:>6.2}% {:>7.1}ms  {}\n",
            route["name"].as_str().unwrap_or("?"),
            percent(&route["canary_weight"]),
            percent(&route["file_weight"]),
            route["slo"]["state"].as_str().unwrap_or("?"),
            canary["requests"].as_u64().unwrap_or(0),
            canary["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            canary["p99_ms"].as_f64().unwrap_or(0.0),
            rollout
        ));
        if let Some(detail) = route["slo"]["detail"].as_str() {
            out.push_str(&format!("  tripped: {detail}\n"));
        }
        // The judge's evidence, one line per rule.
        for rule in route["slo"]["rules"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {}: {}, {}\n",
                rule["rule"].as_str().unwrap_or("?"),
                rule["verdict"].as_str().unwrap_or("?"),
                rule["summary"].as_str().unwrap_or("")
            ));
        }
    }
    out
}

/// `splitgate fleet status`: the store as this replica sees it, who judges, and every
/// member with the revision it applied.
pub fn fleet_table(fleet: &serde_json::Value) -> String {
    if fleet["backend"] != "etcd" {
        return "single node: no [fleet] in this replica's config\n".to_string();
    }
    let mut out = format!(
        "cluster {}, replica {}: store {} via {}, applied revision {}\n",
        fleet["cluster"].as_str().unwrap_or("?"),
        fleet["replica"].as_str().unwrap_or("?"),
        if fleet["store_up"] == true {
            "up"
        } else {
            "DOWN"
        },
        fleet["endpoint"].as_str().unwrap_or("?"),
        fleet["applied_revision"].as_i64().unwrap_or(0),
    );
    if let Some(error) = fleet["last_error"].as_str() {
        out.push_str(&format!("  last store error: {error}\n"));
    }
    out.push_str(&format!(
        "judge: {}\n",
        fleet["judge"]
            .as_str()
            .unwrap_or("none (elected within a few seconds)")
    ));
    out.push_str(&format!(
        "{:<24} {:<10} {:<22} {:>9}  {}\n",
        "MEMBER", "VERSION", "STARTED", "APPLIED", "STORE"
    ));
    for member in fleet["members"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<24} {:<10} {:<22} {:>9}  {}\n",
            member["replica"].as_str().unwrap_or("?"),
            member["version"].as_str().unwrap_or("?"),
            member["started"].as_str().unwrap_or("?"),
            member["applied_revision"].as_i64().unwrap_or(0),
            if member["store_up"] == true {
                "up"
            } else {
                "down"
            },
        ));
    }
    out
}

/// `splitgate upstreams`: one line per instance.
pub fn upstreams_table(upstreams: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<16} {:<24} {:<6} {:<9} {:<7} {:>9} {:>5} {:>9}  {}\n",
        "UPSTREAM",
        "INSTANCE",
        "STATE",
        "HEALTH",
        "SERVING",
        "IN-FLIGHT",
        "CONNS",
        "EJECTIONS",
        "LAST CHECK"
    );
    for upstream in upstreams {
        let name = upstream["name"].as_str().unwrap_or("?");
        let instances = upstream["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if instances.is_empty() {
            out.push_str(&format!(
                "{name:<16} (no instance: {} does not resolve yet)\n",
                upstream["configured"]
            ));
        }
        for instance in &instances {
            let mut health = instance["health"].as_str().unwrap_or("?").to_string();
            if instance["ejected"] == true {
                health.push_str(",ej");
            }
            let last = match instance["last_error"].as_str() {
                Some(error) => format!("failed: {error}"),
                None => instance["last_check"].as_str().unwrap_or("-").to_string(),
            };
            out.push_str(&format!(
                "{:<16} {:<24} {:<6} {:<9} {:<7} {:>9} {:>5} {:>9}  {}\n",
                name,
                instance["addr"].as_str().unwrap_or("?"),
                instance["state"].as_str().unwrap_or("?"),
                health,
                if instance["serving"] == true {
                    "yes"
                } else {
                    "no"
                },
                instance["in_flight"].as_u64().unwrap_or(0),
                instance["connections"].as_u64().unwrap_or(0),
                instance["ejections"].as_u64().unwrap_or(0),
                last
            ));
        }
    }
    out
}

/// What a change did, from the route's state before and after.
pub fn change_summary(before: Option<&serde_json::Value>, after: &serde_json::Value) -> String {
    let name = after["name"].as_str().unwrap_or("?");
    let old = before.map_or("?".to_string(), |b| percent(&b["canary_weight"]));
    let mut line = format!(
        "{name}: canary weight {old}% -> {}%, slo {}",
        percent(&after["canary_weight"]),
        after["slo"]["state"].as_str().unwrap_or("?")
    );
    if after["rollout"].is_object() {
        line.push_str(&format!(", rollout {}", rollout_state(&after["rollout"])));
    }
    line.push('\n');
    line
}

/// A rollout in words: `running, step 2 of 4, next in 30s`, `waiting at step 3 of 4 for
/// promote`, `completed (completed at 100%)`.
pub fn rollout_state(r: &serde_json::Value) -> String {
    let state = r["state"].as_str().unwrap_or("?");
    let at = format!(
        "step {} of {}",
        r["step"].as_u64().unwrap_or(0),
        r["steps"].as_array().map_or(0, Vec::len)
    );
    match state {
        "running" => format!(
            "running, {at}, next in {:.0}s",
            r["next_step_in_s"].as_f64().unwrap_or(0.0)
        ),
        "paused" => format!("paused at {at}"),
        "waiting" => format!(
            "waiting at {at} for {}",
            r["waiting_for"].as_str().unwrap_or("?")
        ),
        "idle" => "idle".to_string(),
        ended => match r["last"]["why"].as_str() {
            Some(why) => format!("{ended} at step {} ({why})", r["last"]["step"]),
            None => ended.to_string(),
        },
    }
}

/// One line for `rollout wait`: the route's weight and its rollout.
pub fn rollout_line(route: &serde_json::Value) -> String {
    format!(
        "{}: {}% canary, rollout {}",
        route["name"].as_str().unwrap_or("?"),
        percent(&route["canary_weight"]),
        rollout_state(&route["rollout"])
    )
}

/// A weight as people write it: `5`, `12.5`.
fn percent(value: &serde_json::Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "?".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row's columns line up with the header's, whatever the values' lengths (a
    /// `serde_json::Value` ignores the width it is printed with).
    #[test]
    fn status_columns_line_up() {
        let route = |name: &str, requests: u64, state: &str| {
            serde_json::json!({
                "name": name, "canary_weight": 12.5, "file_weight": 5.0,
                "slo": { "state": state },
                "window": { "canary": { "requests": requests, "error_rate": 0.0123, "p99_ms": 812.4 } },
                "rollout": null,
            })
        };
        let table = status_table(&[route("api", 7, "ok"), route("checkout", 123_456, "tripped")]);
        let lines: Vec<&str> = table.lines().collect();
        let rollout_at = lines[0].find("ROLLOUT").unwrap();
        for line in lines.iter().filter(|l| !l.starts_with(' ')).skip(1) {
            assert_eq!(line.get(rollout_at..), Some("-"), "{table}");
        }
    }
}
