//! The config file: `file.rs` is what the operator writes, `compile.rs` validates it
//! into [`Settings`]. `load` is the one entry point used by `check`, `run` and reloads.

pub mod compile;
pub mod duration;
pub mod file;
pub mod net;

use std::fmt;
use std::path::{Path, PathBuf};

pub use compile::{
    bp_to_percent, weight_to_bp, FleetSettings, HealthCheck, HealthSpec, HostMatch, NotifySpec,
    Protocol, Resolve, RouteSpec, Settings, SloSpec, TlsSettings, UpstreamSpec, UpstreamTls,
};

/// Why a config could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{}", Invalid { path, errors })]
    Invalid { path: PathBuf, errors: Vec<String> },
}

/// Display helper for a list of validation errors, one per line.
struct Invalid<'a> {
    path: &'a Path,
    errors: &'a [String],
}

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {error}", self.path.display())?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// Each problem as its own line, for JSON replies and logs.
    pub fn messages(&self) -> Vec<String> {
        self.to_string().lines().map(str::to_string).collect()
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates config text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    parse_with(path, text, net::Names::Resolve)
}

/// `parse`, choosing how host names in addresses are treated (fuzzing uses
/// `Names::LiteralOnly`, so that random input never becomes DNS traffic).
pub fn parse_with(path: &Path, text: &str, names: net::Names) -> Result<Settings, ConfigError> {
    let file: file::FileConfig = toml::from_str(text).map_err(|error| {
        let whole = flatten_toml_error(&error, text);
        match schema_errors(text) {
            // Valid TOML with schema problems: name every one, not only the first.
            Some(errors) if errors.len() > 1 => ConfigError::Invalid {
                path: path.to_path_buf(),
                errors,
            },
            _ => ConfigError::Parse {
                path: path.to_path_buf(),
                message: whole,
            },
        }
    })?;
    compile::compile(&file, names).map_err(|errors| ConfigError::Invalid {
        path: path.to_path_buf(),
        errors,
    })
}

/// Every schema problem of a file that is valid TOML, one per section or list entry,
/// each prefixed with its field path (`routes[1].canary_weight: invalid type ...`).
/// serde stops at the first error of a document, so each section is read on its own.
/// `None` when the text is not TOML at all.
fn schema_errors(text: &str) -> Option<Vec<String>> {
    use file::{AdminSection, RouteSection, ServerSection, StateSection, UpstreamSection};
    let table: toml::Table = text.parse().ok()?;
    let mut errors = Vec::new();
    if !table.contains_key("server") {
        errors.push("server: missing section".to_string());
    }
    for (key, value) in table {
        match key.as_str() {
            "server" => check_section::<ServerSection>("server", value, &mut errors),
            "admin" => check_section::<AdminSection>("admin", value, &mut errors),
            "state" => check_section::<StateSection>("state", value, &mut errors),
            "upstreams" => match value {
                toml::Value::Table(upstreams) => {
                    for (name, value) in upstreams {
                        check_section::<UpstreamSection>(
                            &format!("upstreams.{name}"),
                            value,
                            &mut errors,
                        );
                    }
                }
                _ => errors.push("upstreams: must be a table of [upstreams.NAME]".into()),
            },
            "routes" => match value {
                toml::Value::Array(routes) => {
                    for (i, value) in routes.into_iter().enumerate() {
                        check_section::<RouteSection>(&format!("routes[{i}]"), value, &mut errors);
                    }
                }
                _ => errors.push("routes: must be an array of [[routes]]".into()),
            },
            "fleet" => check_section::<file::FleetSection>("fleet", value, &mut errors),
            "resolver" => check_section::<file::ResolverSection>("resolver", value, &mut errors),
            "notify" => match value {
                toml::Value::Array(sinks) => {
                    for (i, value) in sinks.into_iter().enumerate() {
                        check_section::<file::NotifySection>(&format!("notify[{i}]"), value, &mut errors);
                    }
                }
                _ => errors.push("notify: must be an array of [[notify]]".into()),
            },
            other => errors.push(format!(
                "{other}: unknown section (expected server, admin, state, upstreams, routes, fleet, resolver, notify)"
            )),
        }
    }
    Some(errors)
}

fn check_section<T: serde::de::DeserializeOwned>(
    field: &str,
    value: toml::Value,
    errors: &mut Vec<String>,
) {
    if let Err(error) = serde_path_to_error::deserialize::<_, T>(value) {
        let path = error.path().to_string();
        let message = error.inner().message().trim().to_string();
        match path.as_str() {
            "." | "" => errors.push(format!("{field}: {message}")),
            path => errors.push(format!("{field}.{path}: {message}")),
        }
    }
}

/// toml's own message spans several lines with a source excerpt; keep the line number and
/// the reason on one line so that each error stays one line.
fn flatten_toml_error(error: &toml::de::Error, text: &str) -> String {
    let reason = error.message().trim();
    match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let source = text.lines().nth(line - 1).unwrap_or_default().trim();
            format!("line {line} `{source}`: {reason}")
        }
        None => reason.to_string(),
    }
}
