//! The result of `stagefs bench gateway`: one JSON object, or a table of each figure next to the
//! hardware limit it is measured against.

use serde::Serialize;

use super::load::{ChannelMode, Transport};

/// Lower bounds the ratios should reach.
pub const TARGET_INGEST_RATIO_16: f64 = 0.6;
pub const TARGET_GROUP_COMMIT_RATIO: f64 = 5.0;
pub const TARGET_DRAIN_RATIO: f64 = 0.8;
/// TLS and tokens may cost at most 10 % of 4 MiB ingest (issue "Safe to share").
pub const TARGET_SECURE_RATIO: f64 = 0.9;

/// Every figure of a run. Field names are the JSON keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub device: String,
    pub device_size: u64,
    pub store: String,
    pub io_engine: String,
    pub quick: bool,
    pub upload_concurrency: usize,

    pub raw_seq_write_mib_s: f64,
    pub raw_seq_write_mib_s_1: f64,
    pub raw_seq_write_mib_s_4: f64,
    pub raw_seq_write_writers: usize,
    pub raw_seq_write_bytes: u64,
    pub raw_fsync_per_s: f64,
    /// 16 writers of 4 MiB, each write followed by its own fdatasync (no gateway).
    pub raw_durable_write_mib_s_16: f64,

    pub ingest_case_bytes: u64,
    pub ingest_mib_s_1: f64,
    pub ingest_mib_s_4: f64,
    pub ingest_mib_s_16: f64,
    pub ingest_mode_1: Option<ChannelMode>,
    pub ingest_mode_4: Option<ChannelMode>,
    pub ingest_mode_16: Option<ChannelMode>,
    pub ingest_shared_mib_s_4: f64,
    pub ingest_per_writer_mib_s_4: f64,
    pub ingest_shared_mib_s_16: f64,
    pub ingest_per_writer_mib_s_16: f64,
    pub ingest_ratio_1: Option<f64>,
    pub ingest_ratio_4: Option<f64>,
    pub ingest_ratio_16: Option<f64>,
    /// Ingest from 16 writers ÷ raw_durable_write_mib_s_16: against durable writes without a gateway.
    pub ingest_durable_ratio_16: Option<f64>,
    /// 4 writers, a connection each, against a gateway serving TLS with tokens.
    pub ingest_secure_mib_s_4: f64,
    /// ingest_secure_mib_s_4 ÷ ingest_per_writer_mib_s_4: what TLS and tokens cost.
    pub ingest_secure_ratio_4: Option<f64>,

    pub group_commit_writers: usize,
    pub group_commit_mode: Option<ChannelMode>,
    /// The faster of the two transports; its figures are the group_commit_* ones.
    pub group_commit_transport: Option<Transport>,
    pub group_commit_rpc_blocks_per_s: f64,
    pub group_commit_stream_blocks_per_s: f64,
    pub group_commit_blocks: u64,
    pub group_commit_blocks_per_s: f64,
    pub group_commit_p50_ms: f64,
    pub group_commit_p99_ms: f64,
    pub group_commit_ratio: Option<f64>,

    pub drain_bytes: u64,
    pub drain_mib_s: f64,
    pub store_put_mib_s: f64,
    pub drain_ratio: Option<f64>,

    pub recovery_bytes: u64,
    pub recovery_staged_blocks: u64,
    pub recovery_s: f64,
    pub recovery_gateway_ms: u64,
    pub recovered_blocks: u64,
    pub recovery_corrupt_records: u64,

    pub targets: Targets,
    /// Problems that did not stop the run (the gateway recovered fewer blocks than staged, ...).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    pub ingest_ratio_16: f64,
    pub group_commit_ratio: f64,
    pub drain_ratio: f64,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            ingest_ratio_16: TARGET_INGEST_RATIO_16,
            group_commit_ratio: TARGET_GROUP_COMMIT_RATIO,
            drain_ratio: TARGET_DRAIN_RATIO,
        }
    }
}

fn fmt_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}"))
}

fn fmt_target(ratio: Option<f64>, target: f64) -> String {
    match ratio {
        Some(r) if r >= target => format!(">= {target} ok"),
        Some(_) => format!(">= {target} BELOW"),
        None => format!(">= {target} ?"),
    }
}

fn mode(mode: Option<ChannelMode>) -> String {
    mode.map_or_else(String::new, |m| format!(", {m}"))
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let seq_limit = format!("raw seq write {:.1} MiB/s", self.raw_seq_write_mib_s);
        let rows: Vec<[String; 5]> = vec![
            [
                "raw seq write".into(),
                format!(
                    "{:.1} MiB/s ({} writer{}; 1: {:.1}, 4: {:.1})",
                    self.raw_seq_write_mib_s,
                    self.raw_seq_write_writers,
                    if self.raw_seq_write_writers == 1 {
                        ""
                    } else {
                        "s"
                    },
                    self.raw_seq_write_mib_s_1,
                    self.raw_seq_write_mib_s_4
                ),
                "O_DIRECT 4 MiB writes + fdatasync".into(),
                String::new(),
                String::new(),
            ],
            [
                "raw durable x16".into(),
                format!("{:.1} MiB/s", self.raw_durable_write_mib_s_16),
                "16 writers, O_DIRECT 4 MiB write + fdatasync each".into(),
                String::new(),
                String::new(),
            ],
            [
                "raw fdatasync".into(),
                format!("{:.0} writes/s", self.raw_fsync_per_s),
                "O_DIRECT 4 KiB write + fdatasync".into(),
                String::new(),
                String::new(),
            ],
            [
                "ingest x1".into(),
                format!(
                    "{:.1} MiB/s{}",
                    self.ingest_mib_s_1,
                    mode(self.ingest_mode_1)
                ),
                seq_limit.clone(),
                fmt_ratio(self.ingest_ratio_1),
                String::new(),
            ],
            [
                "ingest x4".into(),
                format!(
                    "{:.1} MiB/s{}",
                    self.ingest_mib_s_4,
                    mode(self.ingest_mode_4)
                ),
                seq_limit.clone(),
                fmt_ratio(self.ingest_ratio_4),
                String::new(),
            ],
            [
                "ingest x16".into(),
                format!(
                    "{:.1} MiB/s{}",
                    self.ingest_mib_s_16,
                    mode(self.ingest_mode_16)
                ),
                seq_limit,
                fmt_ratio(self.ingest_ratio_16),
                fmt_target(self.ingest_ratio_16, TARGET_INGEST_RATIO_16),
            ],
            [
                "ingest x16".into(),
                "(same run)".into(),
                format!(
                    "raw durable x16 {:.1} MiB/s",
                    self.raw_durable_write_mib_s_16
                ),
                fmt_ratio(self.ingest_durable_ratio_16),
                String::new(),
            ],
            [
                "ingest x4, TLS + tokens".into(),
                format!("{:.1} MiB/s", self.ingest_secure_mib_s_4),
                format!(
                    "plain x4 per-writer {:.1} MiB/s",
                    self.ingest_per_writer_mib_s_4
                ),
                fmt_ratio(self.ingest_secure_ratio_4),
                fmt_target(self.ingest_secure_ratio_4, TARGET_SECURE_RATIO),
            ],
            [
                format!("group commit x{}", self.group_commit_writers),
                format!(
                    "{:.0} blocks/s, p50 {:.2} ms, p99 {:.2} ms, {} (RPC per block: {:.0}/s)",
                    self.group_commit_blocks_per_s,
                    self.group_commit_p50_ms,
                    self.group_commit_p99_ms,
                    self.group_commit_transport
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    self.group_commit_rpc_blocks_per_s
                ),
                format!("raw fdatasync {:.0}/s", self.raw_fsync_per_s),
                fmt_ratio(self.group_commit_ratio),
                fmt_target(self.group_commit_ratio, TARGET_GROUP_COMMIT_RATIO),
            ],
            [
                "drain".into(),
                format!("{:.1} MiB/s", self.drain_mib_s),
                format!("store put {:.1} MiB/s", self.store_put_mib_s),
                fmt_ratio(self.drain_ratio),
                fmt_target(self.drain_ratio, TARGET_DRAIN_RATIO),
            ],
            [
                "recovery".into(),
                format!(
                    "{:.2} s to first Status ({} ms in gateway, {} blocks)",
                    self.recovery_s, self.recovery_gateway_ms, self.recovered_blocks
                ),
                format!("{:.1} MiB staged", self.recovery_bytes as f64 / super::MIB),
                String::new(),
                String::new(),
            ],
        ];
        let header = ["phase", "figure", "limit", "ratio", "target"];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                out.push_str(&format!("{cell:<w$}"));
            }
            out.trim_end().to_string() + "\n"
        };
        let mut out = format!(
            "stagefs gateway benchmark: device {} ({} MiB), store {}, io engine {}{}\n\n",
            self.device,
            self.device_size >> 20,
            self.store,
            self.io_engine,
            if self.quick { ", quick" } else { "" }
        );
        out.push_str(&line(header));
        let rule = widths.map(|w| "-".repeat(w));
        out.push_str(&line([&rule[0], &rule[1], &rule[2], &rule[3], &rule[4]]));
        for row in &rows {
            out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
        }
        for warning in &self.warnings {
            out.push_str(&format!("\nwarning: {warning}"));
        }
        if !self.warnings.is_empty() {
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_json_render() {
        let report = Report {
            ingest_ratio_16: Some(0.7),
            drain_ratio: Some(0.5),
            ..Default::default()
        };
        let table = report.table();
        assert!(table.contains(">= 0.6 ok"));
        assert!(table.contains(">= 0.8 BELOW"));
        let json: serde_json::Value = serde_json::to_value(&report).unwrap_or_default();
        assert!(json.get("ingest_ratio_16").is_some());
        assert!(json.get("recovery_s").is_some());
    }
}
