//! Update counts, the learning-rate schedule (HF `get_*_schedule_with_warmup`) and the data order.

use super::config::{LrSchedule, TrainConfig};

/// How a run is laid out in optimizer updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Rows in the training split.
    pub rows: usize,
    /// Rows per optimizer update (`per_device_train_batch_size × gradient_accumulation_steps ×
    /// peers`).
    pub global_batch: usize,
    /// Rows of an update that one peer computes (`per_device_train_batch_size ×
    /// gradient_accumulation_steps`).
    pub per_peer: usize,
    /// Updates per epoch (`ceil(rows / global_batch)`; a last partial batch is still an update).
    pub updates_per_epoch: usize,
    /// Total updates T (`max_steps` when > 0, else epochs × updates per epoch).
    pub total: usize,
    /// Warm-up updates W (`warmup_steps` when > 0, else `ceil(warmup_ratio · T)`).
    pub warmup: usize,
}

impl Plan {
    /// The plan of `cfg` over `rows` rows with `peers` data-parallel peers (devices × nodes; 1
    /// without data parallelism). Updates, and so the α and LR schedules, count global updates.
    /// Sizes whose products overflow are an error naming the settings.
    pub fn new(cfg: &TrainConfig, rows: usize, peers: usize) -> anyhow::Result<Self> {
        let per_peer = cfg
            .per_device_train_batch_size
            .checked_mul(cfg.gradient_accumulation_steps)
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "per_device_train_batch_size ({}) × gradient_accumulation_steps ({}) must be between 1 and {}",
                    cfg.per_device_train_batch_size,
                    cfg.gradient_accumulation_steps,
                    usize::MAX
                )
            })?;
        let global_batch = per_peer.checked_mul(peers.max(1)).ok_or_else(|| {
            anyhow::anyhow!("rows per update ({per_peer}) × {peers} data-parallel peers overflows")
        })?;
        let updates_per_epoch = rows.div_ceil(global_batch).max(1);
        let total = if cfg.max_steps > 0 {
            usize::try_from(cfg.max_steps)
                .map_err(|_| anyhow::anyhow!("max_steps {} is too large", cfg.max_steps))?
        } else {
            cfg.num_train_epochs
                .checked_mul(updates_per_epoch)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "num_train_epochs ({}) × {updates_per_epoch} updates per epoch overflows",
                        cfg.num_train_epochs
                    )
                })?
        };
        let warmup = if cfg.warmup_steps > 0 {
            cfg.warmup_steps
        } else {
            (cfg.warmup_ratio * total as f64).ceil() as usize
        };
        Ok(Plan {
            rows,
            global_batch,
            per_peer,
            updates_per_epoch,
            total,
            warmup,
        })
    }

    /// Epoch and position in the epoch of update `s` (0-based).
    pub fn locate(&self, s: usize) -> (usize, usize) {
        (s / self.updates_per_epoch, s % self.updates_per_epoch)
    }

    /// Fraction of epochs done after `done` updates (HF's logged `epoch`).
    pub fn epoch_after(&self, done: usize) -> f64 {
        done as f64 / self.updates_per_epoch as f64
    }
}

/// Multiplier of the peak learning rate for update `s` (0-based: the first update uses
/// `lr_factor(0)`, which is 0 with a warm-up, as in HF).
pub fn lr_factor(kind: LrSchedule, s: usize, warmup: usize, total: usize) -> f64 {
    let (s, w, t) = (s as f64, warmup as f64, total as f64);
    if s < w && kind != LrSchedule::Constant {
        return s / w.max(1.0);
    }
    match kind {
        LrSchedule::Constant | LrSchedule::ConstantWithWarmup => 1.0,
        LrSchedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        LrSchedule::Cosine => {
            let progress = (s - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// Row order of `epoch`: file order, or a permutation drawn from `(seed, epoch)` alone, so a
/// resumed run recomputes it from its step count.
pub fn epoch_order(rows: usize, epoch: usize, shuffle: bool, seed: u64) -> Vec<usize> {
    use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
    let mut order: Vec<usize> = (0..rows).collect();
    if shuffle {
        let mut rng =
            StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64);
        order.shuffle(&mut rng);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rows_per_micro: usize, accum: usize, epochs: usize) -> TrainConfig {
        TrainConfig {
            per_device_train_batch_size: rows_per_micro,
            gradient_accumulation_steps: accum,
            num_train_epochs: epochs,
            ..Default::default()
        }
    }

    #[test]
    fn plan_counts_updates_like_hf() {
        let p = Plan::new(&cfg(2, 2, 2), 12, 1).unwrap();
        assert_eq!((p.updates_per_epoch, p.total, p.warmup), (3, 6, 1)); // ceil(0.1·6) = 1
                                                                         // Two peers of the same per-device layout: twice the global batch, half the updates.
        let p2 = Plan::new(&cfg(2, 2, 2), 12, 2).unwrap();
        assert_eq!((p2.global_batch, p2.per_peer, p2.total), (8, 4, 4));
        let p = Plan::new(&cfg(2, 2, 1), 13, 1).unwrap(); // partial last batch is an update
        assert_eq!(p.updates_per_epoch, 4);
        let mut c = cfg(2, 8, 1);
        c.max_steps = 311;
        c.warmup_steps = 0;
        let p = Plan::new(&c, 100, 1).unwrap();
        assert_eq!((p.total, p.warmup), (311, 32)); // authors: ≈311 steps, warm-up 10 %
        assert_eq!(p.locate(8), (1, 1));
    }

    #[test]
    fn overflowing_sizes_are_errors_naming_the_settings() {
        let e = Plan::new(&cfg(usize::MAX, 2, 1), 12, 1).unwrap_err();
        assert!(e.to_string().contains("gradient_accumulation_steps"), "{e}");
        let e = Plan::new(&cfg(usize::MAX / 2, 1, 1), 12, 3).unwrap_err();
        assert!(e.to_string().contains("peers"), "{e}");
        let e = Plan::new(&cfg(1, 1, usize::MAX), 12, 1).unwrap_err();
        assert!(e.to_string().contains("num_train_epochs"), "{e}");
    }

    #[test]
    fn lr_schedules_match_hf_formulas() {
        use LrSchedule::*;
        // Warm-up: s / W.
        assert_eq!(lr_factor(Cosine, 0, 2, 10), 0.0);
        assert_eq!(lr_factor(Linear, 1, 2, 10), 0.5);
        // Cosine after warm-up: 0.5·(1 + cos(π·(s−W)/(T−W))).
        assert_eq!(lr_factor(Cosine, 2, 2, 10), 1.0);
        assert!((lr_factor(Cosine, 6, 2, 10) - 0.5).abs() < 1e-15);
        assert!(
            (lr_factor(Cosine, 4, 2, 10) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs()
                < 1e-15
        );
        // Linear decay: (T−s)/(T−W).
        assert!((lr_factor(Linear, 6, 2, 10) - 0.5).abs() < 1e-15);
        assert_eq!(lr_factor(Linear, 10, 2, 10), 0.0);
        // Constant ignores warm-up; constant_with_warmup does not.
        assert_eq!(lr_factor(Constant, 0, 2, 10), 1.0);
        assert_eq!(lr_factor(ConstantWithWarmup, 1, 2, 10), 0.5);
        assert_eq!(lr_factor(ConstantWithWarmup, 7, 2, 10), 1.0);
        // No warm-up.
        assert_eq!(lr_factor(Cosine, 0, 0, 4), 1.0);
    }

    #[test]
    fn data_order_is_seeded_and_per_epoch() {
        assert_eq!(epoch_order(5, 0, false, 1), vec![0, 1, 2, 3, 4]);
        let a = epoch_order(50, 0, true, 7);
        assert_eq!(a, epoch_order(50, 0, true, 7));
        assert_ne!(a, epoch_order(50, 1, true, 7));
        assert_ne!(a, epoch_order(50, 0, true, 8));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}
