//! The orchestrator: the public `sd.v1` API, and the reverse-diffusion loop that drives the
//! text-encoder, denoiser and VAE stages. No libtorch here: schedulers are element-wise math on
//! small buffers and the seed RNG is a pure-Rust reproduction of torch's CPU generator.
//!
//! - [`server`]: flags and process set-up; [`service`]: the public gRPC service;
//! - [`request`]: request validation; [`pipeline`]: one generation across the stages;
//! - [`stages`]: clients of the stage replicas; [`steps`]: a generation's step stream; [`schedulers`], [`rng`]: the sampling math.

pub mod pipeline;
pub mod preview;
pub mod request;
pub mod rng;
pub mod schedulers;
pub mod server;
pub mod service;
pub mod stages;
pub mod steps;
