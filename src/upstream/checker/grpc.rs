//! The gRPC health check (`grpc.health.v1.Health/Check`, as Envoy, Kubernetes' gRPC
//! probes and grpc-health-probe ask it): one unary call over HTTP/2; the instance
//! passes when the call succeeds and says SERVING. Its two messages are one field
//! each, so they are written and read here rather than with a protobuf compiler.

use bytes::{BufMut, Bytes, BytesMut};

/// The method's path.
pub const PATH: &str = "/grpc.health.v1.Health/Check";

/// The longest response read: a health answer is a few bytes.
pub const MAX_RESPONSE: usize = 1024;

/// `HealthCheckRequest { service }` in a gRPC frame (not compressed).
pub fn request(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        // Field 1, length-delimited.
        message.put_u8(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.put_slice(service.as_bytes());
    }
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    frame.freeze()
}

/// Whether the response body (one gRPC frame holding `HealthCheckResponse`) says
/// SERVING; otherwise what it says instead.
pub fn serving(body: &[u8]) -> Result<(), String> {
    let [compressed, a, b, c, d, message @ ..] = body else {
        return Err("no health message in the response".into());
    };
    if *compressed != 0 {
        return Err("a compressed health message (none was asked for)".into());
    }
    let length = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    let message = message.get(..length).ok_or("a truncated health message")?;
    match status(message)? {
        1 => Ok(()),
        0 => Err("health status UNKNOWN".into()),
        2 => Err("health status NOT_SERVING".into()),
        3 => Err("health status SERVICE_UNKNOWN".into()),
        other => Err(format!("health status {other}")),
    }
}

/// Field 1 (`status`, an enum) of `HealthCheckResponse`; 0 when absent, as protobuf
/// reads a missing field. Other fields are skipped.
fn status(mut message: &[u8]) -> Result<u64, String> {
    let mut status = 0;
    while !message.is_empty() {
        let key = varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut message)?,
            (_, 0) => {
                varint(&mut message)?;
            }
            (_, 1) => message = message.get(8..).ok_or("a truncated field")?,
            (_, 2) => {
                let length = varint(&mut message)? as usize;
                message = message.get(length..).ok_or("a truncated field")?;
            }
            (_, 5) => message = message.get(4..).ok_or("a truncated field")?,
            (_, wire) => return Err(format!("an unreadable health message (wire type {wire})")),
        }
    }
    Ok(status)
}

fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or("a truncated varint")?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint longer than 10 bytes".into())
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_messages() {
        assert_eq!(&request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &request("api")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'p', b'i']
        );
        let long = "s".repeat(200);
        let framed = request(&long);
        assert_eq!(&framed[5..8], &[0x0a, 0xc8, 0x01]);
        assert_eq!(framed.len(), 5 + 3 + 200);
    }

    #[test]
    fn only_serving_passes() {
        assert!(serving(&[0, 0, 0, 0, 2, 0x08, 1]).is_ok());
        // An unknown field before the status is skipped.
        assert!(serving(&[0, 0, 0, 0, 6, 0x12, 2, b'h', b'i', 0x08, 1]).is_ok());
        let says = |body: &[u8]| serving(body).unwrap_err();
        assert!(says(&[0, 0, 0, 0, 2, 0x08, 2]).contains("NOT_SERVING"));
        assert!(says(&[0, 0, 0, 0, 2, 0x08, 3]).contains("SERVICE_UNKNOWN"));
        assert!(says(&[0, 0, 0, 0, 0]).contains("UNKNOWN"));
        assert!(says(&[0, 0, 0, 0, 9, 0x08]).contains("truncated"));
        assert!(says(&[1, 0, 0, 0, 2, 0x08, 1]).contains("compressed"));
        assert!(says(&[0, 0]).contains("no health message"));
        assert!(says(&[0, 0, 0, 0, 2, 0x0b, 1]).contains("wire type 3"));
    }
}
