//! Bad requests get a clear error status, stage nothing, upload nothing, and leave the gateway
//! serving: wrong lengths, keys that are malformed or too long, streams that are short, long, out
//! of order or fail their checksum, and reads of unknown or malformed keys.

use std::time::Duration;

use bytes::Bytes;
use proto::staging::WriteBlockRequest;
use stagefs_tests::*;
use tonic::Code;

const SEED: u64 = 0xBAD;

/// One bad `WriteBlock` call.
struct BadWrite {
    what: &'static str,
    frames: Vec<WriteBlockRequest>,
    code: Code,
    /// The message must mention at least one of these (case-insensitive).
    hints: Vec<String>,
    /// A well-formed key the rejected write must not have staged.
    key_not_staged: Option<String>,
}

fn data_frames(data: &Bytes) -> Vec<WriteBlockRequest> {
    data.chunks(FRAME_BYTES)
        .map(|c| data_frame(Bytes::copy_from_slice(c)))
        .collect()
}

/// Header with `key` and `total_len` and the crc32c of `data`, then `data` in 1 MiB frames.
fn frames(key: &str, total_len: u64, data: &Bytes) -> Vec<WriteBlockRequest> {
    let mut frames = vec![header_frame(key, total_len, crc32c::crc32c(data))];
    frames.extend(data_frames(data));
    frames
}

fn hints(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn bad_writes() -> Vec<BadWrite> {
    let mut cases = Vec::new();

    let key = block_key(501, 0, 4096);
    let short = pattern_bytes(&key, SEED, 4095);
    cases.push(BadWrite {
        what: "header total_len 4095 but the key says 4096",
        frames: frames(&key, 4095, &short),
        code: Code::InvalidArgument,
        hints: hints(&["len", "size", "4095"]),
        key_not_staged: Some(key.clone()),
    });
    let key = block_key(502, 0, 4096);
    let long = pattern_bytes(&key, SEED, 8192);
    cases.push(BadWrite {
        what: "header total_len 8192 but the key says 4096",
        frames: frames(&key, 8192, &long),
        code: Code::InvalidArgument,
        hints: hints(&["len", "size", "8192"]),
        key_not_staged: Some(key.clone()),
    });

    let key = "chunks/0/0/1_0_4194305";
    let data = pattern_bytes(key, SEED, 4_194_305);
    cases.push(BadWrite {
        what: "a key over 4 MiB",
        frames: frames(key, 4_194_305, &data),
        code: Code::InvalidArgument,
        hints: hints(&[key, "len", "4194304", "large", "big", "4 mib"]),
        key_not_staged: None,
    });

    for key in [
        "nope",
        "chunks/0/0/1_0",
        "chunks/0/1/1_0_10",
        "chunks/0/0/01_0_10",
        "",
    ] {
        let data = pattern_bytes(key, SEED, 10);
        cases.push(BadWrite {
            what: "a malformed key",
            frames: frames(key, 10, &data),
            code: Code::InvalidArgument,
            hints: if key.is_empty() {
                hints(&["key"])
            } else {
                hints(&[key, "key", "malformed"])
            },
            key_not_staged: None,
        });
    }

    let key = block_key(503, 0, 100_000);
    let data = block_bytes(&key, SEED);
    let mut truncated = vec![header_frame(&key, 100_000, crc32c::crc32c(&data))];
    truncated.extend(data_frames(&data.slice(..50_000)));
    cases.push(BadWrite {
        what: "a stream that ends after 50000 of 100000 bytes",
        frames: truncated,
        code: Code::InvalidArgument,
        hints: hints(&[
            "trunc",
            "short",
            "end",
            "incomplete",
            "missing",
            "fewer",
            "50000",
            "expected",
        ]),
        key_not_staged: Some(key.clone()),
    });
    let mut header_only = vec![header_frame(&key, 100_000, crc32c::crc32c(&data))];
    header_only.truncate(1);
    cases.push(BadWrite {
        what: "a stream with a header and no data",
        frames: header_only,
        code: Code::InvalidArgument,
        hints: hints(&[
            "trunc",
            "short",
            "end",
            "incomplete",
            "missing",
            "fewer",
            "expected",
        ]),
        key_not_staged: Some(key.clone()),
    });

    let key = block_key(504, 0, 100_000);
    let data = block_bytes(&key, SEED);
    let mut too_long = vec![header_frame(&key, 100_000, crc32c::crc32c(&data))];
    too_long.extend(data_frames(&data));
    too_long.push(data_frame(Bytes::from_static(b"!")));
    cases.push(BadWrite {
        what: "100001 bytes for a 100000-byte block",
        frames: too_long,
        code: Code::InvalidArgument,
        hints: hints(&[
            "more", "exceed", "too long", "too many", "beyond", "extra", "longer", "100001",
            "expected",
        ]),
        key_not_staged: Some(key.clone()),
    });

    let key = block_key(505, 0, 65_536);
    let data = block_bytes(&key, SEED);
    let mut bad_crc = vec![header_frame(
        &key,
        65_536,
        crc32c::crc32c(&data) ^ 0x0100_0000,
    )];
    bad_crc.extend(data_frames(&data));
    cases.push(BadWrite {
        what: "a crc32c that does not match the data",
        frames: bad_crc,
        code: Code::DataLoss,
        hints: hints(&["crc", "checksum"]),
        key_not_staged: Some(key.clone()),
    });

    let key = block_key(506, 0, 4096);
    let data = block_bytes(&key, SEED);
    let mut data_first = data_frames(&data);
    data_first.extend(frames(&key, 4096, &data));
    cases.push(BadWrite {
        what: "a data frame before the header",
        frames: data_first,
        code: Code::InvalidArgument,
        hints: hints(&["header"]),
        key_not_staged: Some(key.clone()),
    });

    let key = block_key(507, 0, 4096);
    let data = block_bytes(&key, SEED);
    let mut two_headers = frames(&key, 4096, &data);
    two_headers.insert(1, header_frame(&key, 4096, crc32c::crc32c(&data)));
    cases.push(BadWrite {
        what: "a second header frame",
        frames: two_headers,
        code: Code::InvalidArgument,
        hints: hints(&["header"]),
        key_not_staged: Some(key.clone()),
    });

    cases
}

async fn bad_input(engine: &str) {
    let dir = TestDir::new(&format!("bad-input-{engine}"));
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let mut gateway = Gateway::builder(dir.path(), &s3, engine).start().await;
    let mut client = gateway.client().await;
    let mut failures = Vec::new();

    for case in bad_writes() {
        let result = within(
            Duration::from_secs(30),
            case.what,
            write_frames(&mut client, case.frames),
        )
        .await;
        match result {
            Ok(response) => failures.push(format!(
                "{}: accepted ({response:?}), expected {:?}",
                case.what, case.code
            )),
            Err(status) => {
                let message = status.message().to_lowercase();
                if status.code() != case.code {
                    failures.push(format!(
                        "{}: got {:?} {:?}, expected {:?}",
                        case.what,
                        status.code(),
                        status.message(),
                        case.code
                    ));
                } else if !case
                    .hints
                    .iter()
                    .any(|h| message.contains(&h.to_lowercase()))
                {
                    failures.push(format!(
                        "{}: the message {:?} does not say what is wrong (expected a mention of one of {:?})",
                        case.what,
                        status.message(),
                        case.hints
                    ));
                } else {
                    eprintln!(
                        "[bad_input {engine}] {}: {:?} {:?}",
                        case.what,
                        status.code(),
                        status.message()
                    );
                }
            }
        }
        assert!(
            gateway.is_running(),
            "the gateway died after {}; log:\n{}",
            case.what,
            tail(&gateway.current_log(), 40)
        );
        if let Some(key) = &case.key_not_staged {
            match read_block(&mut client, key).await {
                Err(status) if status.code() == Code::NotFound => {}
                other => failures.push(format!(
                    "{}: ReadBlock({key}) afterwards must be NOT_FOUND, got {other:?}",
                    case.what
                )),
            }
        }
    }

    // Reads of unknown and malformed keys.
    let unknown = block_key(999_999, 0, 4096);
    match read_block(&mut client, &unknown).await {
        Err(status) if status.code() == Code::NotFound => {}
        other => failures.push(format!(
            "ReadBlock of an unknown key: expected NOT_FOUND, got {other:?}"
        )),
    }
    for key in ["nope", "chunks/0/0/1_0", "chunks/0/0/1_0_4194305"] {
        match read_block(&mut client, key).await {
            Err(status) if status.code() == Code::InvalidArgument => {}
            other => failures.push(format!(
                "ReadBlock of malformed key {key:?}: expected INVALID_ARGUMENT, got {other:?}"
            )),
        }
    }

    // The gateway still works, on the same connection and on a new one.
    let key = block_key(123_456_789, 2, 1_000_001);
    let data = block_bytes(&key, SEED);
    write_block(&mut client, &key, &data)
        .await
        .unwrap_or_else(|s| panic!("a valid write after the bad ones failed: {s:?}"));
    let mut fresh = gateway.client().await;
    let back = read_block(&mut fresh, &key)
        .await
        .unwrap_or_else(|s| panic!("a valid read after the bad ones failed: {s:?}"));
    assert_same_bytes("the valid block after the bad ones", &back, &data);

    // Nothing but the valid block reaches the store.
    drain(&mut client, Duration::from_secs(60))
        .await
        .unwrap_or_else(|s| panic!("Drain: {s:?}"));
    wait_uploaded(
        &mut client,
        std::slice::from_ref(&key),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|s| panic!("WaitUploaded: {s:?}"));
    let stored: Vec<String> = s3.list().await.into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        stored,
        vec![key.clone()],
        "only the valid block may be uploaded"
    );
    assert_objects_identical(&s3, &[key], SEED).await;

    let exit = gateway.sigterm().await;
    assert!(
        exit.success(),
        "SIGTERM after the bad input: exit status {exit}"
    );
    assert!(
        failures.is_empty(),
        "{} bad-input checks failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

stagefs_tests::engine_tests!(bad_input, 300);
