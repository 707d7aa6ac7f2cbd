//! What an RPC being served knows about its caller's request that outgoing
//! calls must carry on: the request id (so one user action can be followed
//! across services in the logs) and the caller's deadline (so no peer works on
//! an answer nobody waits for any more).
//!
//! The server layer scopes a [`RequestContext`] around each handler; the client
//! stack reads it with [`current`].

use std::time::{Duration, Instant};

use http::HeaderMap;

/// Metadata key of the request id, read on the way in and sent to peers.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id accepted from a caller; longer ones are replaced, so a
/// client cannot make every log line huge.
const MAX_REQUEST_ID_LEN: usize = 128;

#[derive(Clone, Debug)]
pub struct RequestContext {
    pub request_id: String,
    /// When the caller stops waiting, from its `grpc-timeout`.
    pub deadline: Option<Instant>,
    /// Whether this request's trace is recorded (traces exported and the
    /// request sampled): the spans that exist only for traces are created
    /// only then.
    pub sampled: bool,
}

tokio::task_local! {
    static CONTEXT: RequestContext;
}

impl RequestContext {
    /// Reads the context from incoming HTTP/2 headers, minting a request id
    /// when the caller sent none (or an unusable one).
    #[must_use]
    pub fn from_headers(headers: &HeaderMap, now: Instant) -> Self {
        let request_id = headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned);
        let deadline = headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .and_then(|timeout| now.checked_add(timeout));
        Self {
            request_id,
            deadline,
            sampled: false,
        }
    }

    /// Runs `future` with this context visible to [`current`].
    pub async fn scope<F: std::future::Future>(self, future: F) -> F::Output {
        CONTEXT.scope(self, future).await
    }
}

/// Whether the RPC being served is traced; `None` outside any RPC.
#[must_use]
pub fn sampled() -> Option<bool> {
    CONTEXT.try_with(|c| c.sampled).ok()
}

/// The context of the RPC being served, if any.
#[must_use]
pub fn current() -> Option<RequestContext> {
    CONTEXT.try_with(Clone::clone).ok()
}

/// Parses a gRPC `grpc-timeout` value: at most 8 digits and a unit.
#[must_use]
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long an outgoing call may take: its own budget, cut to what is left of
/// the incoming deadline. `None` means the incoming deadline has passed and
/// the call should not be made at all.
#[must_use]
pub fn outgoing_timeout(per_call: Duration, incoming: Option<Instant>, now: Instant) -> Option<Duration> {
    match incoming {
        None => Some(per_call),
        Some(deadline) => {
            let left = deadline.checked_duration_since(now)?;
            if left.is_zero() {
                None
            } else {
                Some(left.min(per_call))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn an_incoming_deadline_shortens_the_outgoing_timeout() {
        let now = Instant::now();
        let per_call = Duration::from_millis(300);
        assert_eq!(outgoing_timeout(per_call, None, now), Some(per_call));
        assert_eq!(
            outgoing_timeout(per_call, Some(now + Duration::from_millis(50)), now),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            outgoing_timeout(per_call, Some(now + Duration::from_secs(5)), now),
            Some(per_call)
        );
    }

    #[test]
    fn a_passed_incoming_deadline_forbids_the_outgoing_call() {
        let now = Instant::now();
        assert_eq!(outgoing_timeout(Duration::from_secs(1), Some(now), now), None);
        let earlier = now.checked_sub(Duration::from_millis(1)).unwrap_or(now);
        assert_eq!(outgoing_timeout(Duration::from_secs(1), Some(earlier), now), None);
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_minted_otherwise() {
        let now = Instant::now();
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, "abc-123".parse().unwrap());
        headers.insert("grpc-timeout", "100m".parse().unwrap());
        let ctx = RequestContext::from_headers(&headers, now);
        assert_eq!(ctx.request_id, "abc-123");
        assert_eq!(ctx.deadline, Some(now + Duration::from_millis(100)));

        headers.insert(REQUEST_ID_HEADER, "x".repeat(200).parse().unwrap());
        let minted = RequestContext::from_headers(&headers, now).request_id;
        assert_eq!(minted.len(), 32, "a fresh uuid replaces an oversized id");
    }

    #[tokio::test]
    async fn the_context_is_visible_only_inside_its_scope() {
        assert!(current().is_none());
        let ctx = RequestContext {
            request_id: "r1".into(),
            deadline: None,
            sampled: false,
        };
        let seen = ctx.scope(async { current().map(|c| c.request_id) }).await;
        assert_eq!(seen.as_deref(), Some("r1"));
    }
}
