//! Model revisions across the replicas of a stage, with real processes on 127.0.0.1: replicas
//! that disagree at start-up stop the orchestrator from serving, and a replica added later
//! that serves another revision gets no work while generations go on.
//!
//! (A matching replica added later receiving work is `serving.rs`'s
//! `a_replica_added_later_receives_work`.)

#![allow(clippy::unwrap_used)]

use sd_e2e::{
    Service, copy_dir, scrape_metrics, start_orchestrator as orchestrator, start_stage as stage,
    tiny_model,
};
use sd_proto::{
    stage::{
        DataType, DenoiseRequest, DenoiserServiceInfoRequest, Tensor,
        denoiser_service_client::DenoiserServiceClient,
    },
    v1::GenerateRequest,
};
use std::{
    path::Path,
    time::{Duration, Instant},
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn request(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a yellow star".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(3),
        seed: Some(seed),
        ..Default::default()
    }
}

/// A copy of the sd1 fixture whose U-Net config carries one more (unused) key: the same
/// architecture and weights, but another U-Net revision.
fn retouched_sd1(dir: &Path) -> std::path::PathBuf {
    let copy = dir.join("tiny-sd1-retouched");
    copy_dir(&tiny_model("sd1"), &copy);
    let config = copy.join("unet/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen('{', "{\n  \"_retouched\": \"replica_compat test\",", 1);
    std::fs::write(&config, text).unwrap();
    copy
}

/// The revision a denoiser reports.
async fn revision(denoiser: &Service) -> String {
    let mut client = DenoiserServiceClient::connect(denoiser.url())
        .await
        .unwrap();
    let info = client
        .info(DenoiserServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    info.model.unwrap().revision
}

async fn health(service: &Service) -> i32 {
    let channel = Channel::from_shared(service.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits until `service`'s stderr contains `needle`.
async fn wait_for_log(service: &Service, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !service.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{} never logged {needle:?}:\n{}",
            service.name,
            service.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Denoise calls and DenoiseSteps streams a stage served, from its Prometheus metrics (0
/// when none yet).
async fn denoise_calls(service: &Service) -> f64 {
    let addr = service.metrics_addr().expect("no `metrics on` line");
    let body = scrape_metrics(&addr).await;
    body.lines()
        .filter(|l| {
            l.starts_with("rpc_server_call_duration_seconds_count{")
                && (l.contains("rpc_method=\"Denoise\"")
                    || l.contains("rpc_method=\"DenoiseSteps\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_serving_different_revisions_stop_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = tiny_model("sd1");
    let retouched = retouched_sd1(dir.path());
    let te = stage("sd-text-encoder", &sd1, &[]).await;
    let d1 = stage("sd-denoiser", &sd1, &[]).await;
    let mut d2 = Some(stage("sd-denoiser", &retouched, &["--model-id", "tiny-sd1"]).await);
    let vae = stage("sd-vae", &sd1, &[]).await;
    let (r1, r2) = (revision(&d1).await, revision(d2.as_ref().unwrap()).await);
    assert_ne!(r1, r2, "the retouched copy kept its revision");
    let d2_url = d2.as_ref().unwrap().url();

    let mut orch = orchestrator(
        &te.url(),
        &format!("{},{d2_url}", d1.url()),
        &vae.url(),
        &[],
    );
    let mut client = sd_e2e::client(&orch.url()).await;
    let err = client.generate(request(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let message = err.message();
    assert!(message.contains("denoiser replicas disagree"), "{message}");
    for side in [d1.url(), d2_url.clone(), r1.clone(), r2.clone()] {
        assert!(message.contains(&side), "{side} not named: {message}");
    }
    assert!(message.contains("tiny-sd1"), "{message}");
    assert_eq!(
        health(&orch).await,
        ServingStatus::NotServing as i32,
        "serving while its replicas disagree"
    );
    wait_for_log(&orch, "refusing to serve", Duration::from_secs(30)).await;

    // With the odd replica gone (unreachable replicas are skipped), the service comes up.
    drop(d2.take());
    orch.wait_serving(Duration::from_secs(60)).await;
    let reply = client.generate(request(2)).await.unwrap().into_inner();
    assert_eq!(reply.images.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_added_later_with_another_revision_gets_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = tiny_model("sd1");
    let retouched = retouched_sd1(dir.path());
    let te = stage("sd-text-encoder", &sd1, &[]).await;
    let mut d1 = Some(stage("sd-denoiser", &sd1, &[]).await);
    let vae = stage("sd-vae", &sd1, &[]).await;
    let list = dir.path().join("denoisers.txt");
    std::fs::write(&list, format!("{}\n", d1.as_ref().unwrap().url())).unwrap();
    let mut orch = orchestrator(
        &te.url(),
        &format!("file://{}", list.display()),
        &vae.url(),
        &["--resolve-interval", "0.5"],
    );
    orch.wait_serving(Duration::from_secs(120)).await;
    let mut client = sd_e2e::client(&orch.url()).await;
    client.generate(request(1)).await.unwrap();

    // The same model id, another U-Net revision.
    let bad = stage(
        "sd-denoiser",
        &retouched,
        &["--model-id", "tiny-sd1", "--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    let (good_revision, bad_revision) =
        (revision(d1.as_ref().unwrap()).await, revision(&bad).await);
    assert_ne!(good_revision, bad_revision);
    // One direct call, so the metric is known to count.
    DenoiserServiceClient::connect(bad.url())
        .await
        .unwrap()
        .denoise(DenoiseRequest {
            sample: Some(Tensor::from_f32(&[1, 4, 8, 8], &[0.0; 256])),
            timesteps: Some(Tensor::from_f32(&[1], &[10.0])),
            encoder_hidden_states: Some(Tensor {
                dtype: DataType::Float32 as i32,
                shape: vec![1, 77, 32],
                data: vec![0u8; 77 * 32 * 4].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(denoise_calls(&bad).await, 1.0);

    std::fs::write(
        &list,
        format!("{}\n{}\n", d1.as_ref().unwrap().url(), bad.url()),
    )
    .unwrap();
    wait_for_log(&orch, "kept out of rotation", Duration::from_secs(30)).await;
    let log = orch.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("kept out of rotation"))
        .unwrap();
    for side in [bad.url(), good_revision.clone(), bad_revision.clone()] {
        assert!(line.contains(&side), "{side} not named: {line}");
    }
    assert!(line.contains("ERROR"), "{line}");

    // Generations go on, all on the first replica.
    for seed in 0..4 {
        let reply = client.generate(request(seed)).await.unwrap().into_inner();
        assert_eq!(reply.images.len(), 1);
    }
    assert_eq!(
        denoise_calls(&bad).await,
        1.0,
        "the replica serving another revision got work"
    );
    assert_eq!(
        health(&orch).await,
        ServingStatus::Serving as i32,
        "one bad replica took the service down"
    );

    // With the good replica gone, nothing is left to serve the steps: the odd one stays out.
    drop(d1.take());
    let err = client.generate(request(9)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        err.message()
            .contains("1 serving another model or revision"),
        "{}",
        err.message()
    );
    assert_eq!(denoise_calls(&bad).await, 1.0);
}
