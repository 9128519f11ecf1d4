//! Bad input gets a clear error naming what was wrong, never a panic or a hang: invalid
//! requests, malformed tensors sent straight to a stage (as calls and on a step stream), a message over the size limit, a stage
//! that is down, and model folders with missing or malformed files.

#![allow(clippy::unwrap_used)]

use sd_e2e::{Cluster, Service, bin, copy_dir, start_stage, tiny_model};
use sd_proto::{
    stage::{
        DataType, DecodeRequest, DenoiseRequest, DenoiseStepsRequest, Tensor,
        denoiser_service_client::DenoiserServiceClient, vae_service_client::VaeServiceClient,
    },
    v1::GenerateRequest,
};
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};
use tonic::Code;

fn ok_request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a square".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(2),
        seed: Some(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_name_the_field() {
    let cluster = Cluster::start(&tiny_model("sd1")).await;
    let mut client = cluster.client().await;
    let cases: Vec<(&str, GenerateRequest)> = vec![
        (
            "width",
            GenerateRequest {
                width: Some(63),
                ..ok_request()
            },
        ),
        (
            "width",
            GenerateRequest {
                width: Some(0),
                ..ok_request()
            },
        ),
        (
            "height",
            GenerateRequest {
                height: Some(1 << 20),
                ..ok_request()
            },
        ),
        (
            "steps",
            GenerateRequest {
                steps: Some(0),
                ..ok_request()
            },
        ),
        (
            "steps",
            GenerateRequest {
                steps: Some(100_000),
                ..ok_request()
            },
        ),
        (
            "guidance_scale",
            GenerateRequest {
                guidance_scale: Some(f32::NAN),
                ..ok_request()
            },
        ),
        (
            "guidance_scale",
            GenerateRequest {
                guidance_scale: Some(-2.0),
                ..ok_request()
            },
        ),
        (
            "guidance_scale",
            GenerateRequest {
                guidance_scale: Some(f32::INFINITY),
                ..ok_request()
            },
        ),
        (
            "num_images",
            GenerateRequest {
                num_images: Some(0),
                ..ok_request()
            },
        ),
        (
            "num_images",
            GenerateRequest {
                num_images: Some(1000),
                ..ok_request()
            },
        ),
        (
            "scheduler",
            GenerateRequest {
                scheduler: "no-such-sampler".into(),
                ..ok_request()
            },
        ),
        (
            "prompt",
            GenerateRequest {
                prompt: "word ".repeat(10_000),
                ..ok_request()
            },
        ),
    ];
    for (field, req) in cases {
        let err = client.generate(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // A size the model cannot take (the tiny U-Net halves the latent once: 8 x 2 = 16).
    let err = client
        .generate(GenerateRequest {
            width: Some(72),
            ..ok_request()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("width: 72 is not a multiple of 16"),
        "{}",
        err.message()
    );
    // The scheduler error lists the valid names.
    let err = client
        .generate(GenerateRequest {
            scheduler: "x".into(),
            ..ok_request()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("ddim"), "{}", err.message());
    // And the service still works.
    assert_eq!(
        client
            .generate(ok_request())
            .await
            .unwrap()
            .into_inner()
            .images
            .len(),
        1
    );
}

fn tensor(dtype: DataType, shape: &[i64], bytes: usize) -> Tensor {
    Tensor {
        dtype: dtype as i32,
        shape: shape.to_vec(),
        data: vec![0u8; bytes].into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_tensors_are_invalid_argument_and_the_stage_survives() {
    let cluster = Cluster::start(&tiny_model("sd1")).await;
    let mut denoiser = DenoiserServiceClient::connect(cluster.denoiser.url())
        .await
        .unwrap();
    let good = || DenoiseRequest {
        sample: Some(tensor(DataType::Float32, &[1, 4, 8, 8], 4 * 64 * 4)),
        timesteps: Some(Tensor::from_f32(&[1], &[999.0])),
        encoder_hidden_states: Some(tensor(DataType::Float32, &[2, 77, 32], 2 * 77 * 32 * 4)),
        guidance_scale: vec![7.5],
        guidance_rescale: vec![],
        context_id: String::new(),
    };
    let cases: Vec<(&str, DenoiseRequest)> = vec![
        (
            "guidance_rescale",
            DenoiseRequest {
                guidance_rescale: vec![2.0],
                ..good()
            },
        ),
        (
            "sample",
            DenoiseRequest {
                sample: Some(tensor(DataType::Float32, &[1, 4, 8, 8], 17)),
                ..good()
            },
        ),
        (
            "sample",
            DenoiseRequest {
                sample: Some(tensor(DataType::Float32, &[1, 3, 8, 8], 3 * 64 * 4)),
                ..good()
            },
        ),
        (
            "sample",
            DenoiseRequest {
                sample: Some(tensor(DataType::Unspecified, &[1, 4, 8, 8], 0)),
                ..good()
            },
        ),
        (
            "sample",
            DenoiseRequest {
                sample: Some(tensor(DataType::Float32, &[-1, 4, 8, 8], 0)),
                ..good()
            },
        ),
        (
            "sample",
            DenoiseRequest {
                sample: None,
                ..good()
            },
        ),
        (
            "timesteps",
            DenoiseRequest {
                timesteps: Some(Tensor::from_f32(&[2], &[1.0, 2.0])),
                ..good()
            },
        ),
        (
            "timesteps",
            DenoiseRequest {
                timesteps: Some(Tensor::from_f32(&[1], &[f32::NAN])),
                ..good()
            },
        ),
        (
            "guidance_scale",
            DenoiseRequest {
                guidance_scale: vec![1.0, 2.0],
                ..good()
            },
        ),
        (
            "encoder_hidden_states",
            DenoiseRequest {
                encoder_hidden_states: Some(tensor(DataType::Float32, &[1, 77, 32], 77 * 32 * 4)),
                ..good()
            },
        ),
        (
            "encoder_hidden_states",
            DenoiseRequest {
                encoder_hidden_states: Some(tensor(
                    DataType::Float32,
                    &[2, 77, 31],
                    2 * 77 * 31 * 4,
                )),
                ..good()
            },
        ),
    ];
    for (field, req) in cases {
        let err = denoiser.denoise(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let out = denoiser
        .denoise(good())
        .await
        .unwrap()
        .into_inner()
        .model_output
        .unwrap();
    assert_eq!(out.shape, vec![1, 4, 8, 8]);

    let mut vae = VaeServiceClient::connect(cluster.vae.url()).await.unwrap();
    let err = vae
        .decode(DecodeRequest {
            latents: Some(tensor(DataType::Float32, &[1, 4, 8, 8], 5)),
            encoding: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("latents"), "{}", err.message());
}

/// On a DenoiseSteps stream, good steps are answered in order; a bad step ends the stream
/// with INVALID_ARGUMENT naming the field, and so does a message without a step. The stage
/// keeps serving other streams.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_step_ends_its_stream_naming_the_field() {
    let cluster = Cluster::start(&tiny_model("sd1")).await;
    let mut denoiser = DenoiserServiceClient::connect(cluster.denoiser.url())
        .await
        .unwrap();
    let step = |t: f32, sample: Tensor| DenoiseStepsRequest {
        step: Some(DenoiseRequest {
            sample: Some(sample),
            timesteps: Some(Tensor::from_f32(&[1], &[t])),
            encoder_hidden_states: Some(tensor(DataType::Float32, &[2, 77, 32], 2 * 77 * 32 * 4)),
            guidance_scale: vec![7.5],
            guidance_rescale: vec![],
            context_id: String::new(),
        }),
        trace_context: Default::default(),
    };
    let good = |t| step(t, tensor(DataType::Float32, &[1, 4, 8, 8], 4 * 64 * 4));
    let bad = step(500.0, tensor(DataType::Float32, &[1, 4, 8, 8], 17));
    let messages = vec![good(999.0), good(800.0), bad, good(600.0)];
    let mut answers = denoiser
        .denoise_steps(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!(
            answer.step.unwrap().model_output.unwrap().shape,
            vec![1, 4, 8, 8]
        );
    }
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().starts_with("sample"), "{}", err.message());
    assert!(
        matches!(answers.message().await, Ok(None) | Err(_)),
        "the step after the bad one was answered"
    );

    let mut answers = denoiser
        .denoise_steps(tokio_stream::iter([DenoiseStepsRequest::default()]))
        .await
        .unwrap()
        .into_inner();
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(err.message(), "step: missing");

    let mut answers = denoiser
        .denoise_steps(tokio_stream::iter([good(999.0)]))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some());
    assert!(
        answers.message().await.unwrap().is_none(),
        "one answer per step"
    );
}

/// A message above the system's size limit (64 MiB, `sd_proto::MAX_MESSAGE_BYTES`) is refused
/// with a status that names its size and the limit, and the stage keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_size_limit_is_refused_naming_the_limit() {
    let model = tiny_model("sd1");
    let denoiser = start_stage("sd-denoiser", &model, &[]).await;
    let mut client = DenoiserServiceClient::connect(denoiser.url())
        .await
        .unwrap();
    let limit = sd_proto::MAX_MESSAGE_BYTES;
    // One f32 row of [4, 1024, 1024] is 16 MiB: one row more than the limit holds.
    let side = 1024i64;
    let rows = (limit as i64 / (4 * side * side * 4)) + 1;
    let huge = DenoiseRequest {
        sample: Some(tensor(
            DataType::Float32,
            &[rows, 4, side, side],
            (rows * 4 * side * side * 4) as usize,
        )),
        timesteps: Some(Tensor::from_f32(&[1], &[999.0])),
        guidance_scale: vec![],
        context_id: "over-the-limit".into(),
        ..Default::default()
    };
    let err = client.denoise(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(
        err.message().contains(&limit.to_string()),
        "the error names the limit: {}",
        err.message()
    );

    // The connection and the stage are still good for a request of the right size.
    let small = DenoiseRequest {
        sample: Some(tensor(DataType::Float32, &[1, 4, 8, 8], 4 * 64 * 4)),
        timesteps: Some(Tensor::from_f32(&[1], &[999.0])),
        encoder_hidden_states: Some(tensor(DataType::Float32, &[1, 77, 32], 77 * 32 * 4)),
        ..Default::default()
    };
    let out = client.denoise(small).await.unwrap().into_inner();
    assert_eq!(out.model_output.unwrap().shape, vec![1, 4, 8, 8]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_that_is_down_is_unavailable_and_named_quickly() {
    let model = tiny_model("sd1");
    let model = model.to_str().unwrap();
    let stage = |b: &str| Service::start(b, &["--listen", "127.0.0.1:0", "--model", model]);
    let (mut dn, mut vae) = (stage("sd-denoiser"), stage("sd-vae"));
    dn.wait_serving(Duration::from_secs(120)).await;
    vae.wait_serving(Duration::from_secs(120)).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let orch = Service::start(
        "sd-orchestrator",
        &[
            "--listen",
            "127.0.0.1:0",
            "--text-encoder",
            &format!("http://{dead}"),
            "--denoiser",
            &dn.url(),
            "--vae",
            &vae.url(),
        ],
    );
    let mut client = sd_e2e::client(&orch.url()).await;
    let started = Instant::now();
    let err = client.generate(ok_request()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("text-encoder"), "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// Runs a stage binary on `model` and returns its stderr; it must exit with failure quickly.
fn failing_start(binary: &str, model: &Path) -> String {
    let out = Command::new(bin(binary))
        .args(["--listen", "127.0.0.1:0", "--model"])
        .arg(model)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{binary} started on a broken model folder"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn broken_model_folders_fail_at_start_up_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&tiny_model("sd1"), &model);

    std::fs::remove_file(model.join("unet/config.json")).unwrap();
    let err = failing_start("sd-denoiser", &model);
    assert!(err.contains("unet/config.json"), "{err}");

    std::fs::write(model.join("vae/config.json"), "{ not json").unwrap();
    let err = failing_start("sd-vae", &model);
    assert!(err.contains("vae/config.json"), "{err}");

    for f in std::fs::read_dir(model.join("text_encoder")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let err = failing_start("sd-text-encoder", &model);
    assert!(err.contains("text_encoder/model.safetensors"), "{err}");

    std::fs::remove_dir_all(model.join("tokenizer")).unwrap();
    let err = failing_start("sd-text-encoder", &model);
    assert!(err.contains("tokenizer"), "{err}");
}
