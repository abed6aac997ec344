//! Placeholder until the chart renderer lands.
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub bars: Vec<(String, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("chart drawing failed: {0}")]
    Draw(String),
}

pub fn render_png(
    _title: &str,
    _panels: &[Panel],
    _path: &std::path::Path,
) -> Result<(), ChartError> {
    Err(ChartError::Draw("not built yet".into()))
}
