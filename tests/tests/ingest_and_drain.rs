//! Many concurrent writers stage blocks with uploads paused; every block is readable from another
//! connection as soon as its write is acknowledged, and reads back identical before upload; then
//! the drain uploads every block byte-identical, and reads after the upload return the same bytes
//! or NOT_FOUND, never different bytes.

use std::collections::BTreeSet;
use std::time::Duration;

use proto::staging::BlockState;
use stagefs_tests::*;
use tonic::Code;

const SEED: u64 = 0x1A6E57;
const WRITERS: usize = 16;
const BLOCKS_PER_WRITER: usize = 6;
/// From one page to a full block, including odd sizes that are not multiples of anything.
const SIZES: [usize; 9] = [
    4096,
    1_000_001,
    4 << 20,
    65_536,
    2_500_000,
    12_345,
    (4 << 20) - 1,
    1 << 20,
    4097,
];

fn writer_keys(writer: usize) -> Vec<String> {
    (0..BLOCKS_PER_WRITER)
        .map(|j| {
            let slice_id = 1 + writer as u64 * 1_234_567 + j as u64;
            block_key(slice_id, j as u32, SIZES[(writer + j) % SIZES.len()])
        })
        .collect()
}

async fn ingest_and_drain(engine: &str) {
    let dir = TestDir::new(&format!("ingest-{engine}"));
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let gateway = Gateway::builder(dir.path(), &s3, engine)
        .device_size("512MiB")
        .arg("--uploads-paused")
        .start()
        .await;

    // 16 writers, each on its own connection, all at once.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut client = gateway.client().await;
        // Read-after-write on another connection, as another node would: the acknowledgement
        // means the block is readable at once.
        let mut reader = gateway.client().await;
        tasks.push(tokio::spawn(async move {
            for key in writer_keys(w) {
                let data = block_bytes(&key, SEED);
                within(
                    Duration::from_secs(120),
                    &format!("WriteBlock({key})"),
                    write_block(&mut client, &key, &data),
                )
                .await
                .unwrap_or_else(|status| {
                    panic!("writer {w}: WriteBlock({key}) failed: {status:?}")
                });
                let back = read_block(&mut reader, &key)
                    .await
                    .unwrap_or_else(|status| {
                        panic!(
                            "ReadBlock({key}) right after its write was acknowledged: {status:?}"
                        )
                    });
                assert_same_bytes(
                    &format!("ReadBlock({key}) right after the ack"),
                    &back,
                    &data,
                );
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let keys: Vec<String> = (0..WRITERS).flat_map(writer_keys).collect();
    let total_bytes: u64 = keys.iter().map(|k| key_len(k) as u64).sum();
    assert_eq!(
        keys.iter().collect::<BTreeSet<_>>().len(),
        keys.len(),
        "test keys must be distinct"
    );

    // Before the upload: everything is staged, readable, and nothing is in the store.
    let mut client = gateway.client().await;
    for key in &keys {
        let data = read_block(&mut client, key).await.unwrap_or_else(|status| {
            panic!("ReadBlock({key}) of a staged block failed: {status:?}")
        });
        assert_same_bytes(
            &format!("ReadBlock({key}) before upload"),
            &data,
            &block_bytes(key, SEED),
        );
    }
    for stat in stat_blocks(&mut client, &keys).await {
        assert_eq!(
            state_of(&stat),
            BlockState::Staged,
            "StatBlocks({}) before upload: {stat:?}",
            stat.key
        );
        assert_eq!(
            stat.len as usize,
            key_len(&stat.key),
            "StatBlocks({}) length: {stat:?}",
            stat.key
        );
    }
    let before = status(&mut client).await;
    assert!(
        before.uploads_paused,
        "Status must say uploads are paused: {before:?}"
    );
    assert_eq!(
        before.blocks_staged,
        keys.len() as u64,
        "Status.blocks_staged: {before:?}"
    );
    assert_eq!(
        before.bytes_staged, total_bytes,
        "Status.bytes_staged: {before:?}"
    );
    assert_eq!(
        before.uploaded_blocks_total, 0,
        "nothing may be uploaded while paused: {before:?}"
    );
    assert!(
        s3.list().await.is_empty(),
        "the store must be empty while uploads are paused"
    );

    // Drain.
    set_uploads_paused(&mut client, false).await;
    wait_uploaded(&mut client, &keys, Duration::from_secs(300))
        .await
        .unwrap_or_else(|status| {
            panic!("WaitUploaded of all {} keys failed: {status:?}", keys.len())
        });

    // Every object is byte-identical, and the store holds nothing else.
    assert_objects_identical(&s3, &keys, SEED).await;
    let stored = assert_every_object_valid(&s3, SEED).await;
    assert_eq!(
        stored.iter().collect::<BTreeSet<_>>(),
        keys.iter().collect::<BTreeSet<_>>(),
        "the store must hold exactly the written blocks"
    );

    // After the upload: same bytes or NOT_FOUND, never anything else.
    let mut served = 0;
    for key in &keys {
        match read_block(&mut client, key).await {
            Ok(data) => {
                assert_same_bytes(
                    &format!("ReadBlock({key}) after upload"),
                    &data,
                    &block_bytes(key, SEED),
                );
                served += 1;
            }
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => panic!("ReadBlock({key}) after upload: {status:?}"),
        }
    }
    for stat in stat_blocks(&mut client, &keys).await {
        assert!(
            matches!(state_of(&stat), BlockState::Uploaded | BlockState::Unknown),
            "StatBlocks({}) after WaitUploaded must be UPLOADED (or unknown once dropped): {stat:?}",
            stat.key
        );
    }
    let after = status(&mut client).await;
    assert_eq!(
        after.queue_len, 0,
        "Status.queue_len after WaitUploaded of everything: {after:?}"
    );
    assert_eq!(
        after.uploaded_blocks_total,
        keys.len() as u64,
        "each block is uploaded exactly once: {after:?}"
    );
    assert_eq!(
        after.uploaded_bytes_total, total_bytes,
        "Status.uploaded_bytes_total: {after:?}"
    );
    eprintln!(
        "[ingest_and_drain {engine}] {} blocks, {} bytes; {served} still served by the gateway after upload",
        keys.len(),
        total_bytes
    );
}

stagefs_tests::engine_tests!(ingest_and_drain, 900);
