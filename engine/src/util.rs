//! Small shared helpers.

/// Atomic file writes (temporary file + rename), shared with checkpoint saving.
pub use wrpo_models::checkpoint::write_atomic;
