//! The bits of the gRPC wire protocol a forwarder needs: status codes, the
//! `grpc-timeout` header, and trailers-only responses for calls it answers itself;
//! and for the calls it makes or serves itself, message framing and status messages.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response};

pub const OK: u32 = 0;
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const NOT_FOUND: u32 = 5;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;

const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A status code's name; numbers gRPC does not define read as UNKNOWN, as gRPC reads them.
pub fn code_name(code: u32) -> &'static str {
    NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

// Header names as constants: a `&str` key is parsed and checked on every use.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// `grpc-timeout` (1 to 8 ASCII digits, then a unit) as a duration; `None` when the
/// header breaks that rule, which gRPC servers answer with INTERNAL.
pub fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    // `u64::from_str` would also take a leading `+`.
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A duration as `grpc-timeout`: the finest unit whose value fits in 8 digits.
pub fn format_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos().max(1);
    let (value, unit) = if nanos <= MAX {
        (nanos, 'n')
    } else if nanos / 1_000 <= MAX {
        (nanos.div_ceil(1_000), 'u')
    } else if nanos / 1_000_000 <= MAX {
        (nanos.div_ceil(1_000_000), 'm')
    } else if nanos / 1_000_000_000 <= MAX {
        (nanos.div_ceil(1_000_000_000), 'S')
    } else {
        ((nanos / 60_000_000_000).min(MAX), 'M')
    };
    HeaderValue::from_str(&format!("{value}{unit}")).expect("digits and a unit are a valid header")
}

/// The status a response's headers or trailers carry, if any.
pub fn status_of(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The `grpc-message` of a response's headers or trailers, decoded.
pub fn message_of(headers: &HeaderMap) -> String {
    let Some(raw) = headers.get(GRPC_MESSAGE) else {
        return String::new();
    };
    let raw = raw.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `message` as one uncompressed gRPC message frame.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Cuts whole messages out of a stream of DATA frames.
pub struct Deframer {
    buffer: BytesMut,
    limit: usize,
}

impl Deframer {
    /// Messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Deframer {
            buffer: BytesMut::new(),
            limit,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    /// The next whole message, if one has arrived; an error for what gRPC forbids here.
    pub fn next(&mut self) -> Result<Option<Bytes>, &'static str> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        if self.buffer[0] != 0 {
            return Err("a compressed message, which was not asked for");
        }
        let size = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]);
        let size = size as usize;
        if size > self.limit {
            return Err("a message over the size limit");
        }
        if self.buffer.len() < 5 + size {
            return Ok(None);
        }
        self.buffer.advance(5);
        Ok(Some(self.buffer.split_to(size).freeze()))
    }

    /// Whether a message was left half-received.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }
}

/// `grpc-message` is percent-encoded UTF-8: everything outside printable ASCII, and `%`.
fn encode_message(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("percent-encoded text is a valid header")
}

/// Headers of a trailers-only response: the call ends with `code` and `message`.
pub fn trailers_only<B>(code: u32, message: &str, body: B) -> Response<B> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    if !message.is_empty() {
        headers.insert(GRPC_MESSAGE, encode_message(message));
    }
    response
}

/// The status a client sees when its stream is reset with `reason` (gRPC's HTTP/2 mapping).
pub fn code_for_reset(reason: h2::Reason) -> u32 {
    match reason {
        h2::Reason::REFUSED_STREAM => UNAVAILABLE,
        h2::Reason::CANCEL => CANCELLED,
        h2::Reason::ENHANCE_YOUR_CALM => RESOURCE_EXHAUSTED,
        h2::Reason::INADEQUATE_SECURITY => 7,
        _ => INTERNAL,
    }
}

/// The status for a failed upstream exchange: a reset stream maps by its reason; a
/// connection that failed or closed is UNAVAILABLE (the call can go elsewhere).
pub fn code_for_error(error: &h2::Error) -> u32 {
    if error.is_go_away() || error.is_io() {
        return UNAVAILABLE;
    }
    match error.reason() {
        Some(reason) if error.is_reset() && error.is_remote() => code_for_reset(reason),
        _ => UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_trip() {
        for d in [
            Duration::from_nanos(5),
            Duration::from_millis(1500),
            Duration::from_secs(3 * 86_400),
        ] {
            let back = parse_timeout(&format_timeout(d)).unwrap();
            assert!(
                back >= d && back - d < Duration::from_secs(60),
                "{d:?} -> {back:?}"
            );
        }
        assert_eq!(
            parse_timeout(&HeaderValue::from_static("100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_timeout(&HeaderValue::from_static("123456789S")), None);
        for bad in [
            "10x",
            "S",
            "+5S",
            "-5S",
            " 5S",
            "5 S",
            "1.5S",
            "123456789S",
            "",
        ] {
            assert_eq!(
                parse_timeout(&HeaderValue::from_static(bad)),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("50% off\né"), "50%25 off%0A%C3%A9");
    }

    #[test]
    fn status_messages_are_decoded_and_bad_escapes_kept() {
        for (sent, read) in [("50% off\né", "50% off\né"), ("", "")] {
            let mut headers = HeaderMap::new();
            headers.insert(GRPC_MESSAGE, encode_message(sent));
            assert_eq!(message_of(&headers), read);
        }
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_MESSAGE, HeaderValue::from_static("100%zz done%"));
        assert_eq!(message_of(&headers), "100%zz done%");
    }

    #[test]
    fn messages_come_out_whole_however_the_frames_cut_them() {
        let stream = [frame(b"one"), frame(b""), frame(&[7; 300])].concat();
        for cut in [1, 2, 5, 7, 64, stream.len()] {
            let mut deframer = Deframer::new(1024);
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                deframer.push(piece);
                while let Some(message) = deframer.next().unwrap() {
                    got.push(message);
                }
            }
            assert_eq!(got, [&b"one"[..], b"", &[7; 300]], "cut {cut}");
            assert!(deframer.is_empty());
        }
        let mut deframer = Deframer::new(10);
        deframer.push(&frame(&[0; 11]));
        assert!(deframer.next().is_err());
        let mut deframer = Deframer::new(10);
        deframer.push(&[1, 0, 0, 0, 1, 9]);
        assert!(deframer.next().is_err());
    }
}
