//! Where a local mesh lives: one data directory, one block of ports.
//!
//! With port base `B` (default 50050): gRPC of user-, message-, comment- and
//! analytics-service on `B+1`..`B+4` (the ports in ARCHITECTURE.md), their
//! `/metrics` on `B+11`..`B+14`, and the private stores on `B+21`
//! (PostgreSQL), `B+22` (Redis), `B+23` (MongoDB). A service run as several
//! replicas (`chirp up --replicas`) has its replica `n` at the same offsets
//! `100 × (n − 1)` higher.

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

/// One process of a local mesh: a part and, for a service, which of its
/// replicas (from 1). Replica 1 is the part itself, under the part's name;
/// replica `n` is `<name>-n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Instance {
    pub part: Part,
    pub replica: u8,
}

/// How many replicas of one service `chirp up` runs at most: each takes a
/// block of ports, and a 2-CPU machine gains nothing from more.
pub const MAX_REPLICAS: u8 = 4;

/// The nodes of the Redis Cluster `chirp up --redis-cluster` runs in place
/// of the single Redis: three masters, three replicas (`redis`,
/// `redis-2` … `redis-6`).
pub const REDIS_CLUSTER_NODES: u8 = 6;

impl Part {
    /// How many processes of this part a mesh can run.
    #[must_use]
    pub fn max_instances(self) -> u8 {
        match self {
            Self::Redis => REDIS_CLUSTER_NODES,
            part if part.is_service() => MAX_REPLICAS,
            _ => 1,
        }
    }
}

impl From<Part> for Instance {
    fn from(part: Part) -> Self {
        Self { part, replica: 1 }
    }
}

impl Instance {
    #[must_use]
    pub fn name(self) -> String {
        if self.replica <= 1 {
            self.part.name().to_owned()
        } else {
            format!("{}-{}", self.part.name(), self.replica)
        }
    }

    /// `message-service` (replica 1) or `message-service-2`.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        if let Some(part) = Part::parse(name) {
            return Some(part.into());
        }
        let (part, replica) = name.rsplit_once('-')?;
        let part = Part::parse(part).filter(|p| p.max_instances() > 1)?;
        let replica: u8 = replica
            .parse()
            .ok()
            .filter(|n| (1..=part.max_instances()).contains(n))?;
        Some(Self { part, replica })
    }

    fn offset(self) -> u16 {
        self.part.offset() + 100 * u16::from(self.replica.saturating_sub(1))
    }
}

/// Ports of one mesh.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub base: u16,
}

impl Ports {
    /// The gRPC port of a service (replica), or the port of a store.
    #[must_use]
    pub fn of(self, at: impl Into<Instance>) -> u16 {
        self.base + at.into().offset()
    }

    #[must_use]
    pub fn metrics(self, at: impl Into<Instance>) -> u16 {
        self.base + 10 + at.into().offset()
    }

    /// Where the services reach a part: the fault proxy `chirp up` puts in
    /// front of it (see `faults`), four ports above the part's own.
    #[must_use]
    pub fn proxy(self, at: impl Into<Instance>) -> u16 {
        self.of(at) + 4
    }

    /// A Redis Cluster node's bus port (the nodes' own traffic).
    #[must_use]
    pub fn cluster_bus(self, at: impl Into<Instance>) -> u16 {
        self.of(at) + 50
    }

    #[must_use]
    pub fn url(self, at: impl Into<Instance>) -> String {
        format!("http://127.0.0.1:{}", self.of(at))
    }
}

/// `--data-dir`, or the user's data directory. As root it is
/// `/var/lib/chirp`: PostgreSQL runs as the `postgres` user, which cannot
/// reach into `/root`.
#[must_use]
pub fn data_dir(given: Option<&Path>) -> PathBuf {
    let root = nix::unistd::geteuid().is_root();
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

/// The mesh's ingest token: what producers present, and what opens the
/// services' operator routes.
#[must_use]
pub fn ingest_token_file(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("ingest-token")
}

/// The socket a running `chirp up` takes commands on.
#[must_use]
pub fn control_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("control.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_named_after_their_service_and_get_ports_of_their_own() {
        let second = Instance::parse("comment-service-2").unwrap();
        assert_eq!(
            second,
            Instance {
                part: Part::CommentService,
                replica: 2
            }
        );
        assert_eq!(second.name(), "comment-service-2");
        assert_eq!(Instance::parse("comment-service"), Some(Part::CommentService.into()));
        assert_eq!(Instance::from(Part::CommentService).name(), "comment-service");
        assert_eq!(Instance::parse("postgres-2"), None, "stores have no replicas");
        assert_eq!(
            Instance::parse("redis-6"),
            Some(Instance {
                part: Part::Redis,
                replica: 6
            }),
            "but a Redis Cluster has nodes"
        );
        assert_eq!(Instance::parse("redis-7"), None);
        assert_eq!(Instance::parse("comment-service-9"), None);
        let ports = Ports { base: 50050 };
        assert_eq!(ports.of(Part::CommentService), 50053);
        assert_eq!(ports.of(second), 50153);
        assert_eq!(ports.metrics(second), 50163);
    }

    #[test]
    fn no_two_listeners_of_a_mesh_share_a_port() {
        let ports = Ports { base: 50050 };
        let mut taken = vec![ports.base]; // the page
        for part in Part::ALL {
            for replica in 1..=part.max_instances() {
                let at = Instance { part, replica };
                taken.extend([ports.of(at), ports.proxy(at)]);
                if part.is_service() {
                    taken.push(ports.metrics(at));
                }
                if part == Part::Redis {
                    taken.push(ports.cluster_bus(at));
                }
            }
        }
        let count = taken.len();
        taken.sort_unstable();
        taken.dedup();
        assert_eq!(taken.len(), count, "{taken:?}");
    }
}
