//! The result of `stagefs bench fs`: one JSON object (`--json`), a table, and the panels of the
//! chart. The headline keys (`checkpoint_ratio`, `small_files_speedup`, `appends_speedup`,
//! `raw_p99_ms`, `cold_read_ratio`) sit at the top level of the JSON.

use serde::Serialize;

use super::super::chart::Panel;
use super::super::ratio;

pub const TARGET_CHECKPOINT_RATIO: f64 = 0.5;
pub const TARGET_SMALL_FILES_SPEEDUP: f64 = 10.0;
pub const TARGET_APPENDS_SPEEDUP: f64 = 20.0;
pub const TARGET_RAW_P99_MS: f64 = 10.0;
pub const TARGET_COLD_READ_RATIO: f64 = 0.8;

/// The figures of one write mode; a workload that was not run stays `None`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModeFigures {
    pub checkpoint_mib_s: Option<f64>,
    /// Gateway mode: seconds from the checkpoint's close until the gateway had uploaded it.
    pub checkpoint_drain_s: Option<f64>,
    pub small_files_per_s: Option<f64>,
    pub appends_per_s: Option<f64>,
    pub appends_total_s: Option<f64>,
    /// The rate of the last tenth of the appends ÷ that of the first.
    pub appends_end_ratio: Option<f64>,
    /// Slices the gateway compacted during the appends (both modes share the gateway).
    pub appends_compacted_slices: Option<u64>,
    /// Appends per second in each tenth of the run: the shape behind `appends_end_ratio`.
    pub appends_tenths_per_s: Vec<f64>,
    pub raw_p50_ms: Option<f64>,
    pub raw_p99_ms: Option<f64>,
    /// Reads on mount B that failed (an error, such as EIO) and were tried again until one
    /// succeeded; the latency includes the wait.
    pub raw_failed_reads: Option<u64>,
    pub untar_files_per_s: Option<f64>,
    /// Seconds of `python3 -m venv` (lower is better).
    pub venv_s: Option<f64>,
}

/// One workload of the paired rounds (`--peer-rounds`): each round runs it on stagefs's gateway
/// mode and on JuiceFS `--writeback` back to back, so that both meet the same state of the
/// machine, whose speed drifts by more than the differences measured over the minutes between
/// the two sequences.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Paired {
    /// One figure per round, in the workload's unit (venv: seconds, lower is better).
    pub stagefs: Vec<f64>,
    pub juicefs_writeback: Vec<f64>,
    /// Each round's stagefs ÷ JuiceFS as rates (venv: JuiceFS's time ÷ ours): above 1, stagefs
    /// was faster in that round.
    pub ratios: Vec<f64>,
}

impl Paired {
    /// Adds a round; `lower_is_better` for a time.
    pub fn push(&mut self, stagefs: f64, juicefs: f64, lower_is_better: bool) {
        self.stagefs.push(stagefs);
        self.juicefs_writeback.push(juicefs);
        let r = if lower_is_better {
            ratio(juicefs, stagefs)
        } else {
            ratio(stagefs, juicefs)
        };
        self.ratios.push(r.unwrap_or(f64::NAN));
    }
}

/// The median of `values` (the mean of the two middle ones for an even count); `None` when
/// there are none or any is not a number.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// Every figure of a run. Field names are the JSON keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsReport {
    pub checkpoint_ratio: Option<f64>,
    pub small_files_speedup: Option<f64>,
    pub appends_speedup: Option<f64>,
    pub raw_p99_ms: Option<f64>,
    pub cold_read_ratio: Option<f64>,
    pub untar_speedup: Option<f64>,

    pub gateway: ModeFigures,
    pub write_through: ModeFigures,

    /// Raw `O_DIRECT` sequential writes to the gateway's device, before the gateway owns it.
    pub raw_device_mib_s: Option<f64>,
    /// The gateway's `--direct-threshold` (0: off).
    pub direct_threshold: u64,
    /// One 4 KiB PUT through the latency proxy, median (the store's own latency).
    pub store_put_p50_ms: Option<f64>,
    /// GETs of whole 4 MiB objects through the proxy, by as many streams as `cold_read` readers.
    pub raw_get_mib_s: Option<f64>,
    /// Sequential reads of write-through checkpoint files (only in the store) from a fresh mount.
    pub cold_read_mib_s: Option<f64>,
    pub local_small_files_per_s: Option<f64>,
    pub local_untar_files_per_s: Option<f64>,
    pub local_venv_s: Option<f64>,

    /// `--peer juicefs`: what `juicefs version` said, and its figures with `--writeback` and
    /// without, on the same store and proxy.
    pub juicefs_version: Option<String>,
    pub juicefs_writeback: Option<ModeFigures>,
    pub juicefs_through: Option<ModeFigures>,
    /// `vs_juicefs_{writeback,through}_{small_files,appends,checkpoint,untar,venv}`: stagefs's
    /// gateway mode ÷ JuiceFS, as rates (for venv, JuiceFS's time ÷ ours): above 1, stagefs
    /// is faster.
    /// Also `paired_vs_juicefs_writeback_{small_files,appends,untar,venv}`: the median of the
    /// paired rounds' ratios ([`Paired`]).
    #[serde(flatten)]
    pub vs_juicefs: std::collections::BTreeMap<String, f64>,
    /// The paired rounds by workload (`--peer-rounds`).
    pub paired_rounds: std::collections::BTreeMap<String, Paired>,

    pub store_delay_ms: f64,
    pub writers: usize,
    pub checkpoint_bytes_per_file: u64,
    pub small_files: usize,
    pub appends: usize,
    pub read_after_write_files: usize,
    pub untar_source: String,
    pub untar_files: usize,
    pub untar_bytes: u64,
    pub device_size: u64,
    pub quick: bool,
    pub notes: Vec<String>,
}

impl FsReport {
    /// Fills in the headline ratios from the figures.
    pub fn derive(&mut self) {
        let (g, t) = (&self.gateway, &self.write_through);
        let both = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => None,
        };
        self.checkpoint_ratio = both(g.checkpoint_mib_s, self.raw_device_mib_s);
        self.small_files_speedup = both(g.small_files_per_s, t.small_files_per_s);
        self.appends_speedup = both(g.appends_per_s, t.appends_per_s);
        self.untar_speedup = both(g.untar_files_per_s, t.untar_files_per_s);
        self.raw_p99_ms = g.raw_p99_ms;
        self.cold_read_ratio = both(self.cold_read_mib_s, self.raw_get_mib_s);
        self.vs_juicefs.clear();
        for (name, peer) in [
            ("writeback", &self.juicefs_writeback),
            ("through", &self.juicefs_through),
        ] {
            let Some(p) = peer else { continue };
            for (workload, value) in [
                (
                    "small_files",
                    both(g.small_files_per_s, p.small_files_per_s),
                ),
                ("appends", both(g.appends_per_s, p.appends_per_s)),
                ("checkpoint", both(g.checkpoint_mib_s, p.checkpoint_mib_s)),
                ("untar", both(g.untar_files_per_s, p.untar_files_per_s)),
                ("venv", both(p.venv_s, g.venv_s)),
            ] {
                if let Some(value) = value {
                    self.vs_juicefs
                        .insert(format!("vs_juicefs_{name}_{workload}"), value);
                }
            }
        }
        for (workload, paired) in &self.paired_rounds {
            if let Some(value) = median(&paired.ratios) {
                self.vs_juicefs
                    .insert(format!("paired_vs_juicefs_writeback_{workload}"), value);
            }
        }
    }

    /// The side-by-side rows of `--peer juicefs`: each workload on stagefs's gateway mode and on
    /// JuiceFS with and without `--writeback`, and the ratios (above 1: stagefs is faster).
    fn peer_table(&self) -> String {
        use std::fmt::Write;
        let (Some(wb), Some(th)) = (&self.juicefs_writeback, &self.juicefs_through) else {
            return String::new();
        };
        let g = &self.gateway;
        let ratio_of = |name: &str, workload: &str| {
            self.vs_juicefs
                .get(&format!("vs_juicefs_{name}_{workload}"))
                .map_or("-".to_string(), |r| format!("{r:.2}×"))
        };
        let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} s"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nstagefs gateway mode against {} (same store and proxy, SQLite metadata on the same disk):",
            self.juicefs_version.as_deref().unwrap_or("JuiceFS")
        );
        let _ = writeln!(
            out,
            "{:<18} {:>16} {:>18} {:>18} {:>12} {:>12}",
            "workload",
            "stagefs gateway",
            "juicefs writeback",
            "juicefs through",
            "vs wb",
            "vs through"
        );
        let rows: [(&str, &str, String, String, String); 5] = [
            (
                "checkpoint",
                "checkpoint",
                rate(g.checkpoint_mib_s, "MiB/s"),
                rate(wb.checkpoint_mib_s, "MiB/s"),
                rate(th.checkpoint_mib_s, "MiB/s"),
            ),
            (
                "small_files",
                "small_files",
                rate(g.small_files_per_s, "files/s"),
                rate(wb.small_files_per_s, "files/s"),
                rate(th.small_files_per_s, "files/s"),
            ),
            (
                "appends+fsync",
                "appends",
                rate(g.appends_per_s, "/s"),
                rate(wb.appends_per_s, "/s"),
                rate(th.appends_per_s, "/s"),
            ),
            (
                "untar",
                "untar",
                rate(g.untar_files_per_s, "files/s"),
                rate(wb.untar_files_per_s, "files/s"),
                rate(th.untar_files_per_s, "files/s"),
            ),
            (
                "venv",
                "venv",
                secs(g.venv_s),
                secs(wb.venv_s),
                secs(th.venv_s),
            ),
        ];
        for (label, key, ours, writeback, through) in rows {
            let _ = writeln!(
                out,
                "{label:<18} {ours:>16} {writeback:>18} {through:>18} {:>12} {:>12}",
                ratio_of("writeback", key),
                ratio_of("through", key)
            );
        }
        let _ = writeln!(
            out,
            "{:<18} {:>16} {:>18} {:>18}",
            "read_after_write",
            latency(g),
            latency(wb),
            latency(th)
        );
        out
    }

    /// The paired rounds, one row per workload: each round's figures and ratio, and the median.
    fn paired_table(&self) -> String {
        use std::fmt::Write;
        let Some(rounds) = self.paired_rounds.values().map(|p| p.ratios.len()).max() else {
            return String::new();
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\npaired rounds, stagefs gateway / JuiceFS --writeback, run back to back (which goes \
             first alternates), each after both finished uploading:"
        );
        let mut header = format!("{:<14}", "workload");
        for round in 1..=rounds {
            let _ = write!(header, " {:>26}", format!("round {round}"));
        }
        let _ = writeln!(out, "{header} {:>8}", "median");
        for (workload, paired) in &self.paired_rounds {
            let unit = if workload == "venv" { "s" } else { "/s" };
            let mut row = format!("{workload:<14}");
            for ((ours, theirs), r) in paired
                .stagefs
                .iter()
                .zip(&paired.juicefs_writeback)
                .zip(&paired.ratios)
            {
                let figures = if workload == "venv" {
                    format!("{ours:.2} / {theirs:.2} {unit} {r:.2}×")
                } else {
                    format!("{ours:.0} / {theirs:.0}{unit} {r:.2}×")
                };
                let _ = write!(row, " {figures:>26}");
            }
            for _ in paired.ratios.len()..rounds {
                let _ = write!(row, " {:>26}", "-");
            }
            let median = median(&paired.ratios).map_or("-".to_string(), |m| format!("{m:.2}×"));
            let _ = writeln!(out, "{row} {median:>8}");
        }
        out
    }

    pub fn table(&self) -> String {
        let (g, t) = (&self.gateway, &self.write_through);
        let rows: Vec<[String; 6]> = vec![
            [
                "checkpoint".into(),
                rate(g.checkpoint_mib_s, "MiB/s"),
                rate(t.checkpoint_mib_s, "MiB/s"),
                format!("raw device {}", rate(self.raw_device_mib_s, "MiB/s")),
                times(self.checkpoint_ratio, " of raw"),
                format!("≥ {TARGET_CHECKPOINT_RATIO}"),
            ],
            [
                "small_files".into(),
                rate(g.small_files_per_s, "files/s"),
                rate(t.small_files_per_s, "files/s"),
                format!("local {}", rate(self.local_small_files_per_s, "files/s")),
                times(self.small_files_speedup, "×"),
                format!("≥ {TARGET_SMALL_FILES_SPEEDUP}×"),
            ],
            [
                "appends+fsync".into(),
                appends(g),
                appends(t),
                format!("store PUT p50 {}", ms(self.store_put_p50_ms)),
                times(self.appends_speedup, "×"),
                format!("≥ {TARGET_APPENDS_SPEEDUP}×"),
            ],
            [
                "read_after_write".into(),
                latency(g),
                latency(t),
                "(open+read on mount B)".into(),
                format!("p99 {}", ms(self.raw_p99_ms)),
                format!("≤ {TARGET_RAW_P99_MS} ms"),
            ],
            [
                "cold_read".into(),
                rate(self.cold_read_mib_s, "MiB/s"),
                "(same: reads)".into(),
                format!("raw GET {}", rate(self.raw_get_mib_s, "MiB/s")),
                times(self.cold_read_ratio, " of raw"),
                format!("≥ {TARGET_COLD_READ_RATIO}"),
            ],
            [
                "untar".into(),
                rate(g.untar_files_per_s, "files/s"),
                rate(t.untar_files_per_s, "files/s"),
                format!("local {}", rate(self.local_untar_files_per_s, "files/s")),
                times(self.untar_speedup, "×"),
                "-".into(),
            ],
        ];
        let header = [
            "workload",
            "stagefs gateway",
            "write-through",
            "reference",
            "ratio",
            "target",
        ]
        .map(String::from);
        let mut widths = [0usize; 6];
        for row in std::iter::once(&header).chain(&rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |row: &[String; 6]| {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        };
        let mut out = format!(
            "stagefs bench fs: every store request pays {} ms (s3s-fs behind the latency proxy); \
             {} writers × {} checkpoint, {} small files, {} appends, {} read-after-write files, \
             untar of {} files from {}\n\n",
            self.store_delay_ms,
            self.writers,
            shared::size::format_size(self.checkpoint_bytes_per_file),
            self.small_files,
            self.appends,
            self.read_after_write_files,
            self.untar_files,
            self.untar_source,
        );
        out.push_str(&line(&header));
        for row in &rows {
            out.push_str(&line(row));
        }
        if let Some(drain) = self.gateway.checkpoint_drain_s {
            out.push_str(&format!(
                "gateway mode: the checkpoint was in the store {drain:.1} s after its close \
                 returned (the run waits for it before the next workload)\n"
            ));
        }
        if let (Some(g), Some(t)) = (self.gateway.venv_s, self.write_through.venv_s) {
            out.push_str(&format!(
                "venv (python3 -m venv): gateway {g:.1} s, write-through {t:.1} s, local {}\n",
                self.local_venv_s
                    .map_or("-".to_string(), |l| format!("{l:.1} s"))
            ));
        }
        out.push_str(&self.peer_table());
        out.push_str(&self.paired_table());
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }

    /// One chart panel per workload, each with its own unit; with `--peer juicefs`, JuiceFS's
    /// bars beside ours.
    pub fn panels(&self) -> Vec<Panel> {
        let (g, t) = (&self.gateway, &self.write_through);
        let none = ModeFigures::default();
        let jw = self.juicefs_writeback.as_ref().unwrap_or(&none);
        let jt = self.juicefs_through.as_ref().unwrap_or(&none);
        let panel = |title: &str, unit: &str, bars: &[(&str, Option<f64>)]| Panel {
            title: title.into(),
            unit: unit.into(),
            bars: bars
                .iter()
                .filter_map(|(label, value)| value.map(|v| (label.to_string(), v)))
                .collect(),
        };
        const GW: &str = "stagefs gateway";
        const WT: &str = "write-through";
        const JW: &str = "JuiceFS --writeback";
        const JT: &str = "JuiceFS";
        vec![
            panel(
                "checkpoint",
                "MiB/s",
                &[
                    (GW, g.checkpoint_mib_s),
                    (WT, t.checkpoint_mib_s),
                    (JW, jw.checkpoint_mib_s),
                    (JT, jt.checkpoint_mib_s),
                    ("raw device", self.raw_device_mib_s),
                ],
            ),
            panel(
                "small_files (4 KiB)",
                "files/s",
                &[
                    (GW, g.small_files_per_s),
                    (WT, t.small_files_per_s),
                    (JW, jw.small_files_per_s),
                    (JT, jt.small_files_per_s),
                    ("local disk", self.local_small_files_per_s),
                ],
            ),
            panel(
                "appends + fsync",
                "appends/s",
                &[
                    (GW, g.appends_per_s),
                    (WT, t.appends_per_s),
                    (JW, jw.appends_per_s),
                    (JT, jt.appends_per_s),
                ],
            ),
            panel(
                "read_after_write p99",
                "ms (lower is better)",
                &[(GW, g.raw_p99_ms), (WT, t.raw_p99_ms), (JW, jw.raw_p99_ms)],
            ),
            panel(
                "cold_read",
                "MiB/s",
                &[
                    ("stagefs mount", self.cold_read_mib_s),
                    ("raw GET", self.raw_get_mib_s),
                ],
            ),
            panel(
                "untar",
                "files/s",
                &[
                    (GW, g.untar_files_per_s),
                    (WT, t.untar_files_per_s),
                    (JW, jw.untar_files_per_s),
                    (JT, jt.untar_files_per_s),
                    ("local disk", self.local_untar_files_per_s),
                ],
            ),
            panel(
                "venv (python3 -m venv)",
                "s (lower is better)",
                &[
                    (GW, g.venv_s),
                    (WT, t.venv_s),
                    (JW, jw.venv_s),
                    (JT, jt.venv_s),
                    ("local disk", self.local_venv_s),
                ],
            ),
        ]
    }
}

fn rate(value: Option<f64>, unit: &str) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0} {unit}"),
        Some(v) => format!("{v:.1} {unit}"),
        None => "-".into(),
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.1} ms"))
}

fn times(value: Option<f64>, suffix: &str) -> String {
    value.map_or("-".into(), |v| format!("{v:.2}{suffix}"))
}

fn appends(m: &ModeFigures) -> String {
    match (m.appends_per_s, m.appends_total_s, m.appends_end_ratio) {
        (Some(rate), Some(total), Some(end)) => {
            format!("{rate:.0}/s ({total:.1} s; end {end:.2}× start)")
        }
        (Some(rate), Some(total), None) => format!("{rate:.0}/s ({total:.1} s)"),
        _ => "-".into(),
    }
}

fn latency(m: &ModeFigures) -> String {
    match (m.raw_p50_ms, m.raw_p99_ms, m.raw_failed_reads) {
        (Some(p50), Some(p99), Some(failed)) if failed > 0 => {
            format!("p50 {p50:.1} / p99 {p99:.1} ms, {failed} failed reads")
        }
        (Some(p50), Some(p99), _) => format!("p50 {p50:.1} / p99 {p99:.1} ms"),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headline_keys_come_from_the_figures() {
        let mut report = FsReport {
            gateway: ModeFigures {
                checkpoint_mib_s: Some(500.0),
                small_files_per_s: Some(3000.0),
                appends_per_s: Some(900.0),
                raw_p99_ms: Some(4.0),
                ..ModeFigures::default()
            },
            write_through: ModeFigures {
                small_files_per_s: Some(100.0),
                appends_per_s: Some(30.0),
                ..ModeFigures::default()
            },
            raw_device_mib_s: Some(1000.0),
            cold_read_mib_s: Some(90.0),
            raw_get_mib_s: Some(100.0),
            ..FsReport::default()
        };
        report.derive();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checkpoint_ratio"], 0.5);
        assert_eq!(json["small_files_speedup"], 30.0);
        assert_eq!(json["appends_speedup"], 30.0);
        assert_eq!(json["raw_p99_ms"], 4.0);
        assert_eq!(json["cold_read_ratio"], 0.9);
        assert!(json["untar_speedup"].is_null());
        let table = report.table();
        assert!(
            table.contains("500 MiB/s") && table.contains("30.00×"),
            "{table}"
        );
        assert_eq!(report.panels().len(), 7);
    }

    #[test]
    fn paired_rounds_report_each_rounds_ratio_and_their_median() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
        let mut report = FsReport::default();
        let small = report
            .paired_rounds
            .entry("small_files".into())
            .or_default();
        for (ours, theirs) in [(800.0, 400.0), (300.0, 400.0), (900.0, 600.0)] {
            small.push(ours, theirs, false);
        }
        let venv = report.paired_rounds.entry("venv".into()).or_default();
        // Seconds: JuiceFS's time ÷ ours.
        venv.push(5.0, 6.0, true);
        venv.push(6.0, 6.0, true);
        report.derive();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["paired_rounds"]["small_files"]["ratios"],
            serde_json::json!([2.0, 0.75, 1.5])
        );
        assert_eq!(json["paired_vs_juicefs_writeback_small_files"], 1.5);
        assert_eq!(json["paired_vs_juicefs_writeback_venv"], 1.1);
        let table = report.table();
        assert!(
            table.contains("800 / 400/s 2.00×") && table.contains("1.50×"),
            "{table}"
        );
        assert!(table.contains("5.00 / 6.00 s 1.20×"), "{table}");
    }

    #[test]
    fn the_chart_puts_juicefs_beside_stagefs_when_it_ran() {
        let mut report = FsReport {
            gateway: ModeFigures {
                small_files_per_s: Some(400.0),
                venv_s: Some(12.0),
                ..ModeFigures::default()
            },
            ..FsReport::default()
        };
        let bars = |report: &FsReport, title: &str| -> Vec<String> {
            report
                .panels()
                .into_iter()
                .find(|p| p.title.starts_with(title))
                .unwrap()
                .bars
                .into_iter()
                .map(|(label, _)| label)
                .collect()
        };
        assert_eq!(bars(&report, "small_files"), ["stagefs gateway"]);
        report.juicefs_writeback = Some(ModeFigures {
            small_files_per_s: Some(480.0),
            venv_s: Some(9.0),
            ..ModeFigures::default()
        });
        assert_eq!(
            bars(&report, "small_files"),
            ["stagefs gateway", "JuiceFS --writeback"]
        );
        assert_eq!(
            bars(&report, "venv"),
            ["stagefs gateway", "JuiceFS --writeback"]
        );
    }
}
