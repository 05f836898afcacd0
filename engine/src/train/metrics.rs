//! The authors' reward and log-prob metrics (names kept: ../shared/reference/WRPO.md, "Metrics"),
//! averaged over the rows of a logging interval, and the `metrics.jsonl` writer.
//!
//! Per row, with rewards already β-scaled by the loss: `rewards/chosen` = the α-weighted chosen
//! reward, `rewards/margins` = its mean difference to the rejected rewards, `rewards/accuracies` =
//! the fraction of rejected responses it beats; `source_`/`pivot_` accuracies compare the mean
//! source reward / the target reward with each rejected one, per row (the authors' pivot accuracy
//! broadcasts B×B by mistake). Log-probs are the policy's summed completion log-probs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

/// One row's numbers from a micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    /// α used.
    pub alpha: f64,
    /// Policy log-probs of the chosen responses (K sources, then the target).
    pub policy_chosen: Vec<f64>,
    /// Policy log-probs of the rejected responses.
    pub policy_rejected: Vec<f64>,
    /// α-weighted chosen reward.
    pub reward_chosen: f64,
    /// Mean source reward.
    pub reward_source: f64,
    /// Target reward.
    pub reward_target: f64,
    /// Rejected rewards.
    pub reward_rejected: Vec<f64>,
}

/// The per-row metrics, in the order [`Meter::packed`] lays them out.
pub const ROW_METRICS: [&str; 12] = [
    "rewards/chosen",
    "rewards/source_chosen",
    "rewards/target_chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/source_accuracies",
    "rewards/pivot_accuracies",
    "logps/chosen",
    "logps/source_chosen",
    "logps/target_chosen",
    "logps/rejected",
];

/// Running sums of the metrics over rows.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    sums: [f64; 12],
    rows: usize,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn frac(v: &[f64], above: f64) -> f64 {
    v.iter().filter(|&&x| above > x).count() as f64 / v.len() as f64
}

impl Meter {
    /// Add one row.
    pub fn add(&mut self, r: &RowStats) {
        let k1 = r.policy_chosen.len();
        let target = r.policy_chosen[k1 - 1];
        let source = if k1 > 1 {
            mean(&r.policy_chosen[..k1 - 1])
        } else {
            target
        };
        let rj = &r.reward_rejected;
        // In the order of ROW_METRICS.
        let values = [
            r.reward_chosen,
            r.reward_source,
            r.reward_target,
            mean(rj),
            r.reward_chosen - mean(rj),
            frac(rj, r.reward_chosen),
            frac(rj, r.reward_source),
            frac(rj, r.reward_target),
            r.alpha * source + (1.0 - r.alpha) * target,
            source,
            target,
            mean(&r.policy_rejected),
        ];
        for (s, v) in self.sums.iter_mut().zip(values) {
            *s += v;
        }
        self.rows += 1;
    }

    /// Rows added.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The sums then the row count, 13 numbers (to add meters of several peers in one
    /// all-reduce).
    pub fn packed(&self) -> Vec<f64> {
        let mut v = self.sums.to_vec();
        v.push(self.rows as f64);
        v
    }

    /// Add a meter laid out by [`Meter::packed`].
    pub fn add_packed(&mut self, v: &[f64]) {
        for (s, x) in self.sums.iter_mut().zip(v) {
            *s += x;
        }
        self.rows += v[12].round() as usize;
    }

    /// Means, keyed with `prefix` (`""` or `"eval/"`), added to `out` (nothing without rows).
    pub fn write_into(&self, prefix: &str, out: &mut Map<String, Value>) {
        if self.rows == 0 {
            return;
        }
        for (k, s) in ROW_METRICS.iter().zip(&self.sums) {
            out.insert(format!("{prefix}{k}"), json_f64(s / self.rows as f64));
        }
    }
}

/// A JSON number, or `null` for a non-finite value (JSON has no NaN).
pub fn json_f64(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Appends records to `OUTPUT/metrics.jsonl`, one JSON object per line, flushed per record.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsFile {
    /// Open for appending; on resume, records after `keep_until_step` (from the interrupted run)
    /// are dropped first so the file reads as one run.
    pub fn open(path: &Path, keep_until_step: Option<u64>) -> Result<Self> {
        if let Some(last) = keep_until_step {
            if path.exists() {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s <= last)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                crate::util::write_atomic(path, kept.as_bytes())?;
            }
        } else if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Append one record.
    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_string(record).expect("JSON serialises");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_metrics_on_hand_values() {
        let mut m = Meter::default();
        // K = 2 sources, R = 2 rejected; α = 0.25.
        m.add(&RowStats {
            alpha: 0.25,
            policy_chosen: vec![-10.0, -14.0, -4.0],
            policy_rejected: vec![-6.0, -8.0],
            reward_chosen: 0.5,
            reward_source: -1.0,
            reward_target: 1.0,
            reward_rejected: vec![0.0, 0.75],
        });
        let mut out = Map::new();
        m.write_into("", &mut out);
        let g = |k: &str| out[k].as_f64().unwrap();
        assert_eq!(g("rewards/rejected"), 0.375);
        assert_eq!(g("rewards/margins"), 0.125);
        assert_eq!(g("rewards/accuracies"), 0.5); // 0.5 > 0 only
        assert_eq!(g("rewards/source_accuracies"), 0.0);
        assert_eq!(g("rewards/pivot_accuracies"), 1.0);
        assert_eq!(g("logps/source_chosen"), -12.0);
        assert_eq!(g("logps/target_chosen"), -4.0);
        assert_eq!(g("logps/chosen"), 0.25 * -12.0 + 0.75 * -4.0);
        assert_eq!(g("logps/rejected"), -7.0);
    }
}
