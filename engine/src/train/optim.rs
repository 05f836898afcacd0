//! The policy's parameters as flat named tensors, global-norm clipping and AdamW, written to
//! match PyTorch (`torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW`) rather than Burn's
//! optimisers, whose defaults (ε 1e-5, weight decay 1e-4) and per-tensor clipping differ.
//!
//! Keeping the parameters flat (`[numel]` per checkpoint tensor, in [`wrpo_models::Llama`]'s
//! order) makes the optimizer state a plain list that saves as safetensors, and the module is
//! rebuilt around them for each step at no copy cost.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use wrpo_models::{Llama, ParamRef};

/// Named flat tensors (parameters, gradients or optimizer moments).
#[derive(Debug, Clone)]
pub struct Flat<B: Backend> {
    /// Checkpoint names.
    pub names: Vec<String>,
    /// Original shapes.
    pub shapes: Vec<Vec<usize>>,
    /// `[numel]` each.
    pub values: Vec<Tensor<B, 1>>,
}

impl<B: Backend> Flat<B> {
    /// The parameters of `model`.
    pub fn of_model(model: &Llama<B>) -> Self {
        let mut f = Flat {
            names: vec![],
            shapes: vec![],
            values: vec![],
        };
        model.visit_params(&mut |name, p| {
            let v = p.flat();
            f.names.push(name.to_string());
            f.shapes.push(match p {
                wrpo_models::ParamRef::D1(p) => p.val().dims().to_vec(),
                wrpo_models::ParamRef::D2(p) => p.val().dims().to_vec(),
            });
            f.values.push(v);
        });
        f
    }

    /// Zeros of the same layout.
    pub fn zeros_like(&self) -> Self {
        Flat {
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            values: self.values.iter().map(|v| v.zeros_like()).collect(),
        }
    }

    /// Add the gradients in `grads` (one backward over part of `model`, a [`Flat::leaf_model`])
    /// into `acc`, in this list's order (layer checkpointing runs one backward per layer).
    pub fn add_grads(
        &self,
        acc: &mut [Option<Tensor<B, 1>>],
        model: &Llama<Autodiff<B>>,
        grads: &<Autodiff<B> as AutodiffBackend>::Gradients,
    ) {
        let index = self.index();
        let mut add = |name: &str, g: Option<Tensor<B, 1>>| {
            // A tensor of another group (a frozen weight) has no slot and no gradient.
            if let (Some(g), Some(i)) = (g, index(name)) {
                let slot = &mut acc[i];
                *slot = Some(match slot.take() {
                    Some(a) => a + g,
                    None => g,
                });
            }
        };
        model.visit_params(&mut |name, p| {
            add(
                name,
                match p {
                    ParamRef::D1(p) => p.val().grad(grads),
                    ParamRef::D2(p) => p.val().grad(grads).map(|g| g.flatten(0, 1)),
                },
            )
        });
        model
            .visit_adapters(&mut |name, p| add(name, p.val().grad(grads).map(|g| g.flatten(0, 1))));
    }

    /// Accumulated gradients, zeros for a parameter no backward reached.
    pub fn finish_grads(&self, acc: Vec<Option<Tensor<B, 1>>>) -> Vec<Tensor<B, 1>> {
        acc.into_iter()
            .zip(&self.values)
            .map(|(g, p)| g.unwrap_or_else(|| p.zeros_like()))
            .collect()
    }

    /// Name → position (`None`: not in this list).
    pub fn index(&self) -> impl Fn(&str) -> Option<usize> + '_ {
        let map: std::collections::HashMap<&str, usize> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        move |name| map.get(name).copied()
    }

    /// Named host tensors uploaded to `device`.
    pub fn from_host(device: &B::Device, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Self {
        let mut f = Flat {
            names: vec![],
            shapes: vec![],
            values: vec![],
        };
        for (n, s, v) in tensors {
            let len = v.len();
            f.names.push(n);
            f.shapes.push(s);
            f.values
                .push(Tensor::from_data(TensorData::new(v, [len]), device));
        }
        f
    }

    /// No tensors.
    pub fn empty() -> Self {
        Flat {
            names: vec![],
            shapes: vec![],
            values: vec![],
        }
    }

    /// Host copies, f32 row-major.
    pub fn to_host(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.values)
            .map(|((n, s), v)| {
                (
                    n.clone(),
                    s.clone(),
                    v.clone()
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .expect("f32"),
                )
            })
            .collect()
    }

    /// Upload host tensors (same layout as `self`) found by name in `get`.
    pub fn from_host_like(
        &self,
        device: &B::Device,
        get: &mut HostSource<'_>,
    ) -> anyhow::Result<Self> {
        let mut values = Vec::with_capacity(self.names.len());
        for (n, s) in self.names.iter().zip(&self.shapes) {
            let data = get(n, s)?;
            let len = data.len();
            values.push(Tensor::from_data(TensorData::new(data, [len]), device));
        }
        Ok(Flat {
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            values,
        })
    }
}

/// Host data by tensor name and shape.
pub type HostSource<'a> = dyn FnMut(&str, &[usize]) -> anyhow::Result<Vec<f32>> + 'a;

/// `torch.nn.utils.clip_grad_norm_`: the global 2-norm of all gradients (before clipping; what HF
/// logs as `grad_norm`), and the gradients scaled by `min(1, max_norm / (norm + 1e-6))` when
/// `max_norm > 0`. One device→host read.
pub fn clip_global_norm<B: Backend>(grads: &mut [Tensor<B, 1>], max_norm: f64) -> f32 {
    let sq: Vec<Tensor<B, 1>> = grads
        .iter()
        .map(|g| g.clone().powi_scalar(2).sum())
        .collect();
    // Per-tensor norms, then the norm of norms, as torch does (foreach path).
    let norms = Tensor::cat(sq, 0).sqrt();
    let total = norms.powi_scalar(2).sum().sqrt().into_scalar();
    let total: f32 = burn::tensor::ElementConversion::elem(total);
    if max_norm > 0.0 && total.is_finite() {
        let coef = (max_norm as f32 / (total + 1e-6)).min(1.0);
        for g in grads.iter_mut() {
            *g = g.clone() * coef;
        }
    }
    total
}

/// AdamW hyperparameters (PyTorch semantics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε (added after the bias-corrected square root).
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW's moments and its update count.
#[derive(Debug, Clone)]
pub struct AdamState<B: Backend> {
    /// First moments (`exp_avg`).
    pub exp_avg: Flat<B>,
    /// Second moments (`exp_avg_sq`).
    pub exp_avg_sq: Flat<B>,
    /// Updates done.
    pub step: u64,
}

impl<B: Backend> AdamState<B> {
    /// Fresh state for `params`.
    pub fn new(params: &Flat<B>) -> Self {
        AdamState {
            exp_avg: params.zeros_like(),
            exp_avg_sq: params.zeros_like(),
            step: 0,
        }
    }
}

impl AdamW {
    /// One update of every parameter, in the order of `torch.optim.AdamW`'s single-tensor path:
    /// `p ← p(1 − lr·wd)`, `m ← lerp(m, g, 1 − β1)`, `v ← β2 v + (1 − β2) g²`,
    /// `p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)`.
    pub fn step<B: Backend>(
        &self,
        lr: f64,
        params: &mut Flat<B>,
        grads: Vec<Tensor<B, 1>>,
        state: &mut AdamState<B>,
    ) {
        state.step += 1;
        let t = state.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for (i, g) in grads.into_iter().enumerate() {
            let mut p = params.values[i].clone();
            if self.weight_decay != 0.0 {
                p = p * (1.0 - lr * self.weight_decay);
            }
            let m = state.exp_avg.values[i].clone();
            let m = m.clone() + (g.clone() - m) * (1.0 - self.beta1);
            let v = state.exp_avg_sq.values[i].clone() * self.beta2
                + g.clone() * g * (1.0 - self.beta2);
            let denom = v.clone().sqrt() / bc2_sqrt + self.eps;
            params.values[i] = p - m.clone() / denom * step_size;
            state.exp_avg.values[i] = m;
            state.exp_avg_sq.values[i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = crate::backend::CpuBackend;

    fn t(v: &[f32]) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }
    fn host(x: &Tensor<B, 1>) -> Vec<f32> {
        x.clone().into_data().to_vec().unwrap()
    }

    #[test]
    fn clipping_uses_the_global_norm() {
        // Norm of (3, 4, 12) = 13; each tensor alone is below 13.
        let mut g = vec![t(&[3.0, 4.0]), t(&[12.0])];
        let n = clip_global_norm(&mut g, 6.5);
        assert!((n - 13.0).abs() < 1e-6);
        let c = 6.5 / (13.0 + 1e-6);
        assert!((host(&g[0])[0] - 3.0 * c).abs() < 1e-6);
        assert!((host(&g[1])[0] - 12.0 * c).abs() < 1e-6);
        // Below the threshold: unchanged.
        let mut g = vec![t(&[0.3, 0.4])];
        assert!((clip_global_norm(&mut g, 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(host(&g[0]), vec![0.3, 0.4]);
    }

    /// Two AdamW updates against the formulas evaluated by hand in f64.
    #[test]
    fn adamw_matches_pytorch_formulas() {
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut p = Flat {
            names: vec!["w".into()],
            shapes: vec![vec![2]],
            values: vec![t(&[1.0, -2.0])],
        };
        let mut s = AdamState::new(&p);
        let (g1, g2) = ([0.5f64, -1.0], [0.25f64, 2.0]);
        opt.step(0.01, &mut p, vec![t(&[0.5, -1.0])], &mut s);
        opt.step(0.02, &mut p, vec![t(&[0.25, 2.0])], &mut s);
        for (j, p0) in [1.0f64, -2.0].into_iter().enumerate() {
            let (mut x, mut m, mut v) = (p0, 0.0, 0.0);
            for (k, (lr, g)) in [(0.01, g1[j]), (0.02, g2[j])].into_iter().enumerate() {
                let t = (k + 1) as i32;
                x *= 1.0 - lr * 0.1;
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let mh = m / (1.0 - 0.9f64.powi(t));
                let vh = v / (1.0 - 0.999f64.powi(t));
                x -= lr * mh / (vh.sqrt() + 1e-8);
            }
            let got = host(&p.values[0])[j] as f64;
            assert!((got - x).abs() < 1e-6, "param {j}: {got} vs {x}");
        }
        assert_eq!(s.step, 2);
    }
}
