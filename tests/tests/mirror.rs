//! A mirror in another region, the pieces that exist so far: a gateway on PostgreSQL tells a
//! caller that asks where the metadata's log stood after its call (`stagefs-log-position`), and
//! an engine on a hot standby of that database (real streaming replication, made by the
//! project's own `PgCluster::standby`) waits until it has applied the log that far, after which
//! the change reads back there: what a mirror gateway needs to let its clients read their own
//! writes.

use std::time::Duration;

use meta::pg_cluster::{PgCluster, PgDurability};
use meta::{MetaConfig, MetaEngine, MetaLocation, ROOT_INO};
use stagefs_tests::rpc::{attr_of, mkdir_request};
use stagefs_tests::*;

#[test]
fn a_change_reads_back_on_a_standby_once_its_log_position_is_applied() {
    let cluster = GatewayCluster::start("mirror-position", 1, |_, gateway| gateway);
    let primary = PgCluster::shared();
    let standby = primary
        .standby(PgDurability::Fast)
        .unwrap_or_else(|e| panic!("a hot standby of the test server: {e}"));
    let on_standby = cluster.meta_url.replace(
        &format!(":{}/", primary.port()),
        &format!(":{}/", standby.port()),
    );
    cluster.block_on(async {
        let mut meta = cluster.gateways[0].meta_client().await;
        let plain = meta.mkdir(mkdir_request("plain")).await.unwrap();
        assert!(
            plain.metadata().get("stagefs-log-position").is_none(),
            "a caller that does not ask is not told"
        );
        let mut asked = tonic::Request::new(mkdir_request("asked"));
        asked
            .metadata_mut()
            .insert("stagefs-want-log-position", "1".parse().unwrap());
        let answer = meta.mkdir(asked).await.unwrap();
        let position: u64 = answer
            .metadata()
            .get("stagefs-log-position")
            .expect("the position, asked for")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let made = attr_of(answer);

        let mirror = meta::open(&MetaLocation::Postgres(on_standby), MetaConfig::default())
            .await
            .unwrap_or_else(|e| panic!("an engine on the standby: {e}"));
        mirror
            .wait_position(position, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            mirror.lookup(ROOT_INO, b"asked").await.unwrap().ino,
            made.ino,
            "once the standby applied the log to the change's position, the change reads back"
        );
        let refused = mirror
            .mkdir(ROOT_INO, b"on-the-mirror", 0o755, 0, 0)
            .await
            .unwrap_err();
        assert_eq!(refused.errno(), libc::EROFS, "{refused}");
    });
}
