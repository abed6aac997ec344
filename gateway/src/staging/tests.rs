//! The staging log in-process: restart recovery of uploads and deletes, and a full device.

use super::*;
use crate::io::EngineKind;
use crate::node::record_with;
use crate::tasks::Tasks;
use crate::volume::{open_volume, VolumeOptions};

pub(super) fn options(dir: &std::path::Path, size: u64) -> VolumeOptions {
    VolumeOptions {
        path: dir.join("dev"),
        create_size: size,
        segment_size: Some(8 << 20),
        format: false,
        device_fill: crate::device::DeviceFill::None,
        engine: EngineKind::Psync,
        full_wait: Duration::from_millis(300),
        uploads_paused: false,
        device_timeout: crate::volume::DEFAULT_DEVICE_TIMEOUT,
        upload: UploadPolicy::default(),
        read_cache_bytes: 0,
    }
}

pub(super) fn block(slice: u64, len: u32) -> (BlockKey, Vec<u8>) {
    let key = BlockKey::new(slice, 0, len).unwrap();
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u64 * 31 + slice * 7) as u8)
        .collect();
    (key, data)
}

pub(super) async fn put(log: &StagingLog, slice: u64, len: u32) -> Result<BlockKey, StagingError> {
    put_waiting(log, slice, len, Wait::Durable).await
}

pub(super) async fn put_waiting(
    log: &StagingLog,
    slice: u64,
    len: u32,
    wait: Wait,
) -> Result<BlockKey, StagingError> {
    let (key, data) = block(slice, len);
    log.write_block(key, record_with(&key, &data), crc32c::crc32c(&data), wait)
        .await
        .map(|_| key)
}

async fn upload_one(log: &StagingLog) -> BlockKey {
    match log.next_upload() {
        NextUpload::Ready(job) => {
            assert!(!log.complete_upload(&job));
            job.key
        }
        _ => panic!("a block should be due"),
    }
}

#[tokio::test]
async fn a_cancelled_delete_leaves_its_block_waiting_for_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_volume(&options(dir.path(), 64 << 20)).await.unwrap();
    let key = put(&log, 1, 5000).await.unwrap();
    let segment = log.entry(&key).unwrap().segment;
    // Dropped while its record is being written (a client that hung up): nothing changes.
    let cancelled = futures::FutureExt::now_or_never(log.delete_blocks(&[key]));
    assert!(
        cancelled.is_none(),
        "a delete cannot finish before its record is written"
    );
    assert_eq!(log.entry(&key).unwrap().state, BlockState::Staged);
    assert_eq!(log.lock().journal.pending(segment), 1);
    // The retry deletes it, and frees its segment.
    assert_eq!(log.delete_blocks(&[key]).await.unwrap(), (1, 0));
    assert_eq!(log.entry(&key).unwrap().state, BlockState::Deleted);
    assert_eq!(log.lock().journal.pending(segment), 0);
    log.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_staged_blocks_and_remembers_uploads_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_volume(&options(dir.path(), 64 << 20)).await.unwrap();
    let mut keys = Vec::new();
    for slice in 1..=12 {
        keys.push(put(&log, slice, 100_000 + slice as u32).await.unwrap());
    }
    // Rewriting an identical block is acknowledged without a second record.
    let again = log.entry(&keys[0]).unwrap().lsn;
    assert_eq!(put(&log, 1, 100_001).await.unwrap(), keys[0]);
    assert_eq!(log.entry(&keys[0]).unwrap().lsn, again);
    let uploaded = [upload_one(&log).await, upload_one(&log).await];
    assert_eq!(uploaded, [keys[0], keys[1]], "oldest first");
    assert_eq!(log.delete_blocks(&keys[2..4]).await.unwrap(), (2, 0));
    log.shutdown().await;
    drop(log);

    let log = open_volume(&options(dir.path(), 64 << 20)).await.unwrap();
    assert_eq!(log.recovery.blocks, 8);
    assert!(log.recovery.corrupt.is_empty());
    for (i, key) in keys.iter().enumerate() {
        let state = log.entry(key).unwrap().state;
        let expected = match i {
            0 | 1 => BlockState::Uploaded,
            2 | 3 => BlockState::Deleted,
            _ => BlockState::Staged,
        };
        assert_eq!(state, expected, "block {i}");
        if expected != BlockState::Deleted {
            let (bytes, _) = log.read_block(key).await.unwrap();
            assert_eq!(&bytes[..], &block(key.slice_id, key.block_len).1[..]);
        } else {
            assert!(matches!(
                log.read_block(key).await,
                Err(StagingError::NotFound(_))
            ));
        }
    }
    // A different block under an existing key is refused, not staged.
    let (key, mut data) = block(5, keys[4].block_len);
    data[0] ^= 1;
    assert!(matches!(
        log.write_block(
            key,
            record_with(&key, &data),
            crc32c::crc32c(&data),
            Wait::Durable
        )
        .await,
        Err(StagingError::Conflict { .. })
    ));
    log.shutdown().await;
}

#[tokio::test]
async fn full_device_refuses_then_recovers_after_uploads() {
    let dir = tempfile::tempdir().unwrap();
    // 5 segments of 8 MiB; one is kept in reserve for bookkeeping records.
    let log = open_volume(&options(dir.path(), 2 * 4096 + 5 * (8 << 20)))
        .await
        .unwrap();
    let mut staged = Vec::new();
    let err = loop {
        match put(&log, staged.len() as u64 + 1, 2 << 20).await {
            Ok(key) => staged.push(key),
            Err(e) => break e,
        }
        assert!(staged.len() < 100, "the device must fill up");
    };
    assert!(matches!(err, StagingError::Full { .. }), "{err}");
    // Three 2 MiB blocks fit in a segment, and 4 of the 5 segments take data.
    assert_eq!(staged.len(), 12, "4 segments of 3 blocks each");
    // Nothing acknowledged was overwritten.
    for key in &staged {
        assert_eq!(
            &log.read_block(key).await.unwrap().0[..],
            &block(key.slice_id, key.block_len).1[..]
        );
    }
    while log.snapshot().queue_len > 0 {
        upload_one(&log).await;
    }
    // Reclaim runs in the background; a writer waits for it within full_wait.
    put(&log, 1000, 4 << 20).await.unwrap();
    log.shutdown().await;
}

#[tokio::test]
async fn recovery_reads_records_straddling_read_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), 128 << 20);
    opts.segment_size = None; // default: whole 4 MiB records, segments over one 8 MiB read chunk
    opts.engine = EngineKind::Uring;
    let log = open_volume(&opts).await.unwrap();
    assert!(log.sb.segment_bytes > 8 << 20);
    let mut keys = Vec::new();
    for slice in 1..=10 {
        keys.push(
            put(&log, slice, (4 << 20) - slice as u32 * 999)
                .await
                .unwrap(),
        );
    }
    log.shutdown().await;
    drop(log);
    let log = open_volume(&opts).await.unwrap();
    assert!(
        log.recovery.corrupt.is_empty(),
        "{:?}",
        log.recovery.corrupt
    );
    assert_eq!(log.recovery.blocks, 10);
    for key in &keys {
        assert_eq!(
            &log.read_block(key).await.unwrap().0[..],
            &block(key.slice_id, key.block_len).1[..]
        );
    }
    log.shutdown().await;
}

/// A 64 MiB log in `dir` on a fault-injecting engine (power cuts, failed syncs).
async fn open_faulty_volume(
    dir: &std::path::Path,
) -> (Arc<StagingLog>, Arc<crate::io::faulty::FaultyEngine>) {
    let mut handle = None;
    let log = crate::volume::open_volume_with(&options(dir, 64 << 20), Tasks::new(), |engine| {
        let faulty = Arc::new(crate::io::faulty::FaultyEngine::new(engine));
        handle = Some(faulty.clone());
        faulty
    })
    .await
    .unwrap();
    (log, handle.expect("the engine was wrapped"))
}

/// A flush of the device asked for by another writer of it (the metadata region's durable
/// commit), after the queued records it may name are written: on the caller's thread where the
/// engine can ([`StagingLog::sync_device_here`], what the gateway's region does), else handed
/// to the pool ([`StagingLog::sync_device`]).
async fn flush_for_region(log: &Arc<StagingLog>, here: bool) -> Result<(), StagingError> {
    if !here {
        log.wait_queued_written().await?;
        return log.sync_device().await;
    }
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        log.wait_queued_written_here()?;
        log.sync_device_here()
            .expect("both engines flush on the caller's thread")
    })
    .await
    .unwrap()
}

/// The log recovered from what a power cut leaves of the faulty log's device in `dir` (from a
/// copy in the directory returned with it, so that the faulty log can stay open).
async fn after_power_cut(
    dir: &std::path::Path,
    faulty: &crate::io::faulty::FaultyEngine,
) -> (tempfile::TempDir, Arc<StagingLog>) {
    faulty.cut_power().await.unwrap();
    let image = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("dev"), image.path().join("dev")).unwrap();
    let log = open_volume(&options(image.path(), 64 << 20)).await.unwrap();
    (image, log)
}

/// A flush asked for by another writer of the device (the metadata region) covers a block that
/// waited only for its queueing, through a power cut; and a flush that fails fails the log: the
/// caller is told, and so is every writer after it. Both ways of flushing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sync_covers_written_blocks_and_its_failure_fails_the_log() {
    use crate::io::faulty::Op;

    for here in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (log, faulty) = open_faulty_volume(dir.path()).await;
        let written = put_waiting(&log, 1, 5000, Wait::Queued).await.unwrap();
        flush_for_region(&log, here).await.unwrap();
        faulty.fail(Op::Sync, 0);
        let refused = flush_for_region(&log, here).await.unwrap_err();
        assert!(matches!(refused, StagingError::Failed(_)), "{refused:?}");
        assert!(
            log.failure().is_some(),
            "here: {here}: a failed flush must fail the log"
        );
        let after = put_waiting(&log, 2, 5000, Wait::Queued).await;
        assert!(
            after.is_err(),
            "here: {here}: a failed log took a write: {after:?}"
        );
        let (_image, recovered) = after_power_cut(dir.path(), &faulty).await;
        let (got, _) = recovered.read_block(&written).await.unwrap();
        assert_eq!(&got[..], &block(1, 5000).1[..], "here: {here}");
    }
}

/// A block queued without waiting for its write ([`Wait::Queued`], a `WriteSlice` whose commit
/// flushes the device) is indexed at once, but a read of it waits for the write, and so does a
/// flush asked for by another writer of the device: the flush that makes the commit durable
/// makes the block durable too, through a power cut. The write is held back so that the read
/// and the flush are asked for before it lands. Both ways of flushing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_block_is_read_and_flushed_only_once_written() {
    use crate::io::faulty::Op;

    for here in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (log, faulty) = open_faulty_volume(dir.path()).await;
        faulty.delay(Op::Write, Duration::from_millis(300));
        let queued = put_waiting(&log, 1, 5000, Wait::Queued).await.unwrap();
        assert!(
            log.entry(&queued).is_some(),
            "here: {here}: indexed at once"
        );
        let reading = tokio::spawn({
            let log = log.clone();
            async move { log.read_block(&queued).await }
        });
        flush_for_region(&log, here).await.unwrap();
        let (read, _) = reading.await.unwrap().unwrap();
        assert_eq!(&read[..], &block(1, 5000).1[..], "here: {here}");
        let (_image, recovered) = after_power_cut(dir.path(), &faulty).await;
        let (got, _) = recovered.read_block(&queued).await.unwrap();
        assert_eq!(&got[..], &block(1, 5000).1[..], "here: {here}");
    }
}

/// A flush on the caller's thread that outlasts `--device-timeout` cannot be abandoned, but it
/// fails the log meanwhile: every other writer is answered, and the reason names the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_on_the_callers_thread_that_hangs_fails_the_log_within_the_timeout() {
    use crate::io::faulty::Op;

    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(300);
    let (log, faulty) = faulty_log(dir.path(), timeout).await;
    put_waiting(&log, 1, 5000, Wait::Queued).await.unwrap();
    faulty.delay(Op::Sync, Duration::from_secs(3));
    let started = std::time::Instant::now();
    let flushing = tokio::spawn({
        let log = log.clone();
        async move { flush_for_region(&log, true).await }
    });
    // A guard against a hang, not a performance bound.
    while log.failure().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a hung flush never failed the log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed_after = started.elapsed();
    assert!(
        !flushing.is_finished(),
        "the log failed only once the flush had returned"
    );
    let reason = log.failure().unwrap();
    assert!(reason.contains("--device-timeout"), "{reason}");
    let after = put_waiting(&log, 2, 5000, Wait::Queued).await;
    assert!(after.is_err(), "a failed log took a write: {after:?}");
    let flushed = flushing.await.unwrap();
    assert!(
        flushed.is_err(),
        "a flush that outlasted the bound succeeded"
    );
    eprintln!("a hung flush failed the log after {failed_after:?} (device timeout {timeout:?})");
}

/// A block that waits only for its queueing, made durable by its writer's own flush (a
/// `WriteSlice` whose commit flushes the device), costs that one `fdatasync`: the log must not
/// start one of its own for it as well, which made each such call wait for two. A writer that
/// waits for durability still gets the log's flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_block_costs_only_its_writers_flush() {
    for here in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let log = open_volume(&options(dir.path(), 64 << 20)).await.unwrap();
        let syncs = || log.snapshot().counters.syncs;
        // Let the flushes of opening the log settle first.
        put(&log, 1, 4096).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for i in 0..20u64 {
            let before = syncs();
            put_waiting(&log, 100 + i, 4096, Wait::Queued)
                .await
                .unwrap();
            flush_for_region(&log, here).await.unwrap();
            // Time for a flush of the log's own to start, if anything started one.
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(
                syncs() - before,
                1,
                "here: {here}: block {i}: one flush, the writer's own"
            );
        }
        let before = syncs();
        put(&log, 200, 4096).await.unwrap();
        assert!(syncs() > before, "a durable write is flushed by the log");
    }
}

/// Power loss at varied moments under 8 concurrent writers: the device keeps only what a
/// completed fdatasync covered (FaultyEngine undoes the rest), and recovery from that image
/// returns every acknowledged block byte for byte; any unacknowledged block it returns is whole
/// too (checksums are checked on every read). `STAGEFS_POWER_LOSS_ROUNDS` scales the rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_every_acknowledged_block() {
    let rounds: u64 = std::env::var("STAGEFS_POWER_LOSS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    for round in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        let (log, faulty) = open_faulty_volume(dir.path()).await;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let (log, acked) = (log.clone(), acked.clone());
                tokio::spawn(async move {
                    for i in 0..200u64 {
                        let slice = 1 + w * 10_000 + i;
                        let len = 1 + ((slice * 7919) % (64 << 10)) as u32;
                        match put(&log, slice, len).await {
                            Ok(_) => acked.lock().unwrap().push((slice, len)),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1 + round * 7)).await;
        faulty.cut_power().await.unwrap();
        for writer in writers {
            writer.await.unwrap();
        }
        // Writes that passed the power check before the cut may still land: an unsynced write
        // may or may not reach the media. Give them a moment, then recover from a copy (the
        // dead log still holds the device's lock).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let image = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("dev"), image.path().join("dev")).unwrap();
        let recovered = open_volume(&options(image.path(), 64 << 20)).await.unwrap();
        let acked = acked.lock().unwrap().clone();
        for &(slice, len) in &acked {
            let (key, data) = block(slice, len);
            let (got, _) = recovered
                .read_block(&key)
                .await
                .unwrap_or_else(|e| panic!("round {round}: acknowledged {key} lost: {e}"));
            assert_eq!(&got[..], &data[..], "round {round}: {key}");
        }
        for w in 0..8u64 {
            for i in 0..200u64 {
                let slice = 1 + w * 10_000 + i;
                let len = 1 + ((slice * 7919) % (64 << 10)) as u32;
                let (key, data) = block(slice, len);
                if let Ok((got, _)) = recovered.read_block(&key).await {
                    assert_eq!(&got[..], &data[..], "round {round}: {key} came back torn");
                }
            }
        }
        eprintln!(
            "power loss round {round}: {} blocks acknowledged, all recovered",
            acked.len()
        );
        recovered.shutdown().await;
    }
}

/// A log over a fault-injecting engine, with a short device timeout.
async fn faulty_log(
    dir: &std::path::Path,
    device_timeout: Duration,
) -> (Arc<StagingLog>, Arc<crate::io::faulty::FaultyEngine>) {
    let mut handle = None;
    let mut opts = options(dir, 64 << 20);
    opts.device_timeout = device_timeout;
    opts.uploads_paused = true;
    let log = crate::volume::open_volume_with(&opts, Tasks::new(), |engine| {
        let faulty = Arc::new(crate::io::faulty::FaultyEngine::new(engine));
        handle = Some(faulty.clone());
        faulty
    })
    .await
    .unwrap();
    (log, handle.unwrap())
}

/// Writers started together; each answer with the time it took.
async fn concurrent_puts(
    log: &Arc<StagingLog>,
    slices: std::ops::Range<u64>,
) -> Vec<(u64, Result<BlockKey, StagingError>, Duration)> {
    let writers: Vec<_> = slices
        .map(|slice| {
            let log = log.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = put(&log, slice, 10_000 + slice as u32).await;
                (slice, result, started.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for writer in writers {
        // A guard against a hang, not a performance bound.
        out.push(
            tokio::time::timeout(Duration::from_secs(30), writer)
                .await
                .expect("a writer was left waiting")
                .unwrap(),
        );
    }
    out
}

/// Every acknowledged block reads back from a fresh open of the device.
async fn assert_recovers(dir: &std::path::Path, acked: &[u64]) {
    let log = open_volume(&options(dir, 64 << 20)).await.unwrap();
    for &slice in acked {
        let (key, data) = block(slice, 10_000 + slice as u32);
        let (got, _) = log
            .read_block(&key)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {key} lost: {e}"));
        assert_eq!(&got[..], &data[..], "{key}");
    }
    log.shutdown().await;
}

/// Staged blocks still read back from the failed log, and once it is shut down every
/// acknowledged block recovers from the device.
async fn assert_reads_then_recovers(
    log: Arc<StagingLog>,
    faulty: Arc<crate::io::faulty::FaultyEngine>,
    dir: &std::path::Path,
    acked: &[u64],
) {
    for &slice in acked {
        let (key, data) = block(slice, 10_000 + slice as u32);
        assert_eq!(&log.read_block(&key).await.unwrap().0[..], &data[..]);
    }
    log.shutdown().await;
    drop((log, faulty));
    assert_recovers(dir, acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_sync_task_answers_every_writer_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (log, faulty) = faulty_log(dir.path(), crate::volume::DEFAULT_DEVICE_TIMEOUT).await;
    let acked: Vec<u64> = concurrent_puts(&log, 1..9)
        .await
        .into_iter()
        .map(|(slice, result, _)| result.map(|_| slice).unwrap())
        .collect();
    faulty.panic_next(crate::io::faulty::Op::Sync);
    let answers = concurrent_puts(&log, 100..116).await;
    let slowest = answers.iter().map(|(_, _, took)| *took).max().unwrap();
    for (slice, result, _) in &answers {
        let Err(error) = result else {
            panic!("block {slice} was acknowledged although the sync task died before syncing it");
        };
        assert!(matches!(error, StagingError::Failed(_)), "{error}");
        assert_eq!(
            tonic::Status::from(error.clone()).code(),
            tonic::Code::Unavailable
        );
        assert!(error.to_string().contains("staging.sync"), "{error}");
    }
    let fatal = log.tasks().fatal().expect("the panic is recorded as fatal");
    assert_eq!(fatal.task, "staging.sync");
    assert!(log.snapshot().failure.is_some());
    eprintln!("16 writers answered within {slowest:?} of a panic in the sync task");
    // Nothing is accepted afterwards, and what was staged stays readable.
    assert!(matches!(
        put(&log, 500, 1000).await,
        Err(StagingError::Failed(_))
    ));
    assert_reads_then_recovers(log, faulty, dir.path(), &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_error_fails_writers_and_keeps_reads() {
    use crate::io::faulty::Op;
    for op in [Op::Write, Op::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let (log, faulty) = faulty_log(dir.path(), crate::volume::DEFAULT_DEVICE_TIMEOUT).await;
        let acked: Vec<u64> = (1..6).map(|slice| slice as u64).collect::<Vec<_>>();
        for &slice in &acked {
            put(&log, slice, 10_000 + slice as u32).await.unwrap();
        }
        faulty.fail(op, 0);
        let answers = concurrent_puts(&log, 100..108).await;
        for (slice, result, _) in &answers {
            let error = result
                .as_ref()
                .expect_err("a write after the device failed");
            assert!(matches!(error, StagingError::Failed(_)), "{op:?}: {error}");
            assert!(
                error.to_string().contains("injected fault"),
                "{op:?}: {error}"
            );
            let (key, _) = block(*slice, 10_000 + *slice as u32);
            assert!(
                log.entry(&key).is_none(),
                "{op:?}: an unacknowledged block is indexed"
            );
        }
        assert!(log.snapshot().failure.is_some());
        assert!(
            log.tasks().fatal().is_none(),
            "{op:?}: uploads are paused, so the gateway stays up"
        );
        assert_reads_then_recovers(log, faulty, dir.path(), &acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_answering_fails_writers_within_the_timeout() {
    use crate::io::faulty::Op;
    let timeout = Duration::from_millis(300);
    for op in [Op::Write, Op::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let (log, faulty) = faulty_log(dir.path(), timeout).await;
        let acked = [1u64, 2, 3];
        for &slice in &acked {
            put(&log, slice, 10_000 + slice as u32).await.unwrap();
        }
        faulty.delay(op, Duration::from_secs(3600));
        let answers = concurrent_puts(&log, 100..108).await;
        let slowest = answers.iter().map(|(_, _, took)| *took).max().unwrap();
        for (_, result, _) in &answers {
            let error = result.as_ref().expect_err("a write to a hung device");
            assert!(
                error.to_string().contains("--device-timeout"),
                "{op:?}: {error}"
            );
        }
        eprintln!(
            "{op:?} hung: 8 writers answered within {slowest:?} (device timeout {timeout:?})"
        );
        // Reads go on while only writes hang.
        assert_reads_then_recovers(log, faulty, dir.path(), &acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_device_stops_the_gateway_once_its_backlog_is_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let (log, faulty) = faulty_log(dir.path(), crate::volume::DEFAULT_DEVICE_TIMEOUT).await;
    put(&log, 1, 10_001).await.unwrap();
    faulty.fail(crate::io::faulty::Op::Write, 0);
    assert!(put(&log, 2, 10_002).await.is_err());
    log.set_uploads_paused(false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        log.tasks().fatal().is_none(),
        "block 1 still waits for upload"
    );
    upload_one(&log).await;
    let fatal = tokio::time::timeout(Duration::from_secs(10), log.tasks().wait_fatal())
        .await
        .expect("the gateway stops once nothing readable waits for upload");
    assert_eq!(fatal.task, "staging.failed-device");
    assert!(fatal.reason.contains("injected fault"), "{fatal}");
    log.shutdown().await;
}

/// A dead life wrote records into a segment whose header never reached the device; the next life
/// opened that segment again, and its header reached the device before any record of its own.
/// The dead life's leftovers must not pass for the new life's records: their lsns are handed out
/// again by the new life, so an upload or delete recorded for one block would apply to another
/// (the power-loss model found this as acknowledged blocks lost or uploaded twice).
#[tokio::test]
async fn leftovers_under_a_later_lifes_segment_header_stay_dead() {
    use std::os::unix::fs::FileExt;

    let dir = tempfile::tempdir().unwrap();
    let segment = crate::volume::min_segment_size();
    let mut opts = options(dir.path(), crate::format::DATA_START + 4 * segment);
    opts.segment_size = Some(segment);
    let device = dir.path().join("dev");
    let read_at = |len: u64, offset: u64| {
        let mut buf = vec![0u8; len as usize];
        std::fs::File::open(&device)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    };
    let align = crate::aligned::ALIGN as u64;
    let write_at = |bytes: &[u8], offset: u64| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .unwrap();
        file.write_all_at(bytes, offset).unwrap();
        file.sync_all().unwrap();
    };

    // Life 1: block 1 fills the first segment, block 2 opens the second.
    let log = open_volume(&opts).await.unwrap();
    put(&log, 1, 3 << 20).await.unwrap();
    let leftover = put(&log, 2, 3 << 20).await.unwrap();
    let second = log.entry(&leftover).unwrap().segment as u64;
    let second_at = log.sb.segment_offset(second);
    log.shutdown().await;
    drop(log);
    // Its header was lost; its record was not.
    let life1_records = read_at(segment - align, second_at + align);
    write_at(&vec![0u8; align as usize], second_at);

    // Life 2 opens the second segment again for block 3; then its header alone survives.
    let log = open_volume(&opts).await.unwrap();
    assert!(log.entry(&leftover).is_none(), "no header, no segment");
    let third = put(&log, 3, 3 << 20).await.unwrap();
    assert_eq!(log.entry(&third).unwrap().segment as u64, second);
    log.shutdown().await;
    drop(log);
    write_at(&life1_records, second_at + align);

    // Life 3 finds life 2's header over life 1's record: an empty segment, nothing recovered.
    let log = open_volume(&opts).await.unwrap();
    assert!(
        log.entry(&leftover).is_none(),
        "a dead life's record was taken for a later life's"
    );
    assert!(
        log.entry(&third).is_none(),
        "its record never reached the device"
    );
    assert_eq!(log.recovery.blocks, 1, "block 1 only");
    log.shutdown().await;
}

#[tokio::test]
async fn read_cache_fills_are_served_never_uploaded_kept_across_a_restart_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), 64 << 20);
    // Room for three blocks of 1 MB.
    opts.read_cache_bytes = 3_000_000;
    let log = open_volume(&opts).await.unwrap();
    let staged = put(&log, 1, 1_000_000).await.unwrap();
    let mut filled = Vec::new();
    for slice in 10..13 {
        let (key, data) = block(slice, 1_000_000);
        assert!(log.fill(key, &data).await.unwrap(), "block {slice} is kept");
        filled.push(key);
    }
    // A held block is not written twice; a staged one is not the cache's.
    let (key, data) = block(10, 1_000_000);
    assert!(!log.fill(key, &data).await.unwrap());
    let (key, data) = block(1, 1_000_000);
    assert!(!log.fill(key, &data).await.unwrap());
    assert_eq!(log.entry(&staged).unwrap().state, BlockState::Staged);
    // Fills are in the store already: never queued, served from the device.
    assert_eq!(log.snapshot().queue_len, 1, "only the staged block waits");
    for key in &filled {
        let (bytes, state) = log.read_block(key).await.unwrap();
        assert_eq!(state, BlockState::Uploaded);
        assert_eq!(&bytes[..], &block(key.slice_id, key.block_len).1[..]);
    }
    // Read 10 again: 11 is now the least recently read, and goes for a fourth fill.
    log.read_block(&filled[0]).await.unwrap();
    let (key, data) = block(13, 1_000_000);
    assert!(log.fill(key, &data).await.unwrap());
    filled.push(key);
    assert!(
        log.entry(&filled[1]).is_none(),
        "the least recently read left"
    );
    let snap = log.snapshot();
    assert_eq!(snap.read_cache_held, (3, 3_000_000));
    assert_eq!(snap.counters.cache_fills, 4);
    assert!(snap.counters.cache_hits >= 4);
    log.shutdown().await;
    drop(log);

    // The fills come back after a restart as uploaded blocks, and are still not uploaded.
    // When they are more than the budget, the most recently fetched stay (how recently each
    // was read is not written down): 11's record is still on the device, 10 is the oldest.
    let log = open_volume(&opts).await.unwrap();
    assert_eq!(
        log.recovery.blocks, 1,
        "only the staged block waits for upload"
    );
    for key in &filled[1..] {
        let (bytes, state) = log.read_block(key).await.unwrap();
        assert_eq!(state, BlockState::Uploaded);
        assert_eq!(&bytes[..], &block(key.slice_id, key.block_len).1[..]);
    }
    assert!(log.entry(&filled[0]).is_none());
    let snap = log.snapshot();
    assert_eq!(snap.read_cache_held, (3, 3_000_000));
    assert_eq!(snap.queue_len, 1);
    log.shutdown().await;
    drop(log);

    // A log without a read cache keeps nothing it is offered.
    opts.read_cache_bytes = 0;
    let log = open_volume(&opts).await.unwrap();
    let (key, data) = block(20, 1_000);
    assert!(!log.fill(key, &data).await.unwrap());
    assert!(log.entry(&key).is_none());
    log.shutdown().await;
}

#[tokio::test]
async fn read_cache_fills_never_take_space_staging_needs() {
    let dir = tempfile::tempdir().unwrap();
    // 5 segments of 8 MiB; one is kept in reserve for bookkeeping records.
    let mut opts = options(dir.path(), 2 * 4096 + 5 * (8 << 20));
    opts.read_cache_bytes = 1 << 30;
    opts.uploads_paused = true;
    let log = open_volume(&opts).await.unwrap();
    // Fill the device with cache: more than it can hold, so the ring wraps.
    for slice in 100..130 {
        let (key, data) = block(slice, 2 << 20);
        log.fill(key, &data).await.unwrap();
    }
    // Staging still gets every data segment: twelve 2 MiB blocks, as on an empty device.
    let mut staged = Vec::new();
    while staged.len() < 12 {
        staged.push(put(&log, 1 + staged.len() as u64, 2 << 20).await.unwrap());
    }
    // And a fill on a device full of staged data is refused at once, not waited for.
    let (key, data) = block(200, 2 << 20);
    let started = Instant::now();
    assert!(!log.fill(key, &data).await.unwrap());
    assert!(
        started.elapsed() < opts.full_wait,
        "a fill never waits for space"
    );
    for key in &staged {
        assert_eq!(
            &log.read_block(key).await.unwrap().0[..],
            &block(key.slice_id, key.block_len).1[..]
        );
    }
    log.shutdown().await;
}

#[tokio::test]
async fn a_cached_block_read_often_outlives_the_rings_turns_and_one_never_read_does_not() {
    let dir = tempfile::tempdir().unwrap();
    // 7 segments of 8 MiB; staging 2 MiB blocks and uploading them turns the ring over.
    let mut opts = options(dir.path(), 64 << 20);
    opts.read_cache_bytes = 64 << 20;
    let log = open_volume(&opts).await.unwrap();
    let (hot, hot_data) = block(900, 1 << 20);
    let (cold, cold_data) = block(901, 1 << 20);
    assert!(log.fill(hot, &hot_data).await.unwrap());
    assert!(log.fill(cold, &cold_data).await.unwrap());
    let first_lsn = log.entry(&hot).unwrap().lsn;
    // Three turns of the ring's worth of staged (and uploaded) data.
    for slice in 1..=84 {
        put(&log, slice, 2 << 20).await.unwrap();
        upload_one(&log).await;
        // A reader of the hot block, as the service answers one.
        let (data, _) = log.read_block(&hot).await.expect("the hot block stays");
        log.keep_hot(hot, data);
        // Wait for a copy it started (the writes go on behind it otherwise).
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.lock().read_cache.is_refreshing(&hot) {
            assert!(Instant::now() < deadline, "the copy never finished");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(
        log.entry(&hot).unwrap().lsn > first_lsn,
        "the hot block was written again ahead of the ring"
    );
    assert_eq!(&log.read_block(&hot).await.unwrap().0[..], &hot_data[..]);
    assert!(
        log.entry(&cold).is_none(),
        "a block never read goes with its segment's reuse"
    );
    // It is still one block to the cache, not one per copy.
    assert_eq!(log.snapshot().read_cache_held, (1, 1 << 20));
    log.shutdown().await;
}

#[tokio::test]
async fn uploads_wait_for_writers_to_pause_until_half_the_device_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = options(dir.path(), 64 << 20);
    options.upload = UploadPolicy {
        defer_max: Duration::from_secs(3600),
        ..UploadPolicy::default()
    };
    let log = open_volume(&options).await.unwrap();
    let first = put(&log, 1, 4096).await.unwrap();
    assert!(
        matches!(log.next_upload(), NextUpload::WaitUntil(_)),
        "an upload was offered right after a block was staged"
    );
    assert!(
        log.snapshot().uploads_deferred,
        "status must say uploads wait"
    );
    tokio::time::sleep(WRITERS_PAUSE + Duration::from_millis(50)).await;
    assert!(
        !log.snapshot().uploads_deferred,
        "writers paused: status must not say so"
    );
    assert_eq!(
        upload_one(&log).await,
        first,
        "writers paused: the block goes"
    );
    // Writing on until half the device is in use: uploads wait exactly until then.
    let mut slice = 2;
    loop {
        put(&log, slice, 1 << 20).await.unwrap();
        slice += 1;
        let half = log.lock().used_share() >= DEFER_UNTIL_USED;
        match log.next_upload() {
            NextUpload::Ready(_) => {
                assert!(half, "an upload started while writers were busy");
                break;
            }
            NextUpload::WaitUntil(_) => {
                assert!(!half, "half the device is in use and uploads still wait")
            }
            NextUpload::Idle => panic!("staged blocks wait, the queue cannot be idle"),
        }
        assert!(slice < 200, "the device never got half full");
    }
    log.shutdown().await;
}
