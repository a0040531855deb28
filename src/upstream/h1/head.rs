//! The instance's response head: parsed with httparse (strictly: no obsolete line
//! folding, no space before a colon), and the framing of the body that follows
//! (RFC 9112 §6.3), refusing what two readers could read differently.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{response, HeaderMap, StatusCode, Version};

/// At most this many header lines in a response head (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// A response head larger than this is refused.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body: a response to HEAD, a 204 or a 304.
    Empty,
    /// `Content-Length` bytes.
    Exact(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the instance closes the connection.
    UntilClose,
    /// `101 Switching Protocols`: the connection now carries another protocol.
    Switched,
}

/// Where one header's name and value lie in the head.
#[derive(Clone, Copy, Default)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

/// Parses a complete response head off the front of `read`, if one is there. Header
/// values keep pointing into the read buffer (no copy); the bytes after the head stay
/// in `read`.
pub fn parse(read: &mut BytesMut) -> Result<Option<response::Parts>, &'static str> {
    let mut spans = [Span::default(); MAX_HEADERS];
    let (len, code, version, count) = {
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            read,
            &mut raw,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if read.len() > MAX_HEAD_BYTES => {
                return Err("response head larger than 64 KiB")
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err("more than 100 response headers"),
            Err(_) => return Err("malformed response head"),
        };
        let base = read.as_ptr() as usize;
        let at = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
        for (span, header) in spans.iter_mut().zip(response.headers.iter()) {
            *span = Span {
                name: at(header.name.as_bytes()),
                value: at(header.value),
            };
        }
        let code = response.code.unwrap_or_default();
        (len, code, response.version, response.headers.len())
    };
    if len > MAX_HEAD_BYTES {
        return Err("response head larger than 64 KiB");
    }
    let head = read.split_to(len).freeze();
    // Room for what the proxy adds (Via, X-Request-Id, the variant header, a cookie),
    // so the map is not rehashed into a larger one for them.
    let mut headers = HeaderMap::with_capacity(count + 6);
    for span in &spans[..count] {
        let (start, len) = (span.name.0 as usize, span.name.1 as usize);
        let name = HeaderName::from_bytes(&head[start..start + len])
            .map_err(|_| "invalid response header name")?;
        let (start, len) = (span.value.0 as usize, span.value.1 as usize);
        let value = HeaderValue::from_maybe_shared(head.slice(start..start + len))
            .map_err(|_| "invalid response header value")?;
        headers.append(name, value);
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(code).map_err(|_| "invalid response status code")?;
    parts.version = match version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    parts.headers = headers;
    Ok(Some(parts))
}

/// The body's length, and whether the connection can carry another request after it.
/// A response framed two ways at once (both `Transfer-Encoding` and `Content-Length`,
/// differing lengths, chunked not last) is refused: a reader that picked the other
/// framing would see a different next message.
///
/// `Content-Length` is checked on every response, bodiless ones included (a HEAD's
/// answer passes it on to the client), and repeated identical values become one.
pub fn body_length(
    parts: &mut response::Parts,
    to_head_request: bool,
) -> Result<(BodyLength, bool), &'static str> {
    let length = content_length(&mut parts.headers)?;
    let headers = &parts.headers;
    let http11 = parts.version == Version::HTTP_11;
    let close = !http11
        || headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
    let status = parts.status.as_u16();
    if status == 101 {
        return Ok((BodyLength::Switched, false));
    }
    let te = headers.get_all(TRANSFER_ENCODING);
    let chunked = match te.iter().next() {
        None => None,
        Some(_) if headers.contains_key(CONTENT_LENGTH) => {
            return Err("both Transfer-Encoding and Content-Length")
        }
        Some(_) if !http11 => return Err("Transfer-Encoding in an HTTP/1.0 response"),
        Some(_) => {
            let codings: Vec<&[u8]> = te
                .iter()
                .flat_map(|value| value.as_bytes().split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .collect();
            let is_chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
            let last_chunked = codings.last().is_some_and(|c| is_chunked(c));
            let times = codings.iter().filter(|c| is_chunked(c)).count();
            if times > usize::from(last_chunked) {
                return Err("chunked applied more than once, or not last");
            }
            Some(last_chunked)
        }
    };
    if to_head_request || status == 204 || status == 304 {
        return Ok((BodyLength::Empty, !close));
    }
    match chunked {
        Some(true) => return Ok((BodyLength::Chunked, !close)),
        // Another coding last: the body runs to the end of the connection.
        Some(false) => return Ok((BodyLength::UntilClose, false)),
        None => {}
    }
    Ok(match length {
        Some(0) => (BodyLength::Empty, !close),
        Some(n) => (BodyLength::Exact(n), !close),
        None => (BodyLength::UntilClose, false),
    })
}

/// The response's `Content-Length`, if it has one: plain digits, and the same in every
/// field that gives it (then kept as one field).
fn content_length(headers: &mut HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    let mut fields = 0;
    for value in headers.get_all(CONTENT_LENGTH) {
        let n = plain_length(value.as_bytes()).ok_or("Content-Length is not a plain number")?;
        if length.is_some_and(|l| l != n) {
            return Err("differing Content-Length values");
        }
        length = Some(n);
        fields += 1;
    }
    if fields > 1 {
        if let Some(first) = headers.get(CONTENT_LENGTH).cloned() {
            headers.insert(CONTENT_LENGTH, first);
        }
    }
    Ok(length)
}

/// A `Content-Length` value as the proxy accepts it, both ways: 1 to 19 ASCII digits
/// and nothing else (no sign, no spaces, no list).
pub fn plain_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<response::Parts>, &'static str> {
        parse(&mut BytesMut::from(text))
    }

    fn length(text: &str) -> Result<(BodyLength, bool), &'static str> {
        body_length(&mut head(text).unwrap().unwrap(), false)
    }

    #[test]
    fn a_head_is_parsed_and_the_rest_stays_in_the_buffer() {
        let mut read =
            BytesMut::from("HTTP/1.1 200 OK\r\nServer: nginx\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody");
        let parts = parse(&mut read).unwrap().unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers["server"], "nginx");
        assert_eq!(parts.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&read[..], b"body");

        assert!(head("HTTP/1.1 200 OK\r\nServer: ng").unwrap().is_none());
        assert!(
            head("HTTP/1.0 404 Not Found\r\n\r\n")
                .unwrap()
                .unwrap()
                .version
                == Version::HTTP_10
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\nFolded: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nSpace : a\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{bad:?}");
        }
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "a: b\r\n".repeat(101));
        assert_eq!(head(&many).unwrap_err(), "more than 100 response headers");
        let huge = format!("HTTP/1.1 200 OK\r\na: {}", "b".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&huge).unwrap_err(), "response head larger than 64 KiB");
    }

    #[test]
    fn bodies_are_framed_by_rfc_9112() {
        use BodyLength::*;
        assert_eq!(
            length("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Ok((Exact(5), true))
        );
        assert_eq!(
            length("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Ok((Empty, true))
        );
        assert_eq!(
            length("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Ok((Chunked, true))
        );
        assert_eq!(length("HTTP/1.1 200 OK\r\n\r\n"), Ok((UntilClose, false)));
        assert_eq!(
            length("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Ok((UntilClose, false))
        );
        assert_eq!(
            length("HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\n"),
            Ok((Exact(2), false))
        );
        assert_eq!(
            length("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"),
            Ok((Exact(2), false))
        );
        assert_eq!(length("HTTP/1.1 204 No Content\r\n\r\n"), Ok((Empty, true)));
        assert_eq!(
            length("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            Ok((Empty, true))
        );
        assert_eq!(
            length("HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Ok((Switched, false))
        );
        assert_eq!(
            length("HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n"),
            Ok((Exact(3), true))
        );
        let mut parts = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(body_length(&mut parts, true), Ok((Empty, true)));
        // Repeated identical lengths are passed on as one.
        let mut parts = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(body_length(&mut parts, false), Ok((Exact(3), true)));
        assert_eq!(parts.headers.get_all(CONTENT_LENGTH).iter().count(), 1);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: abc\r\n\r\n",
        ] {
            assert!(length(bad).is_err(), "{bad:?}");
        }
        // A HEAD's answer has no body, but its Content-Length goes to the client.
        let mut parts = head("HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(body_length(&mut parts, true).is_err());
    }
}
