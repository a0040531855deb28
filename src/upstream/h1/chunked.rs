//! The chunked transfer coding (RFC 9112 §7.1), both ways: decoding a response body
//! from the read buffer, and the chunk-size lines of a request body sent chunked.
//!
//! Decoding is strict: every line ends in CRLF, a chunk size is 1 to 16 hex digits,
//! an extension is bounded, and the data must be followed by CRLF. A message an
//! upstream frames loosely is refused rather than guessed at, so that nothing after it
//! on the connection is read as a response.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// Longest chunk-size line (size and extensions) accepted.
const MAX_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most trailer fields accepted.
const MAX_TRAILER_FIELDS: usize = 32;

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Size,
    /// Data bytes left in the current chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

/// One step of decoding.
#[derive(Debug, PartialEq)]
pub enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The last chunk and the trailer section are in: the body is complete.
    End,
    /// The buffer holds no more of the body.
    NeedMore,
}

impl Decoder {
    /// Decodes the next piece of the body from the front of `read`.
    pub fn step(&mut self, read: &mut BytesMut) -> Result<Step, &'static str> {
        loop {
            match *self {
                Decoder::Done => return Ok(Step::End),
                Decoder::Size => {
                    let window = &read[..read.len().min(MAX_LINE)];
                    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
                        if read.len() >= MAX_LINE {
                            return Err("chunk size line too long");
                        }
                        return Ok(Step::NeedMore);
                    };
                    let size = chunk_size(&read[..lf])?;
                    read.advance(lf + 1);
                    *self = match size {
                        0 => Decoder::Trailers,
                        n => Decoder::Data(n),
                    };
                }
                Decoder::Data(left) => {
                    if read.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = left.min(read.len() as u64);
                    let data = read.split_to(n as usize).freeze();
                    *self = match left - n {
                        0 => Decoder::DataEnd,
                        left => Decoder::Data(left),
                    };
                    return Ok(Step::Data(data));
                }
                Decoder::DataEnd => {
                    if read.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &read[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    read.advance(2);
                    *self = Decoder::Size;
                }
                Decoder::Trailers => {
                    if read.starts_with(b"\r\n") {
                        read.advance(2);
                        *self = Decoder::Done;
                        return Ok(Step::End);
                    }
                    let Some(trailers) = trailers(read)? else {
                        return Ok(Step::NeedMore);
                    };
                    *self = Decoder::Done;
                    return Ok(Step::Trailers(trailers));
                }
            }
        }
    }
}

/// The size on a chunk-size line (without its LF): hex digits, then optionally
/// extensions after a `;`, then CR.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or("chunk size line not ended by CRLF")?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err("chunk size is not 1 to 16 hex digits");
    }
    let rest = &line[digits..];
    let extensions = rest.trim_ascii_start();
    if !rest.is_empty() && !extensions.starts_with(b";") {
        return Err("chunk size followed by something other than an extension");
    }
    if extensions
        .iter()
        .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err("control character in a chunk extension");
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| "chunk size")?;
    u64::from_str_radix(text, 16).map_err(|_| "chunk size is not 1 to 16 hex digits")
}

/// A complete trailer section off the front of `read`, or `None` when it is not all in.
fn trailers(read: &mut BytesMut) -> Result<Option<HeaderMap>, &'static str> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    let (len, map) = match httparse::parse_headers(read, &mut fields) {
        Ok(httparse::Status::Complete((len, _))) if len > MAX_TRAILERS => {
            return Err("trailer section larger than 16 KiB")
        }
        Ok(httparse::Status::Complete((len, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| "invalid trailer name")?;
                let value =
                    HeaderValue::from_bytes(field.value).map_err(|_| "invalid trailer value")?;
                map.append(name, value);
            }
            (len, map)
        }
        Ok(httparse::Status::Partial) if read.len() > MAX_TRAILERS => {
            return Err("trailer section larger than 16 KiB")
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("more than 32 trailer fields"),
        Err(_) => return Err("malformed trailer section"),
    };
    read.advance(len);
    Ok(Some(map))
}

/// The line that starts a chunk of `len` bytes, into `out`.
pub fn encode_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(HEX[(len >> (4 * i)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes all of `wire`, fed `piece` bytes at a time.
    fn decode(wire: &[u8], piece: usize) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let mut decoder = Decoder::Size;
        let mut read = BytesMut::new();
        let (mut body, mut trailers) = (Vec::new(), None);
        let mut input = wire.chunks(piece);
        loop {
            match decoder.step(&mut read)? {
                Step::Data(data) => body.extend_from_slice(&data),
                Step::Trailers(t) => trailers = Some(t),
                Step::End => return Ok((body, trailers)),
                Step::NeedMore => match input.next() {
                    Some(bytes) => read.extend_from_slice(bytes),
                    None => return Err("incomplete"),
                },
            }
        }
    }

    #[test]
    fn decodes_chunks_fed_in_any_pieces() {
        let wire = b"5\r\nhello\r\n7;name=\"v\"\r\n, world\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\n";
        for piece in [1, 2, 3, 7, wire.len()] {
            let (body, trailers) = decode(wire, piece).unwrap();
            assert_eq!(body, b"hello, world");
            let trailers = trailers.unwrap();
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x"], "y");
        }
        assert_eq!(
            decode(b"A\r\n0123456789\r\n0\r\n\r\n", 4).unwrap().0,
            b"0123456789"
        );
        assert_eq!(decode(b"0\r\n\r\n", 1).unwrap(), (Vec::new(), None));
    }

    #[test]
    fn loose_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5;\x00\r\nhello\r\n0\r\n\r\n",
            b"00000000000000005\r\nhello\r\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                decode(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_extension = [b"5;".as_slice(), &[b'a'; MAX_LINE], b"\r\n"].concat();
        assert_eq!(
            decode(&long_extension, 8192),
            Err("chunk size line too long")
        );
        // The largest size parses; a body that size simply never completes here.
        assert_eq!(chunk_size(b"ffffffffffffffff\r"), Ok(u64::MAX));
    }

    #[test]
    fn encodes_sizes() {
        for (len, text) in [
            (0, "0\r\n"),
            (5, "5\r\n"),
            (16, "10\r\n"),
            (0xabcdef, "abcdef\r\n"),
        ] {
            let mut out = Vec::new();
            encode_size(&mut out, len);
            assert_eq!(out, text.as_bytes());
        }
        // What the encoder frames, the decoder reads back.
        let mut out = Vec::new();
        encode_size(&mut out, 5);
        out.extend_from_slice(b"hello\r\n0\r\n\r\n");
        assert_eq!(decode(&out, 3).unwrap(), (b"hello".to_vec(), None));
    }
}
