//! Summary statistics of repeated measurements: median and nearest-rank percentiles, and how
//! results are formatted in the report (milliseconds, MiB, ratios).

/// The `p`-th percentile (0 < p ≤ 100) of `samples` by the nearest-rank method; `None` when
/// there are no samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of `samples` (the mean of the two middle values for an even count).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// `a / b` formatted as `0.42×`, or `n/a` when either side is missing or `b` is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".to_owned(),
    }
}

/// A value with a unit, or `n/a`.
pub fn show(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if unit == "ms" => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} {unit}"),
        None => "n/a".to_owned(),
    }
}

/// The samples as a compact list, e.g. `[812, 790, 805]`, for the raw-data lines of the report.
pub fn list(samples: &[f64]) -> String {
    let parts: Vec<String> = samples.iter().map(|v| format!("{v:.0}")).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 10.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn ratios_and_missing_values() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25×");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "n/a");
        assert_eq!(ratio(None, Some(1.0)), "n/a");
        assert_eq!(show(Some(12.34), "MiB"), "12.3 MiB");
        assert_eq!(show(Some(812.6), "ms"), "813 ms");
        assert_eq!(show(None, "ms"), "n/a");
    }
}
