//! A corrupt record on the device: bytes flipped inside one staged block's data while the gateway
//! is stopped. After restart that block is never served and never uploaded, the corruption is
//! reported (log, Status, `inspect`), and every other block recovers and uploads identical.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use stagefs_tests::*;
use tonic::Code;

const SEED: u64 = 0xBAD_B10C;
const SIZES: [usize; 8] = [
    1 << 20,
    1_000_001,
    65_536,
    4 << 20,
    300_000,
    4096,
    2 << 20,
    777_777,
];
/// The block that gets corrupted (odd size, in the middle of the log).
const VICTIM: usize = 1;

async fn corruption(engine: &str) {
    let dir = TestDir::new(&format!("corrupt-{engine}"));
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let mut gateway = Gateway::builder(dir.path(), &s3, engine)
        .arg("--uploads-paused")
        .start()
        .await;
    let keys: Vec<String> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| block_key(7_000 + i as u64, 0, len))
        .collect();
    {
        let mut client = gateway.client().await;
        for key in &keys {
            write_block(&mut client, key, &block_bytes(key, SEED))
                .await
                .unwrap_or_else(|s| panic!("WriteBlock({key}): {s:?}"));
        }
    }
    let exit = gateway.sigterm().await;
    assert!(
        exit.success(),
        "SIGTERM must stop the gateway with exit status 0, got {exit}"
    );

    // Find the victim's record with `inspect` and check the contract's offsets against the device.
    let report = inspect(gateway.device()).await;
    assert!(
        report.corrupt_records.is_empty(),
        "inspect reports corruption before any was made: {:?}",
        report.corrupt_records
    );
    assert_eq!(
        report.records_waiting,
        keys.len() as u64,
        "inspect records_waiting: {report:?}"
    );
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(gateway.device())
        .expect("open the device file");
    for key in &keys {
        let record = report
            .records
            .iter()
            .find(|r| &r.key == key)
            .unwrap_or_else(|| {
                panic!(
                    "inspect --records does not list {key}: {:?}",
                    report.records
                )
            });
        assert_eq!(
            record.state, "waiting",
            "{key} is staged and not uploaded: {record:?}"
        );
        assert_eq!(
            record.len as usize,
            key_len(key),
            "inspect record length of {key}: {record:?}"
        );
        assert!(
            record.data_offset > record.device_offset,
            "the data follows the record header: {record:?}"
        );
        let mut on_device = vec![0u8; record.len as usize];
        device
            .read_exact_at(&mut on_device, record.data_offset)
            .expect("read the device file");
        assert_same_bytes(
            &format!("device bytes at inspect's data_offset of {key}"),
            &on_device,
            &block_bytes(key, SEED),
        );
    }

    // Corrupt the victim's data in the middle.
    let victim = &keys[VICTIM];
    let record = report
        .records
        .iter()
        .find(|r| &r.key == victim)
        .unwrap()
        .clone();
    let at = record.data_offset + record.len / 2;
    let mut bytes = [0u8; 16];
    device.read_exact_at(&mut bytes, at).unwrap();
    for b in &mut bytes {
        *b ^= 0xA5;
    }
    device.write_all_at(&bytes, at).unwrap();
    device.sync_all().unwrap();
    drop(device);

    let report = inspect(gateway.device()).await;
    assert!(
        report
            .corrupt_records
            .iter()
            .any(|c| c.device_offset >= record.device_offset && c.device_offset < record.data_offset + record.len),
        "inspect must report the corrupt record at device offset {} ({victim}): corrupt_records = {:?}",
        record.device_offset,
        report.corrupt_records
    );
    assert!(
        !report
            .records
            .iter()
            .any(|r| &r.key == victim && r.state == "waiting"),
        "inspect must not list the corrupt record as waiting for upload: {:?}",
        report.records
    );

    // Restart: the victim is not served, the others are intact.
    gateway.restart().await;
    let mut client = gateway.client().await;
    match read_block(&mut client, victim).await {
        Ok(data) => panic!(
            "ReadBlock({victim}) served {} bytes of a corrupt record (identical to the original: {})",
            data.len(),
            data == block_bytes(victim, SEED)
        ),
        Err(status) => assert!(
            matches!(status.code(), Code::NotFound | Code::DataLoss),
            "ReadBlock of a corrupt record must be NOT_FOUND or DATA_LOSS: {status:?}"
        ),
    }
    for key in keys.iter().filter(|k| *k != victim) {
        let data = read_block(&mut client, key)
            .await
            .unwrap_or_else(|s| panic!("ReadBlock({key}) after recovery: {s:?}"));
        assert_same_bytes(
            &format!("ReadBlock({key}) after recovery"),
            &data,
            &block_bytes(key, SEED),
        );
    }
    let st = status(&mut client).await;
    assert!(
        st.corrupt_records >= 1,
        "Status.corrupt_records after recovering a corrupt record: {st:?}"
    );
    assert_eq!(
        st.recovered_blocks,
        keys.len() as u64 - 1,
        "Status.recovered_blocks: {st:?}"
    );
    let log = gateway.current_log();
    let offset_forms = [
        record.device_offset.to_string(),
        format!("{:#x}", record.device_offset),
        format!("{:x}", record.device_offset),
    ];
    assert!(
        log.lines().any(|line| line.to_lowercase().contains("corrupt")
            && (line.contains(victim.as_str()) || offset_forms.iter().any(|o| line.contains(o.as_str())))),
        "the gateway log must report the corrupt record (a line with \"corrupt\" and its key {victim} or device offset {}); \
         log of this run:\n{}",
        record.device_offset,
        tail(&log, 40)
    );

    // Upload: everything but the victim, which never reaches the store.
    set_uploads_paused(&mut client, false).await;
    drain(&mut client, Duration::from_secs(120))
        .await
        .unwrap_or_else(|s| panic!("Drain: {s:?}"));
    let good: Vec<String> = keys.iter().filter(|k| *k != victim).cloned().collect();
    wait_uploaded(&mut client, &good, Duration::from_secs(120))
        .await
        .unwrap_or_else(|s| panic!("WaitUploaded: {s:?}"));
    assert_objects_identical(&s3, &good, SEED).await;
    assert!(
        !s3.exists(victim).await,
        "the corrupt block {victim} must never be uploaded"
    );
    let stored = assert_every_object_valid(&s3, SEED).await;
    assert_eq!(
        stored.len(),
        good.len(),
        "the store holds exactly the intact blocks: {stored:?}"
    );
    match wait_uploaded(&mut client, std::slice::from_ref(victim), Duration::from_secs(5)).await {
        Err(status) if status.code() == Code::NotFound => {}
        other => panic!("WaitUploaded of a block that is neither staged nor stored must be NOT_FOUND: {other:?}"),
    }
}

stagefs_tests::engine_tests!(corruption, 600);
