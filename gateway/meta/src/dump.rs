//! `stagefs-gateway meta dump` and `meta load`: a file system's metadata as JSON lines, to move it
//! between backends (redb ⇄ PostgreSQL) and to keep a logical backup.
//!
//! The format (version 1), one JSON object per line:
//!
//! 1. a header: `{"stagefs_meta_dump": 1, "format_version": 2, "backend": "redb",
//!    "sequences": {"next_ino": N, "next_slice_id": N, "next_cookie": N}}`;
//! 2. one line per record: `{"k": "<hex key>", "v": "<hex value>"}`, in key order, laid out as
//!    [`crate::keys`] documents (inodes, entries, chunks with their slices, xattrs, sessions, the
//!    delete queue, the gateway registry);
//! 3. a trailer: `{"end": true, "records": N}`, so a cut-off dump is refused at load.
//!
//! A dump reads one snapshot (one read transaction), so a dump of a PostgreSQL database taken
//! while clients write is consistent (a redb file is locked by its running gateway: stop it
//! first); sequences are read after it, so ids handed out meanwhile are never handed out
//! again after a load. A load goes into an empty database only, and writes the format record
//! last: a load that fails midway leaves a database that gateways refuse, never a half tree.

use std::io::{BufRead, Write};

use serde_json::{json, Value};

use crate::keys;
use crate::kv::{Durability, KvError, KvStore, Sequence};
use crate::rules::FORMAT_VERSION;
use crate::{MetaError, Result};

const DUMP_VERSION: u64 = 1;
/// Records read per scan and written per transaction.
const BATCH: usize = 1000;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str, line: usize) -> Result<Vec<u8>> {
    let bad = || MetaError::Invalid(format!("dump line {line}: {text:?} is not hex"));
    if !text.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

fn io_error(error: std::io::Error) -> MetaError {
    MetaError::Backend(KvError::Failed(format!("dump file: {error}")))
}

/// What a dump or load moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpSummary {
    pub records: u64,
}

/// Writes every record of `store` to `out`.
pub async fn dump(store: &dyn KvStore, out: &mut impl Write) -> Result<DumpSummary> {
    let mut tx = store.begin(false).await?;
    let format = tx.get(keys::FORMAT).await?.ok_or_else(|| {
        MetaError::Invalid("the database holds no stagefs file system (no format record)".into())
    })?;
    let format = keys::decode_u64("format version", &format)?;
    // Read after the snapshot began (with the format record), so every id it holds is below.
    let mut sequences = serde_json::Map::new();
    for sequence in Sequence::ALL {
        let next = tx.take_ids(sequence, 0).await?;
        sequences.insert(sequence.name().into(), json!(next));
    }
    let header = json!({
        "stagefs_meta_dump": DUMP_VERSION,
        "format_version": format,
        "backend": store.kind(),
        "sequences": sequences,
    });
    writeln!(out, "{header}").map_err(io_error)?;
    // Page by page, straight to `out`: a dump never holds the whole database in memory.
    let mut count = 0u64;
    let mut start = Vec::new();
    let end = vec![0xff];
    loop {
        let page = tx.scan(&start, &end, BATCH).await?;
        for (key, value) in &page {
            // Sequences travel in the header: a backend may keep them outside the key space.
            if key.first() == Some(&b'n') {
                continue;
            }
            writeln!(out, "{}", json!({"k": hex(key), "v": hex(value)})).map_err(io_error)?;
            count += 1;
        }
        match page.last() {
            Some((last, _)) if page.len() == BATCH => {
                start = last.clone();
                start.push(0);
            }
            _ => break,
        }
    }
    writeln!(out, "{}", json!({"end": true, "records": count})).map_err(io_error)?;
    out.flush().map_err(io_error)?;
    Ok(DumpSummary { records: count })
}

/// Loads a dump into `store`, which must be empty.
pub async fn load(store: &dyn KvStore, input: impl BufRead) -> Result<DumpSummary> {
    {
        let mut tx = store.begin(false).await?;
        if !tx.scan(&[], &[0xff], 1).await?.is_empty() {
            return Err(MetaError::Invalid(
                "the target database is not empty: load into a new database".into(),
            ));
        }
    }
    let mut lines = input.lines().enumerate();
    let header = match lines.next() {
        Some((_, line)) => line.map_err(io_error)?,
        None => return Err(MetaError::Invalid("the dump is empty".into())),
    };
    let header: Value = serde_json::from_str(&header)
        .map_err(|e| MetaError::Invalid(format!("dump header: {e}")))?;
    if header["stagefs_meta_dump"] != DUMP_VERSION {
        return Err(MetaError::Invalid(format!(
            "not a stagefs metadata dump of version {DUMP_VERSION}: {header}"
        )));
    }
    if header["format_version"] != FORMAT_VERSION {
        return Err(MetaError::Invalid(format!(
            "the dump holds metadata format {}, this build writes {FORMAT_VERSION}",
            header["format_version"]
        )));
    }
    let mut batch = Vec::with_capacity(BATCH);
    let mut format_record = None;
    let mut count = 0u64;
    let mut ended = false;
    for (index, line) in lines {
        let line_no = index + 1;
        let line = line.map_err(io_error)?;
        let record: Value = serde_json::from_str(&line)
            .map_err(|e| MetaError::Invalid(format!("dump line {line_no}: {e}")))?;
        if record["end"] == true {
            if record["records"] != count {
                return Err(MetaError::Invalid(format!(
                    "the dump announces {} records but holds {count}",
                    record["records"]
                )));
            }
            ended = true;
            break;
        }
        let (Some(k), Some(v)) = (record["k"].as_str(), record["v"].as_str()) else {
            return Err(MetaError::Invalid(format!(
                "dump line {line_no}: no k and v"
            )));
        };
        let (key, value) = (unhex(k, line_no)?, unhex(v, line_no)?);
        count += 1;
        if key == keys::FORMAT {
            format_record = Some(value);
            continue;
        }
        batch.push((key, Some(value)));
        if batch.len() == BATCH {
            commit(store, std::mem::take(&mut batch)).await?;
        }
    }
    if !ended {
        return Err(MetaError::Invalid(
            "the dump is cut off (no end line): nothing usable was loaded; drop the database \
             and load a whole dump"
                .into(),
        ));
    }
    commit(store, batch).await?;
    // Sequences up to where the dump's were, then the format record: now it is a file system.
    let mut tx = store.begin(true).await?;
    for sequence in Sequence::ALL {
        let want = header["sequences"][sequence.name()]
            .as_u64()
            .ok_or_else(|| {
                MetaError::Invalid(format!("dump header without sequence {}", sequence.name()))
            })?;
        let next = tx.take_ids(sequence, 0).await?;
        if want > next {
            tx.take_ids(sequence, want - next).await?;
        }
    }
    let format = format_record
        .ok_or_else(|| MetaError::Invalid("the dump holds no format record".into()))?;
    tx.commit(
        vec![(keys::FORMAT.to_vec(), Some(format))],
        Durability::Durable,
    )
    .await?;
    Ok(DumpSummary { records: count })
}

async fn commit(store: &dyn KvStore, writes: Vec<crate::kv::Write>) -> Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let tx = store.begin(true).await?;
    tx.commit(writes, Durability::Durable).await?;
    Ok(())
}
