//! Input rules every service shares, and the field violations they produce.
//!
//! Domain types parse with these and collect every problem of a request at
//! once, so a client sees all its mistakes in one INVALID_ARGUMENT.

use std::fmt;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};

/// One problem with one request field (`google.rpc.BadRequest.FieldViolation`
/// on the wire).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// What a field's parser gives when it fails: one violation or several.
pub trait IntoViolations {
    fn into_violations(self) -> Vec<FieldViolation>;
}

impl IntoViolations for FieldViolation {
    fn into_violations(self) -> Vec<FieldViolation> {
        vec![self]
    }
}

impl IntoViolations for Vec<FieldViolation> {
    fn into_violations(self) -> Vec<FieldViolation> {
        self
    }
}

/// The fields of one request, each parsed on its own: [`AllFields::all`]
/// gives every parsed value, or every violation among them, so a caller
/// learns all that is wrong at once and no code path holds "some fields
/// parsed" (`(Username::parse(..), Password::parse(..)).all()?`).
pub trait AllFields {
    type Parsed;

    /// # Errors
    /// The violations of every field that did not parse.
    fn all(self) -> Result<Self::Parsed, Vec<FieldViolation>>;
}

macro_rules! all_fields {
    ($(($($value:ident $error:ident $field:ident),+)),+ $(,)?) => {$(
        impl<$($value, $error: IntoViolations),+> AllFields for ($(Result<$value, $error>,)+) {
            type Parsed = ($($value,)+);

            fn all(self) -> Result<Self::Parsed, Vec<FieldViolation>> {
                let ($($field,)+) = self;
                match ($($field,)+) {
                    ($(Ok($field),)+) => Ok(($($field,)+)),
                    ($($field,)+) => {
                        let mut violations = Vec::new();
                        $(
                            if let Err(error) = $field {
                                violations.extend(error.into_violations());
                            }
                        )+
                        Err(violations)
                    }
                }
            }
        }
    )+};
}

all_fields!(
    (A EA a, B EB b),
    (A EA a, B EB b, C EC c),
    (A EA a, B EB b, C EC c, D ED d),
);

/// A violation of `field`.
#[must_use]
pub fn violation(field: &str, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.to_owned(),
        description: description.into(),
    }
}

/// User-written text: trimmed, `min..=max` characters (Unicode scalar values,
/// not bytes), no control characters except newlines and tabs inside.
///
/// # Errors
/// A violation of `field` saying what is wrong.
pub fn text(field: &str, raw: &str, min: usize, max: usize) -> Result<String, FieldViolation> {
    let trimmed = raw.trim();
    // Counting stops past `max`, so a huge input costs no more than a valid one.
    let count = trimmed.chars().take(max + 1).count();
    if count < min {
        return Err(violation(
            field,
            if min == 1 {
                "must not be empty".to_owned()
            } else {
                format!("must be at least {min} characters")
            },
        ));
    }
    if count > max {
        return Err(violation(field, format!("must be at most {max} characters")));
    }
    if trimmed.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(violation(field, "must not contain control characters"));
    }
    Ok(trimmed.to_owned())
}

/// A UUID in its canonical hyphenated form.
///
/// # Errors
/// A violation of `field`.
pub fn uuid(field: &str, raw: &str) -> Result<uuid::Uuid, FieldViolation> {
    if raw.is_empty() {
        return Err(violation(field, "is required"));
    }
    uuid::Uuid::try_parse(raw)
        .ok()
        .filter(|_| raw.len() == 36)
        .ok_or_else(|| violation(field, "must be a UUID"))
}

/// A list of 1 to `max` UUIDs, duplicates dropped, order kept.
///
/// # Errors
/// A violation of `field` when the list is empty or too long, else one of
/// `field[i]` for each entry that is not a UUID.
pub fn uuid_list(field: &str, raw: &[String], max: usize) -> Result<Vec<uuid::Uuid>, Vec<FieldViolation>> {
    if raw.is_empty() || raw.len() > max {
        return Err(vec![violation(field, format!("must hold 1 to {max} ids"))]);
    }
    let mut violations = Vec::new();
    let mut ids = Vec::with_capacity(raw.len());
    for (i, id) in raw.iter().enumerate() {
        match uuid(&format!("{field}[{i}]"), id) {
            Ok(id) if !ids.contains(&id) => ids.push(id),
            Ok(_) => {}
            Err(v) => violations.push(v),
        }
    }
    if violations.is_empty() {
        Ok(ids)
    } else {
        Err(violations)
    }
}

/// Default number of items in a page.
pub const DEFAULT_PAGE_SIZE: u32 = 20;
/// Largest page a client may ask for.
pub const MAX_PAGE_SIZE: u32 = 100;

/// `page_size`: 0 means the default; 1 to 100 otherwise.
///
/// # Errors
/// A violation of `page_size` when negative or above the maximum.
pub fn page_size(raw: i32) -> Result<u32, FieldViolation> {
    match u32::try_from(raw) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) if n <= MAX_PAGE_SIZE => Ok(n),
        _ => Err(violation(
            "page_size",
            format!("must be between 0 (default {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}"),
        )),
    }
}

/// Page tokens are opaque to clients: a version tag and a cursor, base64url.
/// The tag lets the cursor format change without old tokens being misread.
const PAGE_TOKEN_TAG: &str = "c1:";
/// Longest page token accepted; real ones are far shorter.
const MAX_PAGE_TOKEN_LEN: usize = 512;

/// Encodes a cursor as an opaque page token.
#[must_use]
pub fn encode_page_token(cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_TAG}{cursor}"))
}

/// Decodes a page token back to its cursor; `None` for the first page.
///
/// # Errors
/// A violation of `page_token` when it is not one this service issued.
pub fn decode_page_token(raw: &str) -> Result<Option<String>, FieldViolation> {
    if raw.is_empty() {
        return Ok(None);
    }
    let invalid = || violation("page_token", "is not a page token from a previous reply");
    if raw.len() > MAX_PAGE_TOKEN_LEN {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    text.strip_prefix(PAGE_TOKEN_TAG)
        .map(|c| Some(c.to_owned()))
        .ok_or_else(invalid)
}

/// The `INVALID_ARGUMENT` status for `violations`, with a
/// `google.rpc.BadRequest` detail listing each one.
#[must_use]
pub fn invalid_argument(violations: &[FieldViolation]) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let summary = violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let details = ErrorDetails::with_bad_request(
        violations
            .iter()
            .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect::<Vec<_>>(),
    );
    tonic::Status::with_error_details(tonic::Code::InvalidArgument, summary, details)
}

/// The `RESOURCE_EXHAUSTED` status of a bound the caller hit, with a
/// `google.rpc.RetryInfo` detail saying when trying again can succeed.
#[must_use]
pub fn resource_exhausted(message: impl Into<String>, retry_after: std::time::Duration) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_fields_give_every_value_or_every_violation() {
        let parsed: Result<(u8, &str), Vec<FieldViolation>> =
            (Ok::<_, FieldViolation>(1), Ok::<_, FieldViolation>("x")).all();
        assert_eq!(parsed, Ok((1, "x")));
        let failed = (
            Err::<u8, _>(violation("a", "bad")),
            Ok::<_, Vec<FieldViolation>>("fine"),
            Err::<u8, _>(vec![violation("c", "bad"), violation("c.d", "worse")]),
        )
            .all()
            .unwrap_err();
        let fields: Vec<&str> = failed.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["a", "c", "c.d"]);
    }

    #[test]
    fn text_counts_characters_not_bytes() {
        let hearts = "♥".repeat(280);
        assert_eq!(text("body", &hearts, 1, 280).map(|t| t.chars().count()), Ok(280));
        assert!(text("body", &format!("{hearts}♥"), 1, 280).is_err());
    }

    #[test]
    fn text_is_trimmed_and_rejects_blank_and_control_characters() {
        assert_eq!(text("body", "  hi  ", 1, 10), Ok("hi".to_owned()));
        assert_eq!(text("body", "   ", 1, 10).unwrap_err().description, "must not be empty");
        assert!(text("body", "a\u{7}b", 1, 10).is_err());
        assert_eq!(text("body", "a\nb", 1, 10), Ok("a\nb".to_owned()));
    }

    #[test]
    fn uuids_must_be_canonical() {
        assert!(uuid("id", "67e55044-10b1-426f-9247-bb680e5fe0c8").is_ok());
        assert!(uuid("id", "67e5504410b1426f9247bb680e5fe0c8").is_err());
        assert_eq!(uuid("id", "").unwrap_err().description, "is required");
        assert!(uuid("id", "nope").is_err());
    }

    #[test]
    fn page_sizes_default_and_are_bounded() {
        assert_eq!(page_size(0), Ok(20));
        assert_eq!(page_size(1), Ok(1));
        assert_eq!(page_size(100), Ok(100));
        assert!(page_size(101).is_err());
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn page_tokens_round_trip_and_reject_forgeries() {
        let token = encode_page_token("abc");
        assert_eq!(decode_page_token(&token), Ok(Some("abc".to_owned())));
        assert_eq!(decode_page_token(""), Ok(None));
        assert!(decode_page_token("not base64!").is_err());
        assert!(decode_page_token(&URL_SAFE_NO_PAD.encode("x1:abc")).is_err());
        assert!(decode_page_token(&"A".repeat(600)).is_err());
    }

    #[test]
    fn invalid_argument_carries_every_violation_as_a_bad_request_detail() {
        use tonic_types::StatusExt;
        let status = invalid_argument(&[violation("a", "bad"), violation("b", "worse")]);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let fields: Vec<_> = status
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        assert_eq!(fields, ["a", "b"]);
    }
}
