//! Durable runtime state in `state.dir`: `state.json` (weights, trips, rollouts), written
//! atomically (temp file, fsync, rename, fsync of the directory) before a change is
//! acknowledged, and `audit.jsonl`, one JSON line per change.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::snapshot::{RolloutEnd, RolloutProgress, Trip};
use crate::upstream::InstanceState;

/// The operator's state of instances that are not `ready`, by upstream and address.
pub type InstanceStates = BTreeMap<String, BTreeMap<std::net::SocketAddr, SavedInstance>>;

/// One instance's saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedInstance {
    pub state: InstanceState,
    /// With a fleet: the store revision it was applied from; 0 when set on this replica
    /// alone (then it seeds the store when the replica joins a fleet).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: i64,
}

const STATE_FILE: &str = "state.json";
/// The operator's state of instances (drain, maint).
const INSTANCES_FILE: &str = "instances.json";
/// A freeze of every rollout, while one is on.
const FREEZE_FILE: &str = "freeze.json";
const AUDIT_FILE: &str = "audit.jsonl";
/// Held with an exclusive lock for as long as the process runs; holds its PID.
const LOCK_FILE: &str = "splitgate.lock";
const FORMAT_VERSION: u32 = 1;

/// The saved state of one route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRoute {
    /// Live weight, basis points.
    pub weight_bp: u32,
    /// The config file's weight when this was saved: if the file's weight has changed
    /// since, the file wins.
    pub file_weight_bp: u32,
    #[serde(default)]
    pub trip: Option<Trip>,
    #[serde(default)]
    pub rollout: Option<RolloutProgress>,
    /// How the last rollout ended (completed, aborted, tripped), until another starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_end: Option<RolloutEnd>,
    /// What the canary pointed at (upstream and instances) when this was saved: when
    /// it changes, the live weight belongs to another version and the file's applies.
    /// Absent in state files from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// Bumped by every reset: with a fleet, a trip made before the latest reset is
    /// recognised as stale and never re-applied.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// With a fleet: the etcd revision of the desired state this was applied from.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: i64,
    /// With a fleet: a trip or rollback made here that the store has not accepted yet
    /// (it was unreachable); the publisher retries until it lands.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpublished: bool,
}

fn is_zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A route's desired state as the fleet store holds it (the value of
/// `/splitgate/v1/<cluster>/routes/<route>`): what every replica applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRoute {
    pub weight_bp: u32,
    #[serde(default)]
    pub trip: Option<Trip>,
    #[serde(default)]
    pub rollout: Option<RolloutProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_end: Option<RolloutEnd>,
    #[serde(default)]
    pub epoch: u64,
    /// The replica that wrote it, and who asked (`admin`, `cli`, `slo`, `rollout`).
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub source: String,
}

impl FleetRoute {
    /// Reads a value from the store. A weight out of range is refused; a tripped route
    /// is at weight 0 whatever the value says (a hand-written value cannot expose a
    /// tripped canary).
    pub fn parse(bytes: &[u8]) -> Result<FleetRoute, String> {
        let mut value: FleetRoute =
            serde_json::from_slice(bytes).map_err(|e| format!("not a route state: {e}"))?;
        if value.weight_bp > 10_000 {
            return Err(format!(
                "weight_bp {} is above 10000 (100 %)",
                value.weight_bp
            ));
        }
        if value.trip.is_some() {
            value.weight_bp = 0;
        }
        Ok(value)
    }

    pub fn from_saved(saved: &SavedRoute, by: &str, source: &str) -> Self {
        FleetRoute {
            weight_bp: saved.weight_bp,
            trip: saved.trip.clone(),
            rollout: saved.rollout.clone(),
            rollout_end: saved.rollout_end.clone(),
            epoch: saved.epoch,
            by: by.to_string(),
            source: source.to_string(),
        }
    }

    /// `saved` (this replica's own fields kept) with the fleet's desired state.
    pub fn onto(&self, saved: &SavedRoute) -> SavedRoute {
        SavedRoute {
            weight_bp: self.weight_bp,
            trip: self.trip.clone(),
            rollout: self.rollout.clone(),
            rollout_end: self.rollout_end.clone(),
            epoch: self.epoch,
            ..saved.clone()
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    routes: BTreeMap<String, SavedRoute>,
}

/// What `load` found.
#[derive(Debug)]
pub enum Loaded {
    /// No state yet (first start).
    Fresh,
    Routes(BTreeMap<String, SavedRoute>),
    /// The file could not be read as state. It was moved aside to `moved_to`.
    Corrupt {
        reason: String,
        moved_to: PathBuf,
    },
}

/// One audit-log line.
#[derive(Debug, Serialize)]
pub struct AuditEntry<'a> {
    pub time: String,
    pub route: &'a str,
    pub action: &'a str,
    pub old_weight: f64,
    pub new_weight: f64,
    pub source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    /// With a fleet: the replica the change was made on, and the store's revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// A freeze: no rollout advances (incident mode); trips, rollbacks and aborts still apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    pub reason: String,
    /// Who set it (`admin`, `cli`) and, with a fleet, through which replica.
    pub by: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// The audit line of an instance state change.
#[derive(Debug, Serialize)]
pub struct InstanceAudit<'a> {
    pub time: String,
    pub upstream: &'a str,
    pub instance: std::net::SocketAddr,
    /// Always `instance_state`.
    pub action: &'a str,
    pub old_state: &'a str,
    pub new_state: &'a str,
    pub source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<&'a str>,
}

/// Why the state directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state.dir {}: already in use by another splitgate (pid {pid}, lock file {})", dir.display(), dir.join(LOCK_FILE).display())]
    InUse { dir: PathBuf, pid: String },
    #[error("state.dir {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The state directory, locked by this process.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// The exclusive lock: two processes sharing a state dir would overwrite each
    /// other's state and interleave their audit lines. Released when the last clone
    /// drops (or the process dies: the kernel drops the lock with the descriptor).
    _lock: Arc<File>,
}

impl Store {
    /// Opens (creating if needed) and locks the state directory. A directory another
    /// process holds is refused, naming that process.
    pub fn open(dir: &Path) -> Result<Self, StateDirError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateDirError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = std::io::Read::read_to_string(&mut lock, &mut pid);
                let pid = pid.trim();
                return Err(StateDirError::InUse {
                    dir: dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
            Err(fs::TryLockError::Error(source)) => return Err(io(&lock_path)(source)),
        }
        lock.set_len(0).map_err(io(&lock_path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io(&lock_path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: Arc::new(lock),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `state.json`. A corrupt file is moved aside, never deleted or overwritten.
    pub fn load(&self) -> std::io::Result<Loaded> {
        let path = self.dir.join(STATE_FILE);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Fresh),
            Err(e) => return Err(e),
        };
        let reason = match serde_json::from_slice::<StateFile>(&text) {
            Ok(file) if file.version == FORMAT_VERSION => return Ok(Loaded::Routes(file.routes)),
            Ok(file) => format!("unknown format version {}", file.version),
            Err(e) => e.to_string(),
        };
        let moved_to = self.dir.join(format!(
            "{STATE_FILE}.corrupt-{}",
            crate::timefmt::unix_ms()
        ));
        fs::rename(&path, &moved_to)?;
        Ok(Loaded::Corrupt { reason, moved_to })
    }

    /// Writes the state atomically: after this returns, a crash leaves either the old or
    /// the new file, never a torn one.
    pub fn save(&self, routes: &BTreeMap<String, SavedRoute>) -> std::io::Result<()> {
        let file = StateFile {
            version: FORMAT_VERSION,
            routes: routes.clone(),
        };
        self.write_atomically(STATE_FILE, &file)
    }

    /// Writes the instance states (in a file of their own: a splitgate from before them
    /// still reads `state.json`).
    pub fn save_instances(&self, instances: &InstanceStates) -> std::io::Result<()> {
        self.write_atomically(INSTANCES_FILE, instances)
    }

    /// Reads `instances.json`; none yet is none set. A corrupt file is moved aside
    /// (every instance is then ready, and the error is logged).
    pub fn load_instances(&self) -> std::io::Result<InstanceStates> {
        let path = self.dir.join(INSTANCES_FILE);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(e),
        };
        match serde_json::from_slice(&text) {
            Ok(states) => Ok(states),
            Err(error) => {
                let moved_to = self.dir.join(format!(
                    "{INSTANCES_FILE}.corrupt-{}",
                    crate::timefmt::unix_ms()
                ));
                fs::rename(&path, &moved_to)?;
                tracing::error!(%error, moved_to = %moved_to.display(), "instance states file is corrupt; every instance starts ready");
                Ok(BTreeMap::new())
            }
        }
    }

    /// Writes the freeze (`None`: removes the file).
    pub fn save_freeze(&self, freeze: Option<&Freeze>) -> std::io::Result<()> {
        match freeze {
            Some(freeze) => self.write_atomically(FREEZE_FILE, freeze),
            None => match fs::remove_file(self.dir.join(FREEZE_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => File::open(&self.dir)?.sync_all(),
            },
        }
    }

    /// Reads the freeze. An unreadable file is a freeze (the safe side), saying so.
    pub fn load_freeze(&self) -> std::io::Result<Option<Freeze>> {
        match fs::read(self.dir.join(FREEZE_FILE)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                Freeze {
                    reason: format!(
                        "freeze.json unreadable ({e}); `splitgate freeze off` clears it"
                    ),
                    by: "start".into(),
                    at: crate::timefmt::now_rfc3339(),
                }
            }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Temp file, fsync, rename, fsync of the directory: a crash leaves the old file or
    /// the new one, never a torn one.
    fn write_atomically(&self, name: &str, value: &impl Serialize) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut out = File::create(&tmp)?;
            out.write_all(&bytes)?;
            out.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(name))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Appends audit lines (each a JSON object) and syncs them.
    pub fn audit<T: Serialize>(&self, entries: &[T]) -> std::io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(AUDIT_FILE))?;
        let mut buf = Vec::new();
        for entry in entries {
            serde_json::to_writer(&mut buf, entry).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        out.write_all(&buf)?;
        out.sync_data()
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.join(AUDIT_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("splitgate-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saves_and_loads() {
        let store = Store::open(&temp_dir("roundtrip")).unwrap();
        assert!(matches!(store.load().unwrap(), Loaded::Fresh));
        let mut routes = BTreeMap::new();
        routes.insert(
            "api".to_string(),
            SavedRoute {
                rollout_end: None,
                weight_bp: 2500,
                file_weight_bp: 500,
                trip: None,
                rollout: None,
                canary: Some("v2 [127.0.0.1:2]".into()),
                epoch: 3,
                revision: 42,
                unpublished: true,
            },
        );
        let instances = BTreeMap::from([(
            "api".to_string(),
            BTreeMap::from([(
                "127.0.0.1:9".parse().unwrap(),
                SavedInstance {
                    state: InstanceState::Maint,
                    revision: 0,
                },
            )]),
        )]);
        store.save(&routes).unwrap();
        assert!(store.load_instances().unwrap().is_empty());
        store.save_instances(&instances).unwrap();
        let text = fs::read_to_string(store.dir().join(INSTANCES_FILE)).unwrap();
        assert!(text.contains("\"state\": \"maint\""), "{text}");
        assert_eq!(store.load_instances().unwrap(), instances);
        match store.load().unwrap() {
            Loaded::Routes(loaded) => assert_eq!(loaded, routes),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = temp_dir("corrupt");
        let store = Store::open(&dir).unwrap();
        fs::write(dir.join(STATE_FILE), b"{ not json").unwrap();
        match store.load().unwrap() {
            Loaded::Corrupt { moved_to, .. } => {
                assert!(moved_to.exists());
                assert!(!dir.join(STATE_FILE).exists());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_second_opener_is_refused_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("splitgate-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = Store::open(&dir).unwrap();
        let error = Store::open(&dir).unwrap_err().to_string();
        assert!(
            error.contains(&format!("pid {}", std::process::id())),
            "{error}"
        );
        assert!(error.contains(&dir.display().to_string()), "{error}");
        drop(first);
        Store::open(&dir).expect("the lock goes with its holder");
    }
}
