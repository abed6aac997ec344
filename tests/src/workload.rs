//! A write workload for crash and shutdown tests: concurrent writers stream blocks continuously
//! while a reader checks acknowledged blocks, until the test stops the gateway under them.
//!
//! The test calls [`Workload::mark_stopping`] *before* it kills or stops the gateway. A writer or
//! reader error seen while the flag is still clear happened while the gateway was healthy, and
//! fails the test (except RESOURCE_EXHAUSTED, a full device, after which the writer backs off and
//! continues). Errors seen after the flag is set end that task quietly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tonic::Code;

use crate::blocks::{assert_same_bytes, block_bytes, block_key, read_block, write_block};
use crate::gateway::Gateway;

/// Longest a single write or read may take while the gateway is healthy.
pub const OP_TIMEOUT: Duration = Duration::from_secs(120);

/// What the writers did.
#[derive(Debug, Default, Clone)]
pub struct WorkloadReport {
    /// Writes answered `Ok`: durable, must survive anything.
    pub acked: Vec<String>,
    /// Writes sent but not answered `Ok` (cut off by the kill/stop): may or may not exist, but if
    /// anything serves them it must be their exact bytes.
    pub unacked: Vec<String>,
    /// Writes answered RESOURCE_EXHAUSTED while the gateway was healthy.
    pub resource_exhausted: usize,
    /// Successful reads of acknowledged blocks by the concurrent reader.
    pub reads_ok: usize,
}

/// Running writer and reader tasks; see the module docs.
pub struct Workload {
    stopping: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    writers: Vec<JoinHandle<(Vec<String>, usize)>>,
    reader: JoinHandle<usize>,
}

impl Workload {
    /// Starts `writers` writer tasks (each on its own connection) and one reader task against
    /// `gateway`. Writer `w` writes slices `id_base + w * 100_000 + n` for n = 0, 1, ..., with
    /// lengths cycling through `sizes` and contents [`block_bytes`]`(key, seed)`. The reader reads
    /// random blocks acknowledged so far, plus `already_acked` (from earlier rounds).
    pub async fn start(
        gateway: &Gateway,
        writers: usize,
        id_base: u64,
        sizes: &[usize],
        seed: u64,
        already_acked: Vec<String>,
    ) -> Workload {
        let stopping = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for w in 0..writers {
            let mut client = gateway.client().await;
            let stopping = stopping.clone();
            let acked = acked.clone();
            let sizes = sizes.to_vec();
            handles.push(tokio::spawn(async move {
                let mut unacked = Vec::new();
                let mut exhausted = 0;
                for n in 0u64.. {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let len = sizes[(n as usize * 7 + w * 3) % sizes.len()];
                    let key = block_key(id_base + w as u64 * 100_000 + n, (n % 16) as u32, len);
                    let data = block_bytes(&key, seed);
                    let result = tokio::time::timeout(OP_TIMEOUT, write_block(&mut client, &key, &data)).await;
                    match result {
                        Ok(Ok(_)) => acked.lock().unwrap().push(key),
                        Ok(Err(status)) => {
                            if stopping.load(Ordering::SeqCst) {
                                unacked.push(key);
                                break;
                            }
                            if status.code() == Code::ResourceExhausted {
                                exhausted += 1;
                                unacked.push(key);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                            panic!("writer {w}: WriteBlock({key}) failed while the gateway was healthy: {status:?}");
                        }
                        Err(_) => {
                            if stopping.load(Ordering::SeqCst) {
                                unacked.push(key);
                                break;
                            }
                            panic!("writer {w}: WriteBlock({key}) did not answer within {OP_TIMEOUT:?}");
                        }
                    }
                }
                (unacked, exhausted)
            }));
        }

        let mut reader_client = gateway.client().await;
        let reader = {
            let stopping = stopping.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let mut reads = 0;
                let mut pick = 0x2545_f491_4f6c_dd1du64 ^ seed;
                while !stopping.load(Ordering::SeqCst) {
                    let key = {
                        let now = acked.lock().unwrap();
                        let total = now.len() + already_acked.len();
                        if total == 0 {
                            None
                        } else {
                            pick ^= pick << 13;
                            pick ^= pick >> 7;
                            pick ^= pick << 17;
                            let i = (pick % total as u64) as usize;
                            Some(if i < now.len() {
                                now[i].clone()
                            } else {
                                already_acked[i - now.len()].clone()
                            })
                        }
                    };
                    let Some(key) = key else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    match tokio::time::timeout(OP_TIMEOUT, read_block(&mut reader_client, &key))
                        .await
                    {
                        Ok(Ok(data)) => {
                            assert_same_bytes(
                                &format!("concurrent ReadBlock({key}) of an acknowledged block"),
                                &data,
                                &block_bytes(&key, seed),
                            );
                            reads += 1;
                        }
                        // Uploaded and dropped: allowed, the final checks look in the store.
                        Ok(Err(status)) if status.code() == Code::NotFound => {}
                        Ok(Err(_)) | Err(_) if stopping.load(Ordering::SeqCst) => break,
                        Ok(Err(status)) => {
                            panic!("reader: ReadBlock({key}) failed while the gateway was healthy: {status:?}")
                        }
                        Err(_) => {
                            panic!("reader: ReadBlock({key}) did not answer within {OP_TIMEOUT:?}")
                        }
                    }
                }
                reads
            })
        };

        Workload {
            stopping,
            acked,
            writers: handles,
            reader,
        }
    }

    /// Tells the tasks that errors from now on are expected. Call right before stopping the
    /// gateway.
    pub fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Keys acknowledged so far.
    pub fn acked_so_far(&self) -> Vec<String> {
        self.acked.lock().unwrap().clone()
    }

    /// Waits for every task (they end once the gateway is gone) and reports. Panics raised inside
    /// the tasks are re-raised here.
    pub async fn finish(self) -> WorkloadReport {
        self.mark_stopping();
        let mut report = WorkloadReport::default();
        for handle in self.writers {
            let (unacked, exhausted) =
                match tokio::time::timeout(OP_TIMEOUT + Duration::from_secs(10), handle).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Ok(Err(e)) => panic!("writer task failed: {e}"),
                    Err(_) => panic!("a writer did not finish after the gateway was stopped"),
                };
            report.unacked.extend(unacked);
            report.resource_exhausted += exhausted;
        }
        report.reads_ok =
            match tokio::time::timeout(OP_TIMEOUT + Duration::from_secs(10), self.reader).await {
                Ok(Ok(reads)) => reads,
                Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Ok(Err(e)) => panic!("reader task failed: {e}"),
                Err(_) => panic!("the reader did not finish after the gateway was stopped"),
            };
        report.acked = self.acked.lock().unwrap().clone();
        report
    }
}
