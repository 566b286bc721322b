//! The bits of the gRPC wire protocol a forwarder needs: status codes, the
//! `grpc-timeout` header, and trailers-only responses for calls it answers itself.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response};

pub const OK: u32 = 0;
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;

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
        headers.insert("grpc-message", encode_message(message));
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
}
