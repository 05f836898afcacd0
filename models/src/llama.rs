//! LLaMA decoder (transformers `LlamaForCausalLM`): the full-sequence forward used by training and
//! log-probs. The incremental forward with a KV cache (generation) is in [`crate::generate`].
//!
//! Module and field names follow the checkpoint names, so `model.layers.3.self_attn.q_proj.weight`
//! is the field `model.layers[3].self_attn.q_proj.weight` and loading is a plain mapping. Linear
//! weights are stored in the checkpoint's layout `[out, in]` (no transposition on load or save).

use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use wrpo_kernels::attention::{repeat_kv, AttentionImpl};
use wrpo_kernels::linear::{frozen_linear, widen_like, widen_to, FrozenLinearBackend};
use wrpo_kernels::ModelBackend;

use crate::config::LlamaConfig;
use crate::lora::{LoraConfig, Target};
use crate::rope;

/// A bias-free linear layer holding its weight as `[out, in]`, like `torch.nn.Linear`, with an
/// optional LoRA adapter ([`crate::lora`]).
#[derive(Module, Debug)]
pub struct HfLinear<B: Backend> {
    /// `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
    /// A LoRA adapter added to the output, as PEFT's `lora.Linear`.
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> HfLinear<B> {
    /// A plain linear layer.
    pub fn new(weight: Param<Tensor<B, 2>>) -> Self {
        HfLinear { weight, lora: None }
    }
}

impl<B: FrozenLinearBackend> HfLinear<B> {
    /// `y = x Wᵀ (+ s · (dropout(x) Aᵀ) Bᵀ)`. A weight stored in another dtype than `x` (a frozen
    /// half-precision base) is widened at the point of use ([`wrpo_kernels::linear`]). Shapes:
    /// `[..., in]` → `[..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let base = |x: Tensor<B, D>| {
            let w = self.weight.val();
            if w.dtype() == x.dtype() {
                linear_t(x, w)
            } else {
                frozen_linear_t(x, w)
            }
        };
        match &self.lora {
            None => base(x),
            Some(lora) => base(x.clone()) + lora.forward(x),
        }
    }
}

/// One LoRA adapter (PEFT's `lora_A` / `lora_B` of a `lora.Linear`).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[r, in]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[out, r]`.
    pub b: Param<Tensor<B, 2>>,
    /// `α / r` (or `α / √r`).
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
    /// Training only: the seed of this adapter's dropout mask for this forward. The same seed
    /// gives the same mask, so a layer recomputed by checkpointing sees the mask of its first
    /// forward, and a resumed run the masks of an uninterrupted one. `None`: no dropout
    /// (evaluation, the reference, generation).
    pub dropout_seed: Option<u64>,
}

impl<B: Backend> Lora<B> {
    /// `s · (dropout(x) Aᵀ) Bᵀ`, in PEFT's order. Shapes: `[..., in]` → `[..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match self.dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                // The backend's generator, reseeded for this adapter and forward.
                B::seed(&x.device(), seed);
                let keep = 1.0 - self.dropout;
                let mask = x.random_like(burn::tensor::Distribution::Bernoulli(keep));
                x * mask / keep
            }
            _ => x,
        };
        linear_t(linear_t(x, self.a.val()), self.b.val()) * self.scale
    }
}

/// `y = x Wᵀ` for a weight in the checkpoint layout `[out, in]`, as one 2-D matmul over the
/// flattened leading dimensions with the transposed weight as a strided view. Burn's `linear`
/// reshapes the transposed weight to rank `D`, and a reshape of a non-contiguous view copies it
/// (burn-flex: `to_contiguous`; CubeCL: a copy kernel): every weight, on every call. Measured on
/// the CPU: 45 % of a decode step's time.
///
/// # Shapes
/// - `x`: `[..., in]`; `weight`: `[out, in]`; returns `[..., out]`
pub fn linear_t<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>) -> Tensor<B, D> {
    let dims = x.dims();
    let [out, inn] = weight.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let mut shape = dims;
    shape[D - 1] = out;
    x.reshape([rows, inn])
        .matmul(weight.transpose())
        .reshape(shape)
}

/// [`linear_t`] over a weight stored in another dtype than `x`: [`frozen_linear`] on the
/// flattened rows. Shapes as [`linear_t`].
fn frozen_linear_t<B: FrozenLinearBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let [out, inn] = weight.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let mut shape = dims;
    shape[D - 1] = out;
    frozen_linear(x.reshape([rows, inn]), weight).reshape(shape)
}

/// The dtype the model computes in: the backend's float element (f32 on every backend today).
pub fn compute_dtype<B: Backend>() -> burn::tensor::DType {
    use burn::tensor::Element;
    <B::FloatElem as Element>::dtype()
}

/// RMSNorm: `w · x / sqrt(mean(x²) + ε)` (transformers `LlamaRMSNorm`, f32 throughout).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[H]`.
    pub weight: Param<Tensor<B, 1>>,
    /// ε.
    pub eps: f64,
}

impl<B: FrozenLinearBackend> RmsNorm<B> {
    /// Shapes: `[B, T, H]` → `[B, T, H]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let var = x.clone().powi_scalar(2).mean_dim(2);
        // A division, not `recip()`: a backend's reciprocal may be an approximation.
        let x = x / (var + self.eps).sqrt();
        let w = widen_like(self.weight.val(), &x);
        x * w.unsqueeze::<3>()
    }
}

/// Grouped-query self-attention (`LlamaAttention`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[NH·HD, H]`.
    pub q_proj: HfLinear<B>,
    /// `[NKV·HD, H]`.
    pub k_proj: HfLinear<B>,
    /// `[NKV·HD, H]`.
    pub v_proj: HfLinear<B>,
    /// `[H, NH·HD]`.
    pub o_proj: HfLinear<B>,
    /// NH.
    pub num_heads: usize,
    /// NKV.
    pub num_kv_heads: usize,
    /// HD.
    pub head_dim: usize,
}

impl<B: FrozenLinearBackend> Attention<B> {
    /// Queries, keys and values with RoPE applied to queries and keys.
    ///
    /// # Shapes
    /// - `x`: `[B, T, H]`; `cos`, `sin`: broadcastable to `[B, 1, T, HD]`
    /// - returns (`[B, NH, T, HD]`, `[B, NKV, T, HD]`, `[B, NKV, T, HD]`)
    pub fn project(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = rope::apply4(heads(self.q_proj.forward(x.clone()), nh), cos, sin);
        let k = rope::apply4(heads(self.k_proj.forward(x.clone()), nkv), cos, sin);
        let v = heads(self.v_proj.forward(x), nkv);
        (q, k, v)
    }

    /// Scaled dot-product attention of `q` over `k`/`v`, then the output projection.
    ///
    /// # Shapes
    /// - `q`: `[B, NH, S, HD]`; `k`, `v`: `[B, NKV, T, HD]`; `mask`: `[B, 1, S, T]` (true = not
    ///   attended)
    /// - returns `[B, S, H]`
    pub fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let [b, nh, s, hd] = q.dims();
        let n = nh / self.num_kv_heads;
        let (k, v) = (repeat_kv(k, n), repeat_kv(v, n)); // [B,NH,T,HD]
        let scores = q.matmul(k.swap_dims(2, 3)) * (hd as f64).powf(-0.5); // [B,NH,S,T]
                                                                           // Masked scores get the most negative f32, like transformers' eager additive mask, so a
                                                                           // row with no visible key (a left-padding query of the KV-cache path) stays finite.
        let probs = softmax(scores.mask_fill(mask, f32::MIN), 3);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b, s, nh * hd]);
        self.o_proj.forward(out)
    }
}

impl<B: ModelBackend> Attention<B> {
    /// Causal self-attention masked by segment ids ([`wrpo_kernels::attention`]: key `j` is
    /// visible to query `i` when `j ≤ i` and `k_seg[j] == q_seg[i]`), then the output projection.
    /// `imp` picks the tiled op (memory linear in `T`) or the dense reference.
    ///
    /// # Shapes
    /// - `q`: `[B, NH, T, HD]`; `k`, `v`: `[B, NKV, T, HD]`; `q_seg`, `k_seg`: `[B, T]`
    /// - returns `[B, T, H]`
    pub fn attend_segments(
        &self,
        (q, k, v): (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>),
        q_seg: Tensor<B, 2, Int>,
        k_seg: Tensor<B, 2, Int>,
        imp: AttentionImpl,
    ) -> Tensor<B, 3> {
        let [b, nh, t, hd] = q.dims();
        let out = imp.run(q, k, v, q_seg, k_seg); // [B,NH,T,HD]
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, nh * hd]))
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[I, H]`.
    pub gate_proj: HfLinear<B>,
    /// `[I, H]`.
    pub up_proj: HfLinear<B>,
    /// `[H, I]`.
    pub down_proj: HfLinear<B>,
}

impl<B: FrozenLinearBackend> Mlp<B> {
    /// Shapes: `[B, T, H]` → `[B, T, H]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention block.
    pub self_attn: Attention<B>,
    /// MLP block.
    pub mlp: Mlp<B>,
    /// Norm before attention, `[H]`.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP, `[H]`.
    pub post_attention_layernorm: RmsNorm<B>,
}

/// The decoder stack (`LlamaModel`).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// `[V, H]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm, `[H]`.
    pub norm: RmsNorm<B>,
}

/// `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// The decoder.
    pub model: LlamaModel<B>,
    /// `[V, H]`; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<HfLinear<B>>,
}

fn param<B: Backend, const D: usize>(
    source: &mut dyn FnMut(&str, &[usize]) -> Tensor<B, 1>,
    name: &str,
    shape: [usize; D],
) -> Param<Tensor<B, D>> {
    // A source tensor marked as requiring a gradient (a trainable autodiff leaf) stays one after
    // the reshape: the reshaped tensor becomes the leaf (`detach` + `require_grad`), so the
    // parameter's own value collects the gradient. Other tensors (inference, frozen weights) are
    // constants.
    let t = source(name, &shape);
    let leaf = t.is_require_grad();
    let t = t.reshape(shape);
    Param::initialized(
        ParamId::new(),
        if leaf { t.detach().require_grad() } else { t },
    )
}

/// A parameter of either rank, for [`Llama::visit_params`].
#[derive(Debug)]
pub enum ParamRef<'a, B: Backend> {
    /// An RMSNorm weight, `[H]`.
    D1(&'a Param<Tensor<B, 1>>),
    /// A linear or embedding weight, `[out, in]`.
    D2(&'a Param<Tensor<B, 2>>),
}

impl<B: Backend> ParamRef<'_, B> {
    /// The value, flattened to `[numel]`.
    pub fn flat(&self) -> Tensor<B, 1> {
        match self {
            ParamRef::D1(p) => p.val(),
            ParamRef::D2(p) => p.val().flatten(0, 1),
        }
    }
}

/// Checkpoint tensor names and shapes for a configuration, in a stable order.
pub fn param_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = body_param_specs(cfg);
    if !cfg.tie_word_embeddings {
        v.push((
            "lm_head.weight".to_string(),
            vec![cfg.vocab_size, cfg.hidden_size],
        ));
    }
    v
}

/// The decoder stack's tensors (`model.*`, no head), in [`param_specs`] order.
pub fn body_param_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        v.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![cfg.num_heads * hd, h],
        ));
        v.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![cfg.num_kv_heads * hd, h],
        ));
        v.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![cfg.num_kv_heads * hd, h],
        ));
        v.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, cfg.num_heads * hd],
        ));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    v
}

impl<B: Backend> Llama<B> {
    /// Build a model whose tensors come from `source(name, shape)` (row-major f32 data of exactly
    /// `shape`'s size). Used by the checkpoint loader and by seeded random initialisation.
    pub fn build(
        cfg: &LlamaConfig,
        device: &B::Device,
        source: &mut dyn FnMut(&str, &[usize]) -> Vec<f32>,
    ) -> Self {
        Self::build_from(cfg, &mut |name, shape| {
            let n: usize = shape.iter().product();
            Tensor::from_data(TensorData::new(source(name, shape), [n]), device)
        })
    }

    /// Build a model from flat device tensors: `source(name, shape)` returns `[numel]` (the
    /// trainer keeps its parameters flat and rebuilds the module for each step at no copy cost).
    pub fn build_from(
        cfg: &LlamaConfig,
        source: &mut dyn FnMut(&str, &[usize]) -> Tensor<B, 1>,
    ) -> Self {
        let model = LlamaModel::build_from(cfg, source);
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            HfLinear::new(param(
                source,
                "lm_head.weight",
                [cfg.vocab_size, cfg.hidden_size],
            ))
        });
        Llama { model, lm_head }
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Build the decoder stack (`model.*` tensors) from flat device tensors, as
    /// [`Llama::build_from`] (which calls it first, so tensors are requested in
    /// [`param_specs`] order).
    pub fn build_from(
        cfg: &LlamaConfig,
        source: &mut dyn FnMut(&str, &[usize]) -> Tensor<B, 1>,
    ) -> Self {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let embed_tokens = param(source, "model.embed_tokens.weight", [cfg.vocab_size, h]);
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let a = format!("{p}.self_attn");
                let m = format!("{p}.mlp");
                let norm =
                    |source: &mut dyn FnMut(&str, &[usize]) -> Tensor<B, 1>, n: &str| RmsNorm {
                        weight: param(source, &format!("{p}.{n}.weight"), [h]),
                        eps: cfg.rms_norm_eps,
                    };
                DecoderLayer {
                    self_attn: Attention {
                        q_proj: HfLinear::new(param(
                            source,
                            &format!("{a}.q_proj.weight"),
                            [cfg.num_heads * hd, h],
                        )),
                        k_proj: HfLinear::new(param(
                            source,
                            &format!("{a}.k_proj.weight"),
                            [cfg.num_kv_heads * hd, h],
                        )),
                        v_proj: HfLinear::new(param(
                            source,
                            &format!("{a}.v_proj.weight"),
                            [cfg.num_kv_heads * hd, h],
                        )),
                        o_proj: HfLinear::new(param(
                            source,
                            &format!("{a}.o_proj.weight"),
                            [h, cfg.num_heads * hd],
                        )),
                        num_heads: cfg.num_heads,
                        num_kv_heads: cfg.num_kv_heads,
                        head_dim: hd,
                    },
                    mlp: Mlp {
                        gate_proj: HfLinear::new(param(
                            source,
                            &format!("{m}.gate_proj.weight"),
                            [i, h],
                        )),
                        up_proj: HfLinear::new(param(
                            source,
                            &format!("{m}.up_proj.weight"),
                            [i, h],
                        )),
                        down_proj: HfLinear::new(param(
                            source,
                            &format!("{m}.down_proj.weight"),
                            [h, i],
                        )),
                    },
                    input_layernorm: norm(source, "input_layernorm"),
                    post_attention_layernorm: norm(source, "post_attention_layernorm"),
                }
            })
            .collect();
        let norm = RmsNorm {
            weight: param(source, "model.norm.weight", [h]),
            eps: cfg.rms_norm_eps,
        };
        LlamaModel {
            embed_tokens,
            layers,
            norm,
        }
    }
}

/// What every decoder layer of one batch shares: the RoPE tables, the segment ids of the
/// attention mask ([`wrpo_kernels::attention`]) and which attention runs.
#[derive(Debug, Clone)]
pub struct LayerInputs<B: Backend> {
    /// `cos` of the RoPE angles, broadcastable to `[B, 1, T, HD]`.
    pub cos: Tensor<B, 4>,
    /// `sin` of the RoPE angles, as `cos`.
    pub sin: Tensor<B, 4>,
    /// Query segment ids, `[B, T]`.
    pub q_seg: Tensor<B, 2, Int>,
    /// Key segment ids, `[B, T]`.
    pub k_seg: Tensor<B, 2, Int>,
    /// Tiled or dense attention (`cfg.attn_implementation`).
    pub attn: AttentionImpl,
}

impl<B: Backend> LayerInputs<B> {
    /// Right-padded rows: positions `0..T`; padding keys masked (`q_seg = 1`, `k_seg = valid`),
    /// as transformers' additive padding mask.
    ///
    /// # Shapes
    /// - `valid`: `[B, T]` (true = real token)
    pub fn padded(cfg: &LlamaConfig, valid: Tensor<B, 2, Bool>) -> Self {
        let [b, t] = valid.dims();
        let device = valid.device();
        let (cos, sin) = rope::tables::<B>(cfg, t, &device);
        LayerInputs {
            cos: cos.unsqueeze::<4>(), // [1,1,T,HD]
            sin: sin.unsqueeze::<4>(),
            q_seg: Tensor::<B, 2, Int>::ones([b, t], &device),
            k_seg: valid.int(),
            attn: cfg.attn_implementation,
        }
    }

    /// Packed rows: each example attends only to itself, positions restart at 0.
    ///
    /// # Shapes
    /// - `segments`: `B·T` host ids, row-major (0 = padding, `1..` = the example a token belongs
    ///   to); `positions`: `B·T` host positions within each example
    pub fn packed(
        cfg: &LlamaConfig,
        [b, t]: [usize; 2],
        segments: &[u32],
        positions: &[usize],
        device: &B::Device,
    ) -> Self {
        assert_eq!(segments.len(), b * t, "packed rows: B·T segment ids");
        assert_eq!(positions.len(), b * t, "packed rows: B·T positions");
        let seg: Vec<i64> = segments.iter().map(|&s| i64::from(s)).collect();
        let seg = Tensor::<B, 2, Int>::from_data(TensorData::new(seg, [b, t]), device);
        let (cos, sin) = rope::tables_at::<B>(cfg, positions, device);
        let hd = cfg.head_dim;
        LayerInputs {
            cos: cos.reshape([b, 1, t, hd]),
            sin: sin.reshape([b, 1, t, hd]),
            q_seg: seg.clone(),
            k_seg: seg,
            attn: cfg.attn_implementation,
        }
    }
}

impl<B: ModelBackend> DecoderLayer<B> {
    /// One pre-norm layer: `x + attn(norm(x))`, then `+ mlp(norm(·))`.
    ///
    /// # Shapes
    /// - `x`: `[B, T, H]`; returns `[B, T, H]`
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &LayerInputs<B>) -> Tensor<B, 3> {
        let attn = &self.self_attn;
        let qkv = attn.project(
            self.input_layernorm.forward(x.clone()),
            &inputs.cos,
            &inputs.sin,
        );
        let x =
            x + attn.attend_segments(qkv, inputs.q_seg.clone(), inputs.k_seg.clone(), inputs.attn);
        let h = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x + h
    }
}

impl<B: FrozenLinearBackend> LlamaModel<B> {
    /// The token embeddings. Shapes: `[B, T]` → `[B, T, H]`.
    /// A table stored in half precision (a frozen base) is gathered, then the rows widened.
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        widen_to(
            embedding(self.embed_tokens.val(), input_ids),
            compute_dtype::<B>(),
        )
    }
}

impl<B: ModelBackend> LlamaModel<B> {
    /// Final hidden states (after the last norm) of right-padded rows
    /// ([`LayerInputs::padded`]).
    ///
    /// # Shapes
    /// - `input_ids`: `[B, T]`; `valid`: `[B, T]` (true = real token, right padding)
    /// - returns `[B, T, H]`
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        input_ids: Tensor<B, 2, Int>,
        valid: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 3> {
        self.forward_inputs(input_ids, &LayerInputs::padded(cfg, valid))
    }

    /// Final hidden states of *packed* rows: several examples share a row, each attending only to
    /// itself (block-diagonal causal mask, from the segment ids on the device) with positions
    /// restarting at 0 (what transformers does with `position_ids` and flash-attention's
    /// variable-length path). See [`LayerInputs::packed`].
    ///
    /// # Shapes
    /// - `input_ids`: `[B, T]`; `segments`, `positions`: `B·T` host values, row-major
    /// - returns `[B, T, H]`
    pub fn forward_packed(
        &self,
        cfg: &LlamaConfig,
        input_ids: Tensor<B, 2, Int>,
        segments: &[u32],
        positions: &[usize],
    ) -> Tensor<B, 3> {
        let inputs = LayerInputs::packed(
            cfg,
            input_ids.dims(),
            segments,
            positions,
            &input_ids.device(),
        );
        self.forward_inputs(input_ids, &inputs)
    }

    /// Embeddings, every decoder layer, the final norm. Shapes: `[B, T]` → `[B, T, H]`.
    pub fn forward_inputs(
        &self,
        input_ids: Tensor<B, 2, Int>,
        inputs: &LayerInputs<B>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed(input_ids);
        for layer in &self.layers {
            x = layer.forward(x, inputs);
        }
        self.norm.forward(x)
    }
}

impl<B: Backend> Llama<B> {
    /// Call `f(name, param)` for every parameter, in [`param_specs`] order.
    pub fn visit_params(&self, f: &mut dyn FnMut(&str, ParamRef<'_, B>)) {
        let m = &self.model;
        f("model.embed_tokens.weight", ParamRef::D2(&m.embed_tokens));
        for (l, layer) in m.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let a = &layer.self_attn;
            for (n, w) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                f(
                    &format!("{p}.self_attn.{n}.weight"),
                    ParamRef::D2(&w.weight),
                );
            }
            let m = &layer.mlp;
            for (n, w) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                f(&format!("{p}.mlp.{n}.weight"), ParamRef::D2(&w.weight));
            }
            f(
                &format!("{p}.input_layernorm.weight"),
                ParamRef::D1(&layer.input_layernorm.weight),
            );
            f(
                &format!("{p}.post_attention_layernorm.weight"),
                ParamRef::D1(&layer.post_attention_layernorm.weight),
            );
        }
        f("model.norm.weight", ParamRef::D1(&m.norm.weight));
        if let Some(head) = &self.lm_head {
            f("lm_head.weight", ParamRef::D2(&head.weight));
        }
    }

    /// The linear layer `t` of decoder layer `l`.
    pub fn linear(&self, l: usize, t: Target) -> &HfLinear<B> {
        let layer = &self.model.layers[l];
        match t {
            Target::Q => &layer.self_attn.q_proj,
            Target::K => &layer.self_attn.k_proj,
            Target::V => &layer.self_attn.v_proj,
            Target::O => &layer.self_attn.o_proj,
            Target::Gate => &layer.mlp.gate_proj,
            Target::Up => &layer.mlp.up_proj,
            Target::Down => &layer.mlp.down_proj,
        }
    }

    fn linear_mut(&mut self, l: usize, t: Target) -> &mut HfLinear<B> {
        let layer = &mut self.model.layers[l];
        match t {
            Target::Q => &mut layer.self_attn.q_proj,
            Target::K => &mut layer.self_attn.k_proj,
            Target::V => &mut layer.self_attn.v_proj,
            Target::O => &mut layer.self_attn.o_proj,
            Target::Gate => &mut layer.mlp.gate_proj,
            Target::Up => &mut layer.mlp.up_proj,
            Target::Down => &mut layer.mlp.down_proj,
        }
    }

    /// Add LoRA adapters to the targeted layers, their tensors from `source(name, shape)` (flat,
    /// in [`LoraConfig::specs`] order and names). `dropout_seed`: training with dropout (each
    /// adapter's mask seeded from it, its layer and its module); `None` turns dropout off.
    pub fn attach_lora(
        mut self,
        cfg: &LlamaConfig,
        lora: &LoraConfig,
        dropout_seed: Option<u64>,
        source: &mut dyn FnMut(&str, &[usize]) -> Tensor<B, 1>,
    ) -> Self {
        for l in 0..cfg.num_layers {
            for &t in &lora.targets {
                let (out, inn) = t.dims(cfg);
                let p = t.path(l);
                let a = param(source, &format!("{p}.lora_A.weight"), [lora.r, inn]);
                let b = param(source, &format!("{p}.lora_B.weight"), [out, lora.r]);
                let seed = dropout_seed
                    .map(|s| s ^ ((l as u64) << 32 | t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                self.linear_mut(l, t).lora = Some(Lora {
                    a,
                    b,
                    scale: lora.scale(),
                    dropout: lora.dropout,
                    dropout_seed: seed,
                });
            }
        }
        self
    }

    /// Call `f(name, param)` for every LoRA tensor, in [`LoraConfig::specs`] order.
    pub fn visit_adapters(&self, f: &mut dyn FnMut(&str, &Param<Tensor<B, 2>>)) {
        for l in 0..self.model.layers.len() {
            for t in Target::ALL {
                if let Some(lora) = &self.linear(l, t).lora {
                    f(&format!("{}.lora_A.weight", t.path(l)), &lora.a);
                    f(&format!("{}.lora_B.weight", t.path(l)), &lora.b);
                }
            }
        }
    }

    /// All parameters with their checkpoint names, as f32 host data (for saving).
    pub fn named_tensors(&self) -> Vec<(String, TensorData)> {
        let mut v = Vec::new();
        self.visit_params(&mut |name, p| {
            let data = match p {
                ParamRef::D1(p) => p.val().into_data(),
                ParamRef::D2(p) => p.val().into_data(),
            };
            v.push((name.to_string(), data.convert::<f32>()));
        });
        v
    }

    /// The LM head's weight, `[V, H]`: `lm_head.weight`, or `model.embed_tokens.weight` when tied
    /// (the same parameter, so under autodiff both uses add into its one gradient).
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.val(),
        }
    }
}

impl<B: FrozenLinearBackend> Llama<B> {
    /// The model with every adapter folded into its weight (`W + s·B·A`, what PEFT's
    /// `merge_and_unload` computes) and removed.
    pub fn merge_lora(mut self) -> Self {
        for l in 0..self.model.layers.len() {
            for t in Target::ALL {
                let lin = self.linear_mut(l, t);
                if let Some(lora) = lin.lora.take() {
                    let delta = lora.b.val().matmul(lora.a.val()) * lora.scale;
                    let w = widen_like(lin.weight.val(), &delta);
                    lin.weight = Param::initialized(ParamId::new(), w + delta);
                }
            }
        }
        self
    }

    /// The LM head: `[.., H]` → `[.., V]` (tied to the embeddings when `lm_head` is `None`).
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => HfLinear::new(self.model.embed_tokens.clone()).forward(hidden),
        }
    }
}

impl<B: ModelBackend> Llama<B> {
    /// Final hidden states (after the last norm): [`LlamaModel::forward`].
    ///
    /// # Shapes
    /// - `input_ids`: `[B, T]`; `valid`: `[B, T]` (true = real token, right padding)
    /// - returns `[B, T, H]`
    pub fn hidden(
        &self,
        cfg: &LlamaConfig,
        input_ids: Tensor<B, 2, Int>,
        valid: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 3> {
        self.model.forward(cfg, input_ids, valid)
    }

    /// Logits of packed rows: [`LlamaModel::forward_packed`] then the head.
    ///
    /// # Shapes
    /// - `input_ids`: `[B, T]`; `segments`, `positions`: `B·T` host values; returns `[B, T, V]`
    pub fn forward_packed(
        &self,
        cfg: &LlamaConfig,
        input_ids: Tensor<B, 2, Int>,
        segments: &[u32],
        positions: &[usize],
    ) -> Tensor<B, 3> {
        self.head(
            self.model
                .forward_packed(cfg, input_ids, segments, positions),
        )
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// - `input_ids`: `[B, T]`; `valid`: `[B, T]`; returns `[B, T, V]`
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        input_ids: Tensor<B, 2, Int>,
        valid: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 3> {
        self.head(self.hidden(cfg, input_ids, valid))
    }
}

impl<B: Backend> Llama<B> {
    /// Seeded random initialisation like transformers' `_init_weights`: linear and embedding
    /// weights ~ N(0, `std`), RMSNorm weights = 1. The same seed gives the same model on every
    /// backend (values are drawn on the host).
    pub fn random(cfg: &LlamaConfig, seed: u64, std: f32, device: &B::Device) -> Self {
        Self::random_as(cfg, seed, std, burn::tensor::DType::F32, device)
    }

    /// [`Llama::random`] with every weight stored as `dtype` (rounded from the f32 draw one
    /// tensor at a time, so no f32 copy of the model exists): a stand-in for a half-precision
    /// checkpoint.
    pub fn random_as(
        cfg: &LlamaConfig,
        seed: u64,
        std: f32,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Self {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        Self::build_from(cfg, &mut |name, shape| {
            let n: usize = shape.iter().product();
            let values = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                // Box–Muller on (0, 1] uniforms.
                (0..n)
                    .map(|_| {
                        let u1: f32 = 1.0 - rng.random::<f32>();
                        let u2: f32 = rng.random::<f32>();
                        std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                    })
                    .collect()
            };
            Tensor::from_data(TensorData::new(values, [n]), (device, dtype))
        })
    }
}
