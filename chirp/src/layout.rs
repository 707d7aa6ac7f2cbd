//! Where a local mesh lives: one data directory, one block of ports.
//!
//! With port base `B` (default 50050): gRPC of user-, message-, comment- and
//! analytics-service on `B+1`..`B+4` (the ports in ARCHITECTURE.md), their
//! `/metrics` on `B+11`..`B+14`, and the private stores on `B+21`
//! (PostgreSQL), `B+22` (Redis), `B+23` (MongoDB).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_PORT_BASE: u16 = 50050;

/// The parts of a local mesh, in start order (stores first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Postgres,
    Redis,
    Mongodb,
    UserService,
    MessageService,
    CommentService,
    AnalyticsService,
}

impl Part {
    pub const ALL: [Self; 7] = [
        Self::Postgres,
        Self::Redis,
        Self::Mongodb,
        Self::UserService,
        Self::MessageService,
        Self::CommentService,
        Self::AnalyticsService,
    ];
    pub const SERVICES: [Self; 4] = [
        Self::UserService,
        Self::MessageService,
        Self::CommentService,
        Self::AnalyticsService,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::Mongodb => "mongodb",
            Self::UserService => "user-service",
            Self::MessageService => "message-service",
            Self::CommentService => "comment-service",
            Self::AnalyticsService => "analytics-service",
        }
    }

    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    #[must_use]
    pub fn is_service(self) -> bool {
        Self::SERVICES.contains(&self)
    }

    /// The gRPC service whose health says whether this part serves.
    #[must_use]
    pub fn grpc_service(self) -> Option<&'static str> {
        match self {
            Self::UserService => Some("chirp.user.v1.UserService"),
            Self::MessageService => Some("chirp.message.v1.MessageService"),
            Self::CommentService => Some("chirp.comment.v1.CommentService"),
            Self::AnalyticsService => Some("chirp.analytics.v1.AnalyticsService"),
            _ => None,
        }
    }

    fn offset(self) -> u16 {
        match self {
            Self::UserService => 1,
            Self::MessageService => 2,
            Self::CommentService => 3,
            Self::AnalyticsService => 4,
            Self::Postgres => 21,
            Self::Redis => 22,
            Self::Mongodb => 23,
        }
    }
}

/// Ports of one mesh.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub base: u16,
}

impl Ports {
    /// The gRPC port of a service, or the port of a store.
    #[must_use]
    pub fn of(self, part: Part) -> u16 {
        self.base + part.offset()
    }

    #[must_use]
    pub fn metrics(self, part: Part) -> u16 {
        self.base + 10 + part.offset()
    }

    #[must_use]
    pub fn url(self, part: Part) -> String {
        format!("http://127.0.0.1:{}", self.of(part))
    }
}

/// `--data-dir`, or the user's data directory. As root it is
/// `/var/lib/chirp`: PostgreSQL runs as the `postgres` user, which cannot
/// reach into `/root`.
#[must_use]
pub fn data_dir(given: Option<&Path>) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    given.map_or_else(
        || {
            if root {
                PathBuf::from("/var/lib/chirp")
            } else {
                dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("chirp")
            }
        },
        Path::to_path_buf,
    )
}

/// The socket a running `chirp up` takes commands on.
#[must_use]
pub fn control_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("control.sock")
}
