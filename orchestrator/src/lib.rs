//! The orchestrator: the public `sd.v1` API, and the reverse-diffusion loop that drives the
//! text-encoder, denoiser and VAE stages. No libtorch here: schedulers are element-wise math on
//! small buffers and the seed RNG is a pure-Rust reproduction of torch's CPU generator.

pub mod rng;
pub mod schedulers;
