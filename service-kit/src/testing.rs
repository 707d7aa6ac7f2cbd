//! Helpers for the services' tests (feature `testing`): the kinds of token an
//! authorization matrix calls with, in the order of
//! `test_support::authz::CALLERS`.

use std::time::Duration;

use uuid::Uuid;

use crate::{
    auth::{Caller, Claims, Role, TokenSigner, ISSUER},
    events::{Event, Payload, RevocationReason},
};

/// `None` (no token), an expired admin token of `user`, an admin token of
/// `admin` signed by another key, user-service's service token, then valid
/// tokens of `user`, `moderator` and `admin` with those roles.
///
/// # Panics
/// When signing fails (not expected).
#[must_use]
pub fn matrix_tokens(signer: &TokenSigner, user: Uuid, moderator: Uuid, admin: Uuid) -> Vec<Option<String>> {
    let now = chrono::Utc::now().timestamp();
    let valid = |user_id, role| signer.issue(Caller { user_id, role }, now).expect("a token").0;
    let expired = signer
        .sign(&Claims {
            sub: user.to_string(),
            role: Role::Admin,
            iss: ISSUER.into(),
            iat: now - 7200,
            exp: now - 3600,
            scope: None,
        })
        .expect("a token");
    let forged = TokenSigner::generate(Duration::from_secs(600))
        .expect("a key")
        .issue(
            Caller {
                user_id: admin,
                role: Role::Admin,
            },
            now,
        )
        .expect("a token")
        .0;
    let system = signer.service_token(now, Duration::from_secs(600)).expect("a token");
    vec![
        None,
        Some(expired),
        Some(forged),
        Some(system),
        Some(valid(user, Role::User)),
        Some(valid(moderator, Role::Moderator)),
        Some(valid(admin, Role::Admin)),
    ]
}

/// A harmless event of user-service's (a stranger's tokens revoked), for
/// calls that apply user-service's events.
#[must_use]
pub fn revocation_event() -> Event {
    Event::new(
        "user-service",
        Payload::TokensRevoked {
            user_id: Uuid::new_v4(),
            issued_before: chrono::Utc::now(),
            reason: RevocationReason::SessionEnded,
        },
    )
}

/// Strategies for the services' property tests of their request parsing:
/// what a hostile or broken client can put in a request's fields.
pub mod props {
    use proptest::{collection::vec, prelude::*};

    use crate::{error::ServiceError, validate::FieldViolation};

    /// Cases per request type: enough to meet the rare shapes, cheap enough
    /// that every request type of every service runs in seconds.
    pub const CASES: u32 = 10_000;

    /// Text as clients send it and as attackers do: valid ids and plain
    /// words, anything Unicode (combining marks, zero-width and bidi
    /// controls, emoji, NUL and other control characters), whitespace only,
    /// and text far past every bound.
    pub fn text() -> impl Strategy<Value = String> {
        // Built from characters rather than regexes: a regex-driven
        // generator costs milliseconds a case in a debug build.
        let edge = prop_oneof![
            Just('\u{0}'),
            Just('\u{7}'),
            Just('\u{200b}'),
            Just('\u{200d}'),
            Just('\u{202e}'),
            Just('\u{301}'),
            Just('\u{feff}'),
            Just('\u{fffd}'),
            Just('\u{1f600}'),
            Just('\u{10ffff}'),
            Just('\u{a0}'),
            Just('\u{3000}'),
            Just('\n'),
            Just(' '),
            Just('a'),
            Just('é'),
            Just('-'),
            Just('_'),
        ];
        prop_oneof![
            3 => vec(any::<char>(), 0..40).prop_map(|chars| chars.into_iter().collect()),
            2 => Just(()).prop_map(|()| uuid::Uuid::now_v7().to_string()),
            2 => vec(edge, 0..100).prop_map(|chars| chars.into_iter().collect()),
            1 => (0..6usize).prop_map(|n| " ".repeat(n)),
            1 => (270..300usize, prop_oneof![Just("a"), Just("é"), Just("😀")]).prop_map(|(n, c)| c.repeat(n)),
            1 => (1000..5000usize).prop_map(|n| "ü".repeat(n)),
        ]
    }

    /// Numbers at and around every edge.
    pub fn number() -> impl Strategy<Value = i32> {
        prop_oneof![
            Just(i32::MIN),
            Just(-1),
            Just(0),
            Just(1),
            Just(20),
            Just(100),
            Just(101),
            Just(i32::MAX),
            0..200i32,
            any::<i32>(),
        ]
    }

    /// A timestamp a client may send: absent, ordinary, or at the edges of
    /// what the wire type holds (nanos out of range included).
    pub fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
        let seconds = prop_oneof![
            Just(i64::MIN),
            Just(-1i64),
            Just(0i64),
            Just(i64::MAX),
            1_700_000_000..1_900_000_000i64,
            any::<i64>()
        ];
        let nanos = prop_oneof![Just(-1), Just(0), Just(999_999_999), Just(1_000_000_000), any::<i32>()];
        proptest::option::of((seconds, nanos).prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }))
    }

    /// A repeated field: empty, a few, or far more than any bound allows.
    pub fn texts() -> impl Strategy<Value = Vec<String>> {
        prop_oneof![
            3 => vec(text(), 0..5),
            // Past the bound on their number: short ones, so that a case
            // stays cheap to make.
            1 => vec(
                prop_oneof![
                    vec(any::<char>(), 0..12).prop_map(|chars| chars.into_iter().collect::<String>()),
                    Just(()).prop_map(|()| uuid::Uuid::now_v7().to_string()),
                ],
                95..110
            ),
            1 => (0..300usize).prop_map(|n| (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect()),
        ]
    }

    /// Every violation names a field the request has, with a reason.
    ///
    /// # Panics
    /// When one does not: what a property test reports.
    pub fn named(violations: &[FieldViolation], fields: &[&str]) {
        assert!(!violations.is_empty(), "INVALID_ARGUMENT with no field violation");
        for v in violations {
            let root = v.field.split(['.', '[']).next().unwrap_or_default();
            assert!(
                fields.contains(&root),
                "a violation of an unknown field {:?}: {v:?}",
                v.field
            );
            assert!(!v.description.is_empty(), "a violation without a reason: {v:?}");
        }
    }

    /// Parsed, or INVALID_ARGUMENT naming only `fields`: nothing else.
    ///
    /// # Panics
    /// On any other error: what a property test reports.
    pub fn only_invalid<T, E: ServiceError>(result: Result<T, E>, fields: &[&str]) {
        match result {
            Ok(_) => {}
            Err(err) => match err.violations() {
                Some(violations) => named(violations, fields),
                None => panic!("parsing failed with {err:?}, not INVALID_ARGUMENT"),
            },
        }
    }
}
