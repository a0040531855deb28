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
    pub async fn call(&self, method: Method, path: &str, body: Option<String>) -> Result<(StatusCode, String), ClientError> {
        let stream = TcpStream::connect(&self.authority).await.map_err(|source| ClientError::Connect {
            url: self.url.clone(),
            source,
        })?;
        let http_error = |source| ClientError::Http { url: self.url.clone(), source };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_error)?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| ClientError::BadUrl(self.url.clone()))?;
        let response = sender.send_request(request).await.map_err(http_error)?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(http_error)?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}
