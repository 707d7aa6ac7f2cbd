//! The gRPC edge: chirp.message.v1 and chirp.message.v2 served by one server
//! from one collection. The two differ only in how an instant is written
//! (v1: int64 Unix seconds; v2: RFC 3339 UTC), so one macro generates both
//! from the same handlers, and v1 cannot drift from v2 by accident.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use service_kit::{
    auth::TokenVerifier,
    events::{Batch, Event},
    validate::AllFields as _,
};
use tonic::{metadata::MetadataMap, Status};

use crate::{
    domain::{Body, Caller, MessageId, PageRequest, UserId},
    error::Error,
    service::Messages,
};

/// Largest request message-service accepts: a batch of user-service's
/// events (ApplyUserEvents); a post is at most 280 characters (1,120 bytes).
pub const MAX_REQUEST_BYTES: usize = service_kit::events::MAX_BATCH_REQUEST_BYTES;

/// What both API versions share.
pub struct Shared {
    pub messages: Arc<Messages>,
    pub verifier: Arc<TokenVerifier>,
}

impl Shared {
    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        Ok(self.verifier.authenticate(metadata).await?)
    }

    /// user-service's events, with its service token only: the outcome of
    /// each, and how many were applied and ignored.
    async fn user_events(
        &self,
        metadata: &MetadataMap,
        raw: &[chirp_proto::events::v1::Event],
    ) -> Result<(Vec<chirp_proto::events::v1::EventOutcome>, i64, i64), Error> {
        self.verifier.authenticate_service(metadata).await?;
        let batch = Batch::parse(raw, service_kit::events::MAX_BATCH, Some(USER_SERVICE))?;
        let events: Vec<Event> = batch.events().cloned().collect();
        let applied = self.messages.apply_user_events(&events).await?;
        let (applied_count, ignored_count) = service_kit::events::tally(&applied);
        Ok((batch.outcomes(&applied), applied_count, ignored_count))
    }
}

/// The producer whose events ApplyUserEvents takes.
const USER_SERVICE: &str = "user-service";

fn unix_seconds(at: DateTime<Utc>) -> i64 {
    at.timestamp()
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_body(raw: &str) -> Result<Body, Error> {
    Ok(Body::parse(raw)?)
}

fn parse_message_id(raw: &str) -> Result<MessageId, Error> {
    Ok(MessageId::parse("message_id", raw)?)
}

fn parse_user_id(raw: &str) -> Result<UserId, Error> {
    Ok(UserId::parse("user_id", raw)?)
}

fn parse_page(page_size: i32, page_token: &str) -> Result<PageRequest, Error> {
    Ok(PageRequest::parse(page_size, page_token)?)
}

fn parse_user_page(user_id: &str, page_size: i32, page_token: &str) -> Result<(UserId, PageRequest), Error> {
    Ok((
        UserId::parse("user_id", user_id),
        PageRequest::parse(page_size, page_token),
    )
        .all()?)
}

macro_rules! versioned_api {
    ($version:ident, $time:path) => {
        pub mod $version {
            use std::sync::Arc;

            use chirp_proto::message::$version as pb;
            use tonic::{Request, Response, Status};

            use crate::domain::{self, Enriched, Part};

            pub use pb::message_service_server::{MessageServiceServer, SERVICE_NAME};

            pub struct Api(pub Arc<super::Shared>);

            type Reply<T> = Result<Response<T>, Status>;

            #[tonic::async_trait]
            impl pb::message_service_server::MessageService for Api {
                async fn post_message(
                    &self,
                    request: Request<pb::PostMessageRequest>,
                ) -> Reply<pb::PostMessageResponse> {
                    let caller = self.0.caller(request.metadata()).await?;
                    let body = super::parse_body(&request.get_ref().body)?;
                    let message = self.0.messages.post(caller, body).await?;
                    Ok(Response::new(pb::PostMessageResponse {
                        message: Some(message_to_pb(message)),
                    }))
                }

                async fn get_message(&self, request: Request<pb::GetMessageRequest>) -> Reply<pb::GetMessageResponse> {
                    let id = super::parse_message_id(&request.get_ref().message_id)?;
                    let message = self.0.messages.get(id).await?;
                    Ok(Response::new(pb::GetMessageResponse {
                        message: Some(enriched_to_pb(message)),
                    }))
                }

                async fn list_user_messages(
                    &self,
                    request: Request<pb::ListUserMessagesRequest>,
                ) -> Reply<pb::ListUserMessagesResponse> {
                    let r = request.get_ref();
                    let (user, page) = super::parse_user_page(&r.user_id, r.page_size, &r.page_token)?;
                    let page = self.0.messages.by_user(user, page).await?;
                    Ok(Response::new(pb::ListUserMessagesResponse {
                        next_page_token: page.next_page_token(),
                        messages: page.items.into_iter().map(enriched_to_pb).collect(),
                    }))
                }

                async fn home_timeline(
                    &self,
                    request: Request<pb::HomeTimelineRequest>,
                ) -> Reply<pb::HomeTimelineResponse> {
                    let caller = self.0.caller(request.metadata()).await?;
                    let page = super::parse_page(request.get_ref().page_size, &request.get_ref().page_token)?;
                    let timeline = self.0.messages.timeline(caller, page).await?;
                    Ok(Response::new(pb::HomeTimelineResponse {
                        next_page_token: timeline.page.next_page_token(),
                        messages: timeline.page.items.into_iter().map(enriched_to_pb).collect(),
                        degraded: timeline.degraded,
                    }))
                }

                async fn delete_message(
                    &self,
                    request: Request<pb::DeleteMessageRequest>,
                ) -> Reply<pb::DeleteMessageResponse> {
                    let caller = self.0.caller(request.metadata()).await?;
                    let id = super::parse_message_id(&request.get_ref().message_id)?;
                    self.0.messages.delete(caller, id).await?;
                    Ok(Response::new(pb::DeleteMessageResponse {}))
                }

                async fn check_message(
                    &self,
                    request: Request<pb::CheckMessageRequest>,
                ) -> Reply<pb::CheckMessageResponse> {
                    let id = super::parse_message_id(&request.get_ref().message_id)?;
                    let author = self.0.messages.check(id).await?;
                    Ok(Response::new(pb::CheckMessageResponse {
                        exists: author.is_some(),
                        author_id: author.map(|a| a.to_string()).unwrap_or_default(),
                    }))
                }

                async fn set_user_messages_hidden(
                    &self,
                    request: Request<pb::SetUserMessagesHiddenRequest>,
                ) -> Reply<pb::SetUserMessagesHiddenResponse> {
                    let caller = self.0.caller(request.metadata()).await?;
                    let author = super::parse_user_id(&request.get_ref().user_id)?;
                    let changed = self
                        .0
                        .messages
                        .set_hidden(caller, author, request.get_ref().hidden)
                        .await?;
                    Ok(Response::new(pb::SetUserMessagesHiddenResponse {
                        changed_count: i64::try_from(changed).unwrap_or(i64::MAX),
                    }))
                }

                async fn apply_user_events(
                    &self,
                    request: Request<pb::ApplyUserEventsRequest>,
                ) -> Reply<pb::ApplyUserEventsResponse> {
                    let (outcomes, applied_count, ignored_count) = self
                        .0
                        .user_events(request.metadata(), &request.get_ref().events)
                        .await?;
                    Ok(Response::new(pb::ApplyUserEventsResponse {
                        applied_count,
                        ignored_count,
                        outcomes,
                    }))
                }
            }

            fn message_to_pb(message: domain::Message) -> pb::Message {
                pb::Message {
                    id: message.id.to_string(),
                    author_id: message.author_id.to_string(),
                    body: message.body.as_str().to_owned(),
                    create_time: $time(message.created_at),
                }
            }

            fn status<T>(part: &Part<T>) -> i32 {
                match part {
                    Part::Ok(_) => pb::PartStatus::Ok,
                    Part::Unavailable => pb::PartStatus::Unavailable,
                    Part::NotFound => pb::PartStatus::NotFound,
                }
                .into()
            }

            fn enriched_to_pb(enriched: Enriched) -> pb::EnrichedMessage {
                if matches!(enriched.author, Part::Unavailable) {
                    service_kit::telemetry::degraded("author");
                }
                if matches!(enriched.comments, Part::Unavailable) {
                    service_kit::telemetry::degraded("comments");
                }
                let author = pb::AuthorPart {
                    status: status(&enriched.author),
                    ..match enriched.author {
                        Part::Ok(author) => pb::AuthorPart {
                            status: 0,
                            username: author.username,
                            display_name: author.display_name,
                        },
                        _ => pb::AuthorPart::default(),
                    }
                };
                let comments = pb::CommentsPart {
                    status: status(&enriched.comments),
                    ..match enriched.comments {
                        Part::Ok(comments) => pb::CommentsPart {
                            status: 0,
                            count: comments.count,
                            preview: comments
                                .preview
                                .into_iter()
                                .map(|c| pb::CommentPreview {
                                    id: c.id,
                                    author_id: c.author_id,
                                    body: c.body,
                                    create_time: $time(c.created_at),
                                })
                                .collect(),
                        },
                        _ => pb::CommentsPart::default(),
                    }
                };
                pb::EnrichedMessage {
                    message: Some(message_to_pb(enriched.message)),
                    author: Some(author),
                    comments: Some(comments),
                }
            }
        }
    };
}

versioned_api!(v1, super::unix_seconds);
versioned_api!(v2, super::rfc3339);

/// The one place an [`Error`] becomes a [`Status`]: the failures every
/// service shares through [`Common::into_status`](crate::error::Common::into_status),
/// which logs causes and never sends them, and this service's own here.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Common(common) => common.into_status(),
        }
    }
}

#[cfg(test)]
mod properties {
    use chirp_proto::message::v2 as pb;
    use proptest::prelude::*;
    use service_kit::testing::props::{number, only_invalid, text, CASES};

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn post_message_requests_parse_or_name_their_bad_fields(body in text()) {
            let r = pb::PostMessageRequest { body };
            only_invalid(parse_body(&r.body), &["body"]);
        }

        #[test]
        fn message_id_requests_parse_or_name_their_bad_fields(message_id in text()) {
            // GetMessage, DeleteMessage and CheckMessage carry the same field.
            let get = pb::GetMessageRequest { message_id: message_id.clone() };
            only_invalid(parse_message_id(&get.message_id), &["message_id"]);
            let delete = pb::DeleteMessageRequest { message_id: message_id.clone() };
            only_invalid(parse_message_id(&delete.message_id), &["message_id"]);
            let check = pb::CheckMessageRequest { message_id };
            only_invalid(parse_message_id(&check.message_id), &["message_id"]);
        }

        #[test]
        fn list_user_messages_requests_parse_or_name_their_bad_fields(
            user_id in text(), page_size in number(), page_token in text()
        ) {
            let r = pb::ListUserMessagesRequest { user_id, page_size, page_token };
            only_invalid(parse_user_page(&r.user_id, r.page_size, &r.page_token), &["user_id", "page_size", "page_token"]);
        }

        #[test]
        fn home_timeline_requests_parse_or_name_their_bad_fields(page_size in number(), page_token in text()) {
            let r = pb::HomeTimelineRequest { page_size, page_token };
            only_invalid(parse_page(r.page_size, &r.page_token), &["page_size", "page_token"]);
        }

        #[test]
        fn hide_requests_parse_or_name_their_bad_fields(user_id in text(), hidden in any::<bool>()) {
            let r = pb::SetUserMessagesHiddenRequest { user_id, hidden };
            only_invalid(parse_user_id(&r.user_id), &["user_id"]);
        }
    }
}
