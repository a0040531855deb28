//! The etcd client: one connection per endpoint, tried in turn. etcd-client balances
//! over its endpoints but never retries on another one when a member is down or cut off
//! from its leader, so each request here runs on the current endpoint under a timeout
//! and moves to the next on failure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

use crate::config::FleetSettings;

/// Why the store could not answer; shown to operators as is.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(String);

impl From<String> for StoreError {
    fn from(problem: String) -> Self {
        StoreError(problem)
    }
}

pub struct Store {
    endpoints: Vec<String>,
    clients: Mutex<Vec<Option<Client>>>,
    current: AtomicUsize,
    timeout: Duration,
}

impl Store {
    pub fn new(settings: &FleetSettings) -> Self {
        Store {
            endpoints: settings.endpoints.clone(),
            clients: Mutex::new(vec![None; settings.endpoints.len()]),
            current: AtomicUsize::new(0),
            timeout: settings.request_timeout,
        }
    }

    /// The endpoint requests go to now.
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.current.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    async fn client(&self, index: usize) -> Result<Client, etcd_client::Error> {
        if let Some(client) = self.clients.lock().expect("not poisoned")[index].clone() {
            return Ok(client);
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            // HTTP/2 pings find a connection that died silently (a cut network).
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            // A member cut off from its leader answers at once instead of serving
            // stale reads or hanging.
            .with_require_leader(true);
        let client = Client::connect([&self.endpoints[index]], Some(options)).await?;
        self.clients.lock().expect("not poisoned")[index] = Some(client.clone());
        Ok(client)
    }

    /// Runs `op` on the current endpoint, then on each other one in turn until one
    /// answers. A connection that failed is dropped and made again next time.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut errors = Vec::new();
        for _ in 0..self.endpoints.len() {
            let index = self.current.load(Ordering::Relaxed) % self.endpoints.len();
            let attempt = async {
                let client = self.client(index).await?;
                op(client).await
            };
            let problem = match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            errors.push(format!("{}: {problem}", self.endpoints[index]));
            self.clients.lock().expect("not poisoned")[index] = None;
            self.current
                .compare_exchange(
                    index,
                    (index + 1) % self.endpoints.len(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .ok();
        }
        Err(StoreError(errors.join("; ")))
    }

    /// The value and mod revision of `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let response = self
            .run(|mut client| async move { client.get(key, None).await })
            .await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// The create revision and lease of `key`, if it exists (whose election key it is).
    pub async fn key_owner(&self, key: &str) -> Result<Option<(i64, i64)>, StoreError> {
        let response = self
            .run(|mut client| async move { client.get(key, None).await })
            .await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| (kv.create_revision(), kv.lease())))
    }

    /// Every key under `prefix`, and the store's revision they were read at.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let response = self
            .run(|mut client| async move {
                client
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((response.kvs().to_vec(), revision))
    }

    /// Runs `txn`; the revision it committed at, or `None` when its comparisons failed.
    async fn commit_if(&self, txn: Txn) -> Result<Option<i64>, StoreError> {
        let response = self
            .run(|mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        Ok(response
            .succeeded()
            .then(|| response.header().map_or(0, |h| h.revision())))
    }

    /// Writes `value` to `key` if the key's mod revision is still `expected` (0: the
    /// key does not exist). The revision it committed at, or `None` when the key moved.
    pub async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        expected: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.commit_if(
            Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
                .and_then([TxnOp::put(key, value, None)]),
        )
        .await
    }

    /// Writes `value` to `key` if the key's mod revision is still `expected` and the
    /// `fence` key (the judge's election key) still has create revision `fenced_at`: a
    /// judge that lost its election can never write. The committed revision, or `None`.
    pub async fn put_fenced(
        &self,
        key: &str,
        value: &[u8],
        expected: i64,
        fence: &str,
        fenced_at: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.commit_if(
            Txn::new()
                .when([
                    Compare::mod_revision(key, CompareOp::Equal, expected),
                    Compare::create_revision(fence, CompareOp::Equal, fenced_at),
                ])
                .and_then([TxnOp::put(key, value, None)]),
        )
        .await
    }

    /// Creates `key` bound to `lease` if it does not exist: the revision it was created
    /// at (an election won), or `None` (someone holds it).
    pub async fn create_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.commit_if(
            Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )]),
        )
        .await
    }

    /// Writes `value` to `key`; the revision it committed at.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<i64, StoreError> {
        let response = self
            .run(|mut client| async move { client.put(key, value, None).await })
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Deletes `key`; the revision it committed at.
    pub async fn delete(&self, key: &str) -> Result<i64, StoreError> {
        let response = self
            .run(|mut client| async move { client.delete(key, None).await })
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Writes `value` to `key`, bound to `lease`.
    pub async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<(), StoreError> {
        self.run(|mut client| async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        })
        .await
        .map(|_| ())
    }

    /// A new lease of `ttl` seconds: its id and the TTL the store granted.
    pub async fn grant(&self, ttl: i64) -> Result<(i64, i64), StoreError> {
        let response = self
            .run(|mut client| async move { client.lease_grant(ttl, None).await })
            .await?;
        Ok((response.id(), response.ttl()))
    }

    /// Renews `lease` once; `false` when it has expired (its keys are gone).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        self.run(|mut client| async move {
            let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(answers.message().await?.is_some_and(|a| a.ttl() > 0))
        })
        .await
    }

    /// Ends `lease` now, deleting its keys (a clean stop hands the judge over at once).
    pub async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.run(|mut client| async move { client.lease_revoke(lease).await })
            .await
            .map(|_| ())
    }

    /// A watch of every key under `prefix` from `revision` on.
    pub async fn watch(&self, prefix: &str, revision: i64) -> Result<WatchStream, StoreError> {
        self.run(|mut client| async move {
            client
                .watch(
                    prefix,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision),
                    ),
                )
                .await
        })
        .await
    }
}
