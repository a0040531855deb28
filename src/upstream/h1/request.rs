//! The request head as HTTP/1.1 bytes, and how its body is framed.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{request, Method};
use http_body::Body as _;

use crate::upstream::body::UpstreamBody;

/// How the request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes, as `Content-Length` says (0 for no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`: a body of unknown length (a chunked HTTP/1.1
    /// client body, an HTTP/2 client body without `Content-Length`).
    Chunked,
}

/// Writes the request line and headers into `out` and returns the body's framing. The
/// headers were already stripped of hop-by-hop fields (`Transfer-Encoding` among them);
/// the framing header is written here from the body itself, so that what is sent and
/// what is announced agree.
pub fn encode(out: &mut Vec<u8>, parts: &request::Parts, body: &UpstreamBody) -> Framing {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let announced = parts.headers.contains_key(CONTENT_LENGTH);
    let framing = match body.size_hint().exact() {
        Some(len) => {
            // A POST, PUT or PATCH without a body still says so: some servers answer
            // 411 Length Required otherwise.
            let say_zero =
                len == 0 && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
            if !announced && (len > 0 || say_zero) {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Framing::Length(len)
        }
        None => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    for (name, value) in &parts.headers {
        let framing_header =
            *name == TRANSFER_ENCODING || (*name == CONTENT_LENGTH && framing == Framing::Chunked);
        if framing_header {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(request: http::Request<()>, body: &UpstreamBody) -> (String, Framing) {
        let (parts, ()) = request.into_parts();
        let mut out = Vec::new();
        let framing = encode(&mut out, &parts, body);
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn a_bodiless_get_is_its_line_and_headers() {
        let request = http::Request::get("/a/b?c=d")
            .header("host", "example.com")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .unwrap();
        let (text, framing) = head(request, &UpstreamBody::Empty);
        assert_eq!(
            text,
            "GET /a/b?c=d HTTP/1.1\r\nhost: example.com\r\nx-two: 1\r\nx-two: 2\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(0));
    }

    #[test]
    fn a_bodiless_post_says_its_length_is_zero_once() {
        let post = http::Request::post("/").body(()).unwrap();
        let (text, _) = head(post, &UpstreamBody::Empty);
        assert_eq!(text, "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        let post = http::Request::post("/")
            .header("content-length", "0")
            .body(())
            .unwrap();
        let (text, _) = head(post, &UpstreamBody::Empty);
        assert_eq!(text, "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    }
}
