//! An independent reading of HTTP/1.1 message framing on the client connection.
//!
//! hyper resolves some ambiguous requests on its own instead of refusing them: with
//! both Content-Length and Transfer-Encoding it drops Content-Length and reads chunked;
//! a repeated identical Content-Length is folded into one. By the time the request
//! reaches the service, the evidence is gone. A front proxy that quietly "fixes" such a
//! request is the classic request-smuggling setup, so splitgate refuses them instead.
//!
//! The scanner sees every byte the connection reads, before hyper does. It finds each
//! request head, checks its framing headers, and follows the body (by length or by
//! chunks) to the next head. The first bad head is recorded by its sequence number;
//! the service answers that request with 400 and closes. The scanner stops at HTTP/2,
//! a CONNECT, an opened upgrade tunnel, or anything it cannot follow; hyper's own
//! checks and the service's still apply there.

use std::mem::MaybeUninit;

/// Why a request head was refused.
pub type Rejection = &'static str;

/// Heads longer than this are hyper's to refuse (431); the scanner stops following.
pub const MAX_HEAD: usize = 256 * 1024;
pub const MAX_HEADERS: usize = 256;

enum State {
    /// Reading a request head into `head`.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    Chunked(Chunk),
    /// Not following any more (HTTP/2, upgrade, gave up, or a rejection was recorded).
    Stopped,
}

#[derive(Clone, Copy)]
enum Chunk {
    /// Reading the chunk-size line; the value so far and whether an extension began.
    Size {
        value: u64,
        digits: u8,
        extension: bool,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// Reading trailer lines; `line_len` bytes of the current line seen.
    Trailer {
        line_len: usize,
        cr: bool,
    },
}

/// The per-connection scanner.
pub struct HeadScanner {
    state: State,
    head: Vec<u8>,
    /// Number of complete request heads seen so far.
    heads: u64,
}

/// What feeding bytes produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Finding {
    Nothing,
    /// The head with this sequence number (0-based) is bad.
    Rejected {
        sequence: u64,
        reason: Rejection,
    },
}

impl Default for HeadScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl HeadScanner {
    pub fn new() -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            heads: 0,
        }
    }

    /// Complete request heads seen so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Whether everything fed so far makes whole requests (heads and bodies): the
    /// connection is between two requests, with no part of the next one read.
    pub fn at_rest(&self) -> bool {
        matches!(self.state, State::Head) && self.head.is_empty()
    }

    /// Feeds bytes read from the client, in order.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Finding {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Stopped => return Finding::Nothing,
                State::Head => {
                    if self.head.is_empty() {
                        // Empty lines before a request line are allowed (RFC 9112 §2.2).
                        let skip = bytes
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            break;
                        }
                        // The usual case: the whole head arrived in one read; judge it in place.
                        if let Some(end) = find_end(bytes) {
                            let (head, rest) = bytes.split_at(end);
                            bytes = rest;
                            if let Some(finding) = self.finish_head(head) {
                                return finding;
                            }
                            continue;
                        }
                    }
                    let searched_from = self.head.len().saturating_sub(3);
                    let take = bytes
                        .len()
                        .min(MAX_HEAD + 4 - self.head.len().min(MAX_HEAD));
                    self.head.extend_from_slice(&bytes[..take]);
                    match find_end(&self.head[searched_from..]) {
                        Some(end) => {
                            let head_len = searched_from + end;
                            let rest_in_head = self.head.len() - head_len;
                            // Bytes after the head go back to the loop as body.
                            bytes = &bytes[take - rest_in_head..];
                            let head = std::mem::take(&mut self.head);
                            let finding = self.finish_head(&head[..head_len]);
                            self.head = head;
                            self.head.clear();
                            if let Some(finding) = finding {
                                return finding;
                            }
                        }
                        None if self.head.len() > MAX_HEAD => {
                            self.stop();
                            return Finding::Nothing;
                        }
                        None => return Finding::Nothing,
                    }
                }
                State::Body(remaining) => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    bytes = &bytes[n as usize..];
                    if *remaining == 0 {
                        self.state = State::Head;
                    }
                }
                State::Chunked(chunk) => {
                    let (consumed, next) = step_chunked(*chunk, bytes);
                    bytes = &bytes[consumed..];
                    match next {
                        Some(Some(chunk)) => self.state = State::Chunked(chunk),
                        Some(None) => self.state = State::Head,
                        None => self.stop(),
                    }
                }
            }
        }
        Finding::Nothing
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.head = Vec::new();
    }

    /// Counts a complete head, judges it, and sets the state for its body. Returns a
    /// finding when the head is refused.
    fn finish_head(&mut self, head: &[u8]) -> Option<Finding> {
        let sequence = self.heads;
        self.heads += 1;
        match judge(head) {
            Ok(next) => {
                if matches!(next, State::Stopped) {
                    self.stop();
                } else {
                    self.state = next;
                }
                None
            }
            Err(reason) => {
                self.stop();
                Some(Finding::Rejected { sequence, reason })
            }
        }
    }
}

/// Checks one request head; returns the state for its body.
fn judge(head: &[u8]) -> Result<State, Rejection> {
    if head.starts_with(b"PRI * HTTP/2.0") {
        return Ok(State::Stopped);
    }
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        // hyper will refuse what httparse cannot read; nothing more to follow.
        _ => return Ok(State::Stopped),
    }
    let http10 = request.version == Some(0);
    let mut content_length: Option<&[u8]> = None;
    let mut content_lengths = 0;
    let mut transfer_encodings = 0;
    let mut chunked_only = true;
    // CONNECT is refused by the service (and the connection closed); nothing follows.
    // An `Upgrade` request is followed like any other: the upstream may decline it, and
    // then the connection carries on as HTTP. When a tunnel does open, the connection
    // stops the scan itself (`Activity::tunnel_opened`).
    let connect = request.method == Some("CONNECT");
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            content_lengths += 1;
            content_length = Some(header.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings += 1;
            chunked_only &= header.value.eq_ignore_ascii_case(b"chunked");
        }
    }
    if content_lengths > 0 && transfer_encodings > 0 {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if content_lengths > 1 {
        return Err("more than one Content-Length");
    }
    let body = if transfer_encodings > 0 {
        if http10 {
            return Err("Transfer-Encoding on HTTP/1.0");
        }
        if transfer_encodings != 1 || !chunked_only {
            return Err("Transfer-Encoding other than exactly \"chunked\"");
        }
        State::Chunked(Chunk::Size {
            value: 0,
            digits: 0,
            extension: false,
        })
    } else if let Some(value) = content_length {
        if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
            return Err("Content-Length is not a plain number");
        }
        let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if n == 0 {
            State::Head
        } else {
            State::Body(n)
        }
    } else {
        State::Head
    };
    Ok(if connect { State::Stopped } else { body })
}

/// Position just past the first "\r\n\r\n" in `bytes`.
fn find_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// Advances the chunked-body reader over `bytes`. Returns bytes consumed and the next
/// state: `Some(Some(chunk))` to continue, `Some(None)` at the end of the body, `None`
/// when the body is malformed (hyper will fail it; the scanner stops following).
fn step_chunked(mut chunk: Chunk, bytes: &[u8]) -> (usize, Option<Option<Chunk>>) {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        chunk = match chunk {
            Chunk::Size {
                value,
                digits,
                extension,
            } => match b {
                b'\r' => Chunk::SizeLf { value },
                _ if extension => Chunk::Size {
                    value,
                    digits,
                    extension,
                },
                b';' => Chunk::Size {
                    value,
                    digits,
                    extension: true,
                },
                _ if b.is_ascii_hexdigit() && digits < 16 => {
                    let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                    Chunk::Size {
                        value: value * 16 + digit,
                        digits: digits + 1,
                        extension,
                    }
                }
                _ => return (i, None),
            },
            Chunk::SizeLf { value } => match b {
                b'\n' if value == 0 => Chunk::Trailer {
                    line_len: 0,
                    cr: false,
                },
                b'\n' => Chunk::Data(value),
                _ => return (i, None),
            },
            Chunk::Data(remaining) => {
                let n = remaining.min((bytes.len() - i) as u64);
                i += n as usize;
                chunk = if remaining == n {
                    Chunk::DataCr
                } else {
                    Chunk::Data(remaining - n)
                };
                continue;
            }
            Chunk::DataCr => match b {
                b'\r' => Chunk::DataLf,
                _ => return (i, None),
            },
            Chunk::DataLf => match b {
                b'\n' => Chunk::Size {
                    value: 0,
                    digits: 0,
                    extension: false,
                },
                _ => return (i, None),
            },
            Chunk::Trailer { line_len, cr } => match (b, cr) {
                (b'\r', false) => Chunk::Trailer { line_len, cr: true },
                (b'\n', true) if line_len == 0 => return (i + 1, Some(None)),
                (b'\n', true) => Chunk::Trailer {
                    line_len: 0,
                    cr: false,
                },
                (_, false) if line_len < 8192 => Chunk::Trailer {
                    line_len: line_len + 1,
                    cr: false,
                },
                _ => return (i, None),
            },
        };
        i += 1;
    }
    (i, Some(Some(chunk)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(parts: &[&[u8]]) -> Vec<Finding> {
        let mut scanner = HeadScanner::new();
        parts
            .iter()
            .map(|p| scanner.feed(p))
            .filter(|f| *f != Finding::Nothing)
            .collect()
    }

    fn rejected(sequence: u64) -> impl Fn(&[Finding]) -> bool {
        move |f| matches!(f, [Finding::Rejected { sequence: s, .. }] if *s == sequence)
    }

    #[test]
    fn clean_pipelined_requests_pass() {
        let stream: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(scan(&[stream]).is_empty());
        // The same, one byte at a time.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert!(scan(&bytes).is_empty());
    }

    #[test]
    fn smuggling_shapes_are_flagged_at_their_sequence_number() {
        let first_ok = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
        ] {
            assert!(rejected(1)(&scan(&[first_ok, bad])), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_not_heads() {
        let body = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        assert!(scan(&[head.as_bytes(), body]).is_empty());
    }

    #[test]
    fn http2_and_connect_stop_the_scan() {
        assert!(scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"garbage\r\n\r\n"]).is_empty());
        let connect = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        assert!(scan(&[connect, b"\x16\x03\x01 tls bytes\r\n\r\n"]).is_empty());
    }

    /// An upgrade the upstream declines leaves an HTTP connection: what follows the
    /// upgrade request is still judged (the h2c-smuggling shape).
    #[test]
    fn an_upgrade_request_does_not_stop_the_scan() {
        let upgrade = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n";
        let smuggled =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(rejected(1)(&scan(&[upgrade, smuggled])));
    }
}
