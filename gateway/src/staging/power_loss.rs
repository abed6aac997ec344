//! Model-based proof of the journal and its recovery against power loss (`power_loss_*`).
//!
//! A case is a random program of steps against a small log (6 segments of the smallest size,
//! one 4 MiB block record each, so writes fill it, uploads free it and reclaim reuses
//! segments): batches of concurrent block writes (some waiting for nothing but their queueing,
//! [`Wait::Queued`], and made durable by a flush of the device asked for afterwards,
//! [`StagingLog::sync_device`], as a `WriteSlice`'s metadata commit does), upload completions,
//! flushes of the completion record, deletes, and crashes. A crash is a power cut at a random
//! moment under concurrent writers, a write torn at a 512-byte boundary, or an EIO on the nth
//! write or sync followed by a power cut; the fault-injecting engine then drops every
//! write no completed fdatasync covers, and the log is recovered from what is left.
//!
//! After every recovery the model demands:
//! - every acknowledged block that was neither deleted nor uploaded is on the device, byte for
//!   byte, and waits for upload (nothing acknowledged is lost);
//! - a block whose delete was acknowledged while it still waited for upload is never readable
//!   again, and no deleted block waits for upload (nothing resurrected);
//! - a block whose upload completion was durably recorded does not wait for upload again;
//! - any other block that recovery returns reads back whole (nothing torn: its checksum holds).
//!
//! `STAGEFS_POWER_LOSS_CASES` sets the case count (default 24; PROPTEST_CASES is left to the
//! other proptests).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::tests::{block, options, put_waiting};
use super::*;
use crate::io::faulty::{FaultyEngine, Op};
use crate::tasks::Tasks;
use crate::volume::open_volume_with;

/// Segments in the ring (one is kept in reserve for bookkeeping records).
const SEGMENTS: u64 = 6;

#[derive(Debug, Clone)]
enum Crash {
    /// Power is cut this many milliseconds into a batch of concurrent writes (covered: they
    /// wait only for their queueing, then a flush asked for covers them).
    PowerCut { after_ms: u64, covered: bool },
    /// The nth write from now is torn after this many sectors, and the machine dies with it.
    Torn { skip: u64, sectors: usize },
    /// The nth operation from now fails with EIO; the batch goes on, then the power is cut.
    Eio { op: Op, skip: u64 },
}

#[derive(Debug, Clone)]
enum Step {
    /// Concurrent writes of fresh blocks of these lengths.
    Write(Vec<u32>),
    /// The same, each waiting only for its queueing; then a flush of the device asked for, after
    /// which they count as acknowledged.
    WriteCovered(Vec<u32>),
    /// Take up to this many blocks due for upload and record them uploaded.
    Upload(usize),
    /// Make the upload completions durable (the bookkeeping task does it every 200 ms too).
    Flush,
    /// Delete these picks (indexes into the known blocks, modulo their count).
    Delete(Vec<usize>),
    /// A crash during a batch of concurrent writes of these lengths, then recovery.
    Crash(Crash, Vec<u32>),
}

fn lengths() -> impl Strategy<Value = Vec<u32>> {
    // Mostly small blocks; now and then a large one, so segments fill and get reused.
    let len = prop_oneof![
        4 => 1u32..65_536,
        2 => 65_536u32..(1 << 20),
        1 => (1u32 << 20)..=(4 << 20),
    ];
    proptest::collection::vec(len, 1..10)
}

fn crash() -> impl Strategy<Value = Crash> {
    prop_oneof![
        (0u64..40, any::<bool>())
            .prop_map(|(after_ms, covered)| Crash::PowerCut { after_ms, covered }),
        (0u64..6, 0usize..64).prop_map(|(skip, sectors)| Crash::Torn { skip, sectors }),
        (prop_oneof![Just(Op::Write), Just(Op::Sync)], 0u64..6)
            .prop_map(|(op, skip)| Crash::Eio { op, skip }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => lengths().prop_map(Step::Write),
        2 => lengths().prop_map(Step::WriteCovered),
        4 => (1usize..12).prop_map(Step::Upload),
        1 => Just(Step::Flush),
        2 => proptest::collection::vec(any::<usize>(), 1..6).prop_map(Step::Delete),
        2 => (crash(), lengths()).prop_map(|(c, l)| Step::Crash(c, l)),
    ]
}

/// What the test knows about one block it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Acknowledged, not uploaded, not deleted: must survive anything.
    Acked,
    /// Recorded uploaded in memory; the record may not be durable yet.
    Uploaded,
    /// Its upload completion is durable: it must never wait for upload again.
    UploadedDurably,
    /// Deleted (acknowledged) while it waited for upload: never readable again.
    DeletedPending,
    /// Deleted after its upload: it must not wait for upload again.
    DeletedUploaded,
}

struct Harness {
    dirs: Vec<tempfile::TempDir>,
    log: Arc<StagingLog>,
    faulty: Arc<FaultyEngine>,
    known: BTreeMap<u64, (u32, Known)>,
    /// The length of every block ever written, acknowledged or not.
    lens: BTreeMap<u64, u32>,
    next_slice: u64,
    /// For the summary: recoveries, acknowledged blocks verified, segments opened (all lives).
    recoveries: u64,
    verified: u64,
    segments_opened: u64,
}

async fn open_faulty(dir: &std::path::Path) -> (Arc<StagingLog>, Arc<FaultyEngine>) {
    let segment = crate::volume::min_segment_size();
    let mut opts = options(dir, crate::format::DATA_START + SEGMENTS * segment);
    opts.segment_size = Some(segment);
    opts.uploads_paused = false;
    let mut handle = None;
    let log = open_volume_with(&opts, Tasks::new(), |engine| {
        let faulty = Arc::new(FaultyEngine::new(engine));
        handle = Some(faulty.clone());
        faulty
    })
    .await
    .expect("the log opens");
    (log, handle.expect("the engine was wrapped"))
}

impl Harness {
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (log, faulty) = open_faulty(dir.path()).await;
        Harness {
            dirs: vec![dir],
            log,
            faulty,
            known: BTreeMap::new(),
            lens: BTreeMap::new(),
            next_slice: 1,
            recoveries: 0,
            verified: 0,
            segments_opened: 0,
        }
    }

    /// Writes fresh blocks concurrently; records the acknowledged ones.
    async fn write(&mut self, lens: &[u32]) {
        self.write_waiting(lens, Wait::Durable).await;
    }

    /// Writes fresh blocks concurrently, waiting for `wait`; with [`Wait::Queued`], then waits
    /// for them to be written and asks for a flush of the device ([`StagingLog::sync_device`]),
    /// as the metadata's durable
    /// commit does after a `WriteSlice` staged its block, and only what that flush covered is
    /// acknowledged.
    async fn write_waiting(&mut self, lens: &[u32], wait: Wait) {
        let writers: Vec<_> = lens
            .iter()
            .map(|&len| {
                let slice = self.next_slice;
                self.next_slice += 1;
                self.lens.insert(slice, len);
                let log = self.log.clone();
                tokio::spawn(async move { (slice, len, put_waiting(&log, slice, len, wait).await) })
            })
            .collect();
        let mut written = Vec::new();
        for writer in writers {
            let (slice, len, result) = writer.await.unwrap();
            // An error (full, or the device failed) acknowledges nothing, and promises nothing.
            if result.is_ok() {
                written.push((slice, len));
            }
        }
        if wait == Wait::Queued && !written.is_empty() {
            // As the region does: the queued records first, then the flush.
            let flushed = match self.log.wait_queued_written().await {
                Ok(()) => self.log.sync_device().await,
                Err(e) => Err(e),
            };
            if flushed.is_err() {
                return;
            }
        }
        for (slice, len) in written {
            self.known.insert(slice, (len, Known::Acked));
        }
    }

    fn upload(&mut self, n: usize) {
        for _ in 0..n {
            let NextUpload::Ready(job) = self.log.next_upload() else {
                return;
            };
            let deleted = self.log.complete_upload(&job);
            assert!(
                !deleted,
                "{}: deleted while uploading, with no delete running",
                job.key
            );
            if let Some((_, known)) = self.known.get_mut(&job.key.slice_id) {
                assert_eq!(
                    *known,
                    Known::Acked,
                    "{}: uploaded twice in one life",
                    job.key
                );
                *known = Known::Uploaded;
            }
            // Else: an unacknowledged block that recovery found; nothing is promised about it.
        }
    }

    async fn flush(&mut self) {
        if self.log.flush_uploaded().await.is_ok() {
            // Every completion so far is in a durable record (a failed flush keeps them queued).
            for (_, known) in self.known.values_mut() {
                if *known == Known::Uploaded {
                    *known = Known::UploadedDurably;
                }
            }
        }
    }

    async fn delete(&mut self, picks: &[usize]) {
        let candidates: Vec<u64> = self
            .known
            .iter()
            .filter(|(_, (_, k))| {
                matches!(k, Known::Acked | Known::Uploaded | Known::UploadedDurably)
            })
            .map(|(slice, _)| *slice)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let slices: BTreeSet<u64> = picks
            .iter()
            .map(|p| candidates[p % candidates.len()])
            .collect();
        let keys: Vec<BlockKey> = slices
            .iter()
            .map(|s| block(*s, self.known[s].0).0)
            .collect();
        if self.log.delete_blocks(&keys).await.is_ok() {
            for slice in slices {
                let entry = self.known.get_mut(&slice).unwrap();
                entry.1 = match entry.1 {
                    Known::Acked => Known::DeletedPending,
                    _ => Known::DeletedUploaded,
                };
            }
        }
        // A failed delete (here: no room for its record, so none was written) leaves the blocks
        // as they were, for the cleaner's retry.
        else {
            for slice in &slices {
                if self.known[slice].1 == Known::Acked {
                    let key = block(*slice, self.known[slice].0).0;
                    let state = self.log.entry(&key).map(|e| e.state);
                    assert_eq!(
                        state,
                        Some(BlockState::Staged),
                        "{key}: a failed delete must leave it waiting for upload"
                    );
                }
            }
        }
    }

    async fn crash(&mut self, crash: &Crash, lens: &[u32]) {
        match crash {
            Crash::PowerCut { after_ms, covered } => {
                let faulty = self.faulty.clone();
                let after = Duration::from_millis(*after_ms);
                let cut = tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    faulty.cut_power().await.unwrap();
                });
                let wait = if *covered {
                    Wait::Queued
                } else {
                    Wait::Durable
                };
                self.write_waiting(lens, wait).await;
                cut.await.unwrap();
            }
            Crash::Torn { skip, sectors } => {
                // Skip some writes, then tear one: fail(write, skip) is not what tears, so count
                // by letting `skip` small batches through first.
                for _ in 0..*skip {
                    self.write(&lens[..1]).await;
                }
                self.faulty.tear_next_write(*sectors);
                self.write(lens).await;
                self.faulty.cut_power().await.unwrap();
            }
            Crash::Eio { op, skip } => {
                self.faulty.fail(*op, *skip);
                self.write(lens).await;
                self.flush().await;
                self.faulty.cut_power().await.unwrap();
            }
        }
        self.recover().await;
    }

    /// Recovers the device image the crash left and checks it against the model.
    async fn recover(&mut self) {
        // Writes that passed the power check before the cut may still be running: let them end
        // (they fail), then recover from a copy, as the dead log still holds the device's lock.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let old_dir = self.dirs.last().unwrap().path().to_path_buf();
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(old_dir.join("dev"), dir.path().join("dev")).unwrap();
        let (log, faulty) = open_faulty(dir.path()).await;
        self.recoveries += 1;
        let old = std::mem::replace(&mut self.log, log);
        self.segments_opened += old.lock().journal.segments_opened();
        self.faulty = faulty;
        old.shutdown().await;
        drop(old);
        self.dirs.push(dir);
        if self.dirs.len() > 2 {
            self.dirs.remove(0);
        }
        self.check().await;
    }

    async fn check(&mut self) {
        let log = &self.log;
        let mut waiting: BTreeSet<u64> = BTreeSet::new();
        let slices: Vec<u64> = (1..self.next_slice).collect();
        for slice in slices {
            let known = self.known.get(&slice).copied();
            let len = known.map_or_else(|| self.unknown_len(slice), |(len, _)| len);
            let (key, data) = block(slice, len);
            let entry = log.entry(&key);
            let state = entry.as_ref().map(|e| e.state);
            if state == Some(BlockState::Staged) {
                waiting.insert(slice);
            }
            let read = log.read_block(&key).await;
            if let Ok((bytes, _)) = &read {
                assert_eq!(&bytes[..], &data[..], "{key} came back torn or wrong");
            }
            match known.map(|(_, k)| k) {
                Some(Known::Acked) => {
                    assert!(
                        read.is_ok(),
                        "acknowledged {key} lost: {:?}; its index entry: {entry:?}; corrupt \
                         records found by recovery: {:?}",
                        read.err(),
                        log.recovery.corrupt
                    );
                    self.verified += 1;
                    assert_eq!(
                        state,
                        Some(BlockState::Staged),
                        "{key} must wait for upload"
                    );
                }
                Some(Known::Uploaded) => {
                    // Its completion may or may not have reached the device: either is fine, and
                    // a reclaimed segment means its object is in the store.
                    match state {
                        Some(BlockState::Staged) => {
                            self.known.get_mut(&slice).unwrap().1 = Known::Acked;
                        }
                        _ => self.known.get_mut(&slice).unwrap().1 = Known::UploadedDurably,
                    }
                }
                Some(Known::UploadedDurably) => {
                    assert_ne!(state, Some(BlockState::Staged), "{key} uploaded again");
                }
                Some(Known::DeletedPending) => {
                    assert!(read.is_err(), "deleted {key} resurrected");
                    assert_ne!(state, Some(BlockState::Staged), "deleted {key} queued");
                }
                Some(Known::DeletedUploaded) => {
                    assert_ne!(state, Some(BlockState::Staged), "deleted {key} queued");
                }
                None => {
                    // Never acknowledged: recovery may return it (whole), and it is then a block
                    // like any other.
                    if state == Some(BlockState::Staged) {
                        self.known.insert(slice, (len, Known::Acked));
                    }
                }
            }
        }
        // The upload queue holds exactly the blocks that wait.
        let queued: BTreeSet<u64> = log
            .lock()
            .uploads
            .queued_keys()
            .map(|k| k.slice_id)
            .collect();
        assert_eq!(
            queued, waiting,
            "the upload queue is not the set of waiting blocks"
        );
    }

    /// The length of a block the model never saw acknowledged (its write's length).
    fn unknown_len(&self, slice: u64) -> u32 {
        self.lens[&slice]
    }

    async fn run(&mut self, steps: &[Step]) {
        for step in steps {
            match step {
                Step::Write(lens) => self.write(lens).await,
                Step::WriteCovered(lens) => self.write_waiting(lens, Wait::Queued).await,
                Step::Upload(n) => self.upload(*n),
                Step::Flush => self.flush().await,
                Step::Delete(picks) => self.delete(picks).await,
                Step::Crash(crash, lens) => self.crash(crash, lens).await,
            }
        }
        // A last power cut, wherever the program ended.
        self.faulty.cut_power().await.unwrap();
        self.recover().await;
        self.log.shutdown().await;
        self.segments_opened += self.log.lock().journal.segments_opened();
        eprintln!(
            "power loss model: {} steps, {} recoveries, {} acknowledged blocks verified, {} \
             segments opened on a ring of {SEGMENTS}",
            steps.len(),
            self.recoveries,
            self.verified,
            self.segments_opened
        );
    }
}

fn cases() -> u32 {
    std::env::var("STAGEFS_POWER_LOSS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

/// A runtime of its own for each case, with two workers so that writers really run at once.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run_case(steps: &[Step]) {
    runtime().block_on(async {
        let mut harness = Harness::new().await;
        harness.run(steps).await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // A shrunk failure is worth its time; a thousand of them are not.
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn power_loss_model_recovers_exactly_the_acknowledged_blocks(
        steps in proptest::collection::vec(step(), 1..24)
    ) {
        run_case(&steps);
    }
}

/// Named scenarios: the crashes the model finds by chance, made certain.
#[test]
fn power_loss_torn_first_write_of_a_new_segment() {
    // Fill most of a segment, then tear whatever write comes next at every interesting sector.
    for sectors in [0, 1, 7, 8, 9] {
        run_case(&[
            Step::Write(vec![3 << 20, 3 << 20]),
            Step::Crash(Crash::Torn { skip: 0, sectors }, vec![2 << 20, 4096]),
            Step::Write(vec![100, 200]),
        ]);
    }
}

#[test]
fn power_loss_after_reclaim_and_reuse_of_segments() {
    // Fill the device, upload everything so segments are reclaimed, write again into reused
    // segments, and cut the power at several moments.
    for after_ms in [0, 3, 10, 30] {
        run_case(&[
            Step::Write(vec![2 << 20; 8]),
            Step::Upload(64),
            Step::Delete(vec![0, 1, 2]),
            Step::Write(vec![2 << 20; 8]),
            Step::Upload(64),
            Step::Write(vec![2 << 20; 6]),
            Step::Crash(
                Crash::PowerCut {
                    after_ms,
                    covered: false,
                },
                vec![1 << 20; 6],
            ),
        ]);
    }
}

#[test]
fn power_loss_with_deletes_of_uploaded_blocks_before_their_record() {
    // An upload completion not yet durable, then a delete: the block must not come back queued.
    run_case(&[
        Step::Write(vec![5000, 6000, 7000]),
        Step::Upload(3),
        Step::Delete(vec![0, 1, 2]),
        Step::Crash(
            Crash::PowerCut {
                after_ms: 0,
                covered: false,
            },
            vec![100],
        ),
    ]);
}

#[test]
fn power_loss_after_an_eio() {
    for (op, skip) in [(Op::Write, 0), (Op::Write, 2), (Op::Sync, 0), (Op::Sync, 1)] {
        run_case(&[
            Step::Write(vec![10_000; 4]),
            Step::Crash(Crash::Eio { op, skip }, vec![20_000; 6]),
            Step::Write(vec![30_000; 3]),
        ]);
    }
}

#[test]
fn power_loss_after_a_failed_delete_keeps_the_block() {
    // The model found a delete whose record failed (no room) while its block's segment was
    // freed all the same: the ring reused it, and a crash lost a block nothing had deleted.
    runtime().block_on(async {
        let mut harness = Harness::new().await;
        harness.write(&[3 << 20]).await;
        let staged = block(1, 3 << 20).0;
        let segment = harness.log.entry(&staged).unwrap().segment;
        harness.faulty.fail(Op::Write, 0);
        // Fails; the model checks that the block still waits for upload.
        harness.delete(&[0]).await;
        assert_eq!(
            harness.known[&1].1,
            Known::Acked,
            "the delete should have failed"
        );
        // As it was: readable, pinning its segment, offered for upload again.
        assert_eq!(harness.log.lock().journal.pending(segment), 1);
        assert_eq!(
            &harness.log.read_block(&staged).await.unwrap().0[..],
            &block(1, 3 << 20).1[..]
        );
        match harness.log.next_upload() {
            NextUpload::Ready(job) => assert_eq!(job.key, staged),
            _ => panic!("the block must be offered for upload again"),
        }
        // And after a power cut, recovery finds it waiting (the model's check).
        harness.faulty.cut_power().await.unwrap();
        harness.recover().await;
    });
}
