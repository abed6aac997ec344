//! Several gateways on one metadata database: a throwaway PostgreSQL server (one per test binary,
//! a fresh database per cluster), an S3 server, and gateways each on a device file of its own.

use std::path::Path;

use meta::pg_cluster::PgCluster;

use crate::gateway::{Gateway, GatewayBuilder};
use crate::mount::{Mount, MountBuilder};
use crate::s3::S3Server;
use crate::TestDir;

/// Gateways sharing one PostgreSQL database and one S3 server. Fields drop in declaration order:
/// gateways, S3 server, runtime, scratch directory; declare mounts after the cluster.
pub struct GatewayCluster {
    pub gateways: Vec<Gateway>,
    pub s3: S3Server,
    pub runtime: tokio::runtime::Runtime,
    /// The database every gateway serves (`--meta`).
    pub meta_url: String,
    pub dir: TestDir,
}

impl GatewayCluster {
    /// `count` gateways in scratch directory `name-XXXXXX` (gateway `i` in `gw{i}/`, with its
    /// device and log there), each configured by `configure(i, builder)`.
    pub fn start(
        name: &str,
        count: usize,
        configure: impl Fn(usize, GatewayBuilder) -> GatewayBuilder,
    ) -> GatewayCluster {
        GatewayCluster::start_logging_store(name, count, false, configure)
    }

    /// [`GatewayCluster::start`]; with `log_requests`, the S3 server logs every request, for
    /// [`S3Server::count_requests`].
    pub fn start_logging_store(
        name: &str,
        count: usize,
        log_requests: bool,
        configure: impl Fn(usize, GatewayBuilder) -> GatewayBuilder,
    ) -> GatewayCluster {
        let dir = TestDir::new(name);
        let runtime = crate::harness_runtime();
        let meta_url = PgCluster::shared()
            .fresh_database(name)
            .unwrap_or_else(|e| panic!("a PostgreSQL database for {name}: {e}"));
        let s3 = runtime.block_on(S3Server::start_logging_in(dir.join("s3"), log_requests));
        let mut gateways = Vec::new();
        for i in 0..count {
            let home = dir.join(format!("gw{i}"));
            std::fs::create_dir_all(&home).expect("gateway directory");
            let builder = Gateway::builder(&home, &s3, "uring").args(["--meta", &meta_url]);
            gateways.push(runtime.block_on(configure(i, builder).start()));
        }
        GatewayCluster {
            gateways,
            s3,
            runtime,
            meta_url,
            dir,
        }
    }

    /// A mount of gateway `i` on `<scratch>/<name>`, reading uploaded blocks from the S3 server.
    pub fn mount(&self, i: usize, name: &str) -> MountBuilder {
        Mount::builder(self.gateways[i].addr().to_string(), self.dir.join(name)).s3(&self.s3)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a future of the async harness to completion.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}
