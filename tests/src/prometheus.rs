//! Prometheus text as the tests read it from a `/metrics` endpoint.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// Samples of one scrape: `name{labels}` → value. Panics on a line that is not Prometheus text.
pub fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    let mut samples = BTreeMap::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# TYPE ") || line.starts_with("# HELP "),
                "not a Prometheus comment: {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "not a metric name: {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line:?}");
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

/// The value of `series` (exact, labels included), panicking with what there is when missing.
pub fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| {
        let prefix = series.split('{').next().unwrap();
        let similar: Vec<&String> = samples.keys().filter(|k| k.starts_with(prefix)).collect();
        panic!("no {series} in /metrics; series of that name: {similar:?}")
    })
}
