//! Any bytes from an instance, delivered in pieces of any size: the response head
//! parser, the framing rules and the chunked decoder never panic, and reading the bytes
//! in pieces gives exactly what reading them whole gives (the state kept between reads
//! loses and invents nothing).
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use splitgate::upstream::h1::chunked::{Decoder, Step};
use splitgate::upstream::h1::head::{self, BodyLength};

#[derive(Debug, PartialEq)]
enum Read {
    /// The bytes ended before the message did.
    Incomplete,
    Refused(&'static str),
    Message {
        status: u16,
        body: Vec<u8>,
        trailers: Vec<(String, Vec<u8>)>,
        rest: usize,
    },
}

fn read(wire: &[u8], piece: usize) -> Read {
    let mut input = wire.chunks(piece);
    let mut buf = BytesMut::new();
    let mut more = |buf: &mut BytesMut| match input.next() {
        Some(bytes) => {
            buf.extend_from_slice(bytes);
            true
        }
        None => false,
    };
    let parts = loop {
        match head::parse(&mut buf) {
            Ok(Some(parts)) if parts.status.is_informational() && parts.status != 101 => {}
            Ok(Some(parts)) => break parts,
            Ok(None) if more(&mut buf) => {}
            Ok(None) => return Read::Incomplete,
            Err(problem) => return Read::Refused(problem),
        }
    };
    let mut parts = parts;
    let length = match head::body_length(&mut parts, false) {
        Ok((length, _)) => length,
        Err(problem) => return Read::Refused(problem),
    };
    let (mut body, mut trailers) = (Vec::new(), Vec::new());
    match length {
        BodyLength::Empty | BodyLength::Switched => {}
        BodyLength::Exact(n) => {
            while (body.len() as u64) < n {
                if buf.is_empty() && !more(&mut buf) {
                    return Read::Incomplete;
                }
                let take = (n - body.len() as u64).min(buf.len() as u64) as usize;
                body.extend_from_slice(&buf.split_to(take));
            }
        }
        BodyLength::UntilClose => {
            while !buf.is_empty() || more(&mut buf) {
                body.extend_from_slice(&buf.split());
            }
        }
        BodyLength::Chunked => {
            let mut decoder = Decoder::Size;
            loop {
                match decoder.step(&mut buf) {
                    Ok(Step::Data(data)) => body.extend_from_slice(&data),
                    Ok(Step::Trailers(map)) => {
                        trailers = map
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                            .collect()
                    }
                    Ok(Step::End) => break,
                    Ok(Step::NeedMore) if more(&mut buf) => {}
                    Ok(Step::NeedMore) => return Read::Incomplete,
                    Err(problem) => return Read::Refused(problem),
                }
            }
        }
    }
    let mut rest = buf.len();
    while more(&mut buf) {
        rest = buf.len();
    }
    Read::Message {
        status: parts.status.as_u16(),
        body,
        trailers,
        rest,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, wire)) = data.split_first() else {
        return;
    };
    let whole = read(wire, wire.len().max(1));
    let pieces = read(wire, usize::from(piece % 64).max(1));
    assert_eq!(whole, pieces);
});
