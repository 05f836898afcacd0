//! # wrpo-engine-core
//!
//! The library behind the `wrpo-engine` binary: backend choice, tokenizer and chat templates,
//! WRPO data, log-probs, the trainer and the data pipeline (sample, score, build-dataset). Dependencies point one way: `cli → engine → models → kernels`.
//!
//! ## Shapes (symbol glossary)
//! - `N`: sequences in a batch (rows × (K + 1 + R) completions), `T`: tokens, `V`: vocabulary
#![warn(missing_docs)]

pub mod backend;
pub mod data;
pub mod embedded;
pub mod logps;
pub mod memory;
pub mod model;
pub mod pipeline;
pub mod tokenizer;
pub mod train;
pub mod util;
