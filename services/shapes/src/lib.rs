//! The synthetic captioned dataset of simple shapes the project's default model is trained on,
//! and a deterministic pixel classifier that scores generated images against their prompts.
//!
//! Everything here is pure Rust and deterministic: a sample is a pure function of
//! `(seed, index)` (see [`rng`]), so a training run, an `sd eval` score and a regression test
//! reproduce bit-for-bit on any machine and with any version of the dependencies.
//!
//! - [`dataset`]: the vocabulary (colours, shapes, sizes, positions), the renderer, the
//!   captions, the held-out combinations and the evaluation prompts.
//! - [`mod@classify`]: reads a generated image back into a [`classify::Prediction`] and
//!   accumulates per-attribute accuracy in [`classify::Scores`].

pub mod classify;
pub mod dataset;
pub mod rng;

pub use classify::{Prediction, Scores, classify};
pub use dataset::{
    COLOURS, Colour, EvalPrompt, Jitter, NamedColour, Position, Sample, Scene, Shape,
    ShapesDataset, Size, held_out_prompts, held_out_triples, is_held_out, render, seen_prompts,
};
pub use rng::SplitMix64;
