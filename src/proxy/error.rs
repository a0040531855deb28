//! The one place proxy errors become responses. Each error knows its status and whether
//! the client connection must close (after a framing error it cannot be trusted).

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::upstream::body::ClientBodyTimeout;
use crate::upstream::UpstreamError;

/// Why the proxy answered itself instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Client's fault: a malformed or ambiguous request.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request target too long")]
    UriTooLong,
    #[error("no route matches this host and path")]
    NoRoute,
    /// Every instance of the chosen pool is ejected and the route fails fast.
    #[error("no instance in service to serve this request (failing, drained or in maintenance)")]
    NoHealthyInstance,
    /// Upstream's fault.
    #[error("upstream {upstream}: {source}")]
    Upstream {
        upstream: String,
        source: UpstreamError,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyInstance => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream { source, .. } => upstream_status(source),
        }
    }

    /// Whether the client connection must close after this response.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::UriTooLong
                | ProxyError::Upstream {
                    source: UpstreamError::ClientBody(_),
                    ..
                }
        )
    }

    /// The response the client sees: status, a one-line plain-text reason.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let body = match &self {
            // Upstream details stay in the logs, not in the client's view.
            ProxyError::Upstream { .. } => {
                format!("{}\n", status.canonical_reason().unwrap_or("error"))
            }
            other => format!("{other}\n"),
        };
        let mut response = Response::new(ProxyBody::Full(Some(Bytes::from(body))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.closes_connection() {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl ProxyError {
    /// The response for the client: for a gRPC call, a trailers-only gRPC error (HTTP
    /// 200 with `grpc-status`, as gRPC's HTTP mapping gives the status; DEADLINE_EXCEEDED
    /// when the caller's own deadline ran out), else [`ProxyError::into_response`].
    pub fn into_response_for(self, grpc: bool) -> Response<ProxyBody> {
        if !grpc {
            return self.into_response();
        }
        let status = self.status();
        let (code, message) = match &self {
            ProxyError::Upstream {
                source: UpstreamError::DeadlineExceeded,
                ..
            } => (
                crate::grpc::DEADLINE_EXCEEDED,
                "deadline exceeded before the upstream answered".to_string(),
            ),
            ProxyError::Upstream {
                source: source @ (UpstreamError::Http1Only | UpstreamError::UpgradeOverH2),
                ..
            } => (crate::grpc::UNAVAILABLE, format!("splitgate: {source}")),
            // Upstream details stay in the logs, not in the client's view.
            ProxyError::Upstream { .. } => (
                crate::grpc::code_for_http(status),
                format!(
                    "splitgate: upstream {}",
                    status.canonical_reason().unwrap_or("error")
                ),
            ),
            other => (
                crate::grpc::code_for_http(status),
                format!("splitgate: {other}"),
            ),
        };
        let mut response: Response<ProxyBody> = crate::grpc::error_response(code, &message);
        if self.closes_connection() {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The status for a failed upstream exchange: 504 for timeouts, 503 when no connection
/// came free under the instance's connection cap (as HAProxy answers a queue timeout),
/// 502 for the upstream's other failures, and 408 or 400 when it was the client's body
/// that failed.
pub fn upstream_status(source: &UpstreamError) -> StatusCode {
    match source {
        UpstreamError::QueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
        UpstreamError::ConnectTimeout
        | UpstreamError::ResponseTimeout
        | UpstreamError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::ClientBody(error) if is_body_timeout(error.as_ref()) => {
            StatusCode::REQUEST_TIMEOUT
        }
        UpstreamError::ClientBody(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// Whether a client-body failure was our idle timer (408) rather than a malformed or
/// aborted body (400).
fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if cause.is::<ClientBodyTimeout>() {
            return true;
        }
        source = cause.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(source: UpstreamError) -> ProxyError {
        ProxyError::Upstream {
            upstream: "u".into(),
            source,
        }
    }

    #[test]
    fn maps_each_error_to_its_status() {
        assert_eq!(
            ProxyError::BadRequest("x").status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(ProxyError::UriTooLong.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(ProxyError::NoRoute.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ProxyError::NoHealthyInstance.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            upstream(UpstreamError::Connect(refused)).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            upstream(UpstreamError::ConnectTimeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            upstream(UpstreamError::ResponseTimeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            upstream(UpstreamError::QueueTimeout).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn framing_errors_close_the_connection() {
        let response = ProxyError::BadRequest("x").into_response();
        assert_eq!(response.headers()[CONNECTION], "close");
        let response = ProxyError::NoRoute.into_response();
        assert!(response.headers().get(CONNECTION).is_none());
    }
}
