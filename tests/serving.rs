//! Serving behaviour across real processes: step batching in the denoiser, call batching in
//! the text encoder and VAE, failover when a replica dies mid-generation, cancellation,
//! admission limits, and replicas added later.

#![allow(clippy::unwrap_used)]

use sd_e2e::{Service, metric_sample, scrape_metrics, start_orchestrator, start_stage, tiny_model};
use sd_proto::{
    stage::{
        DataType, DecodeRequest, DenoiseRequest, EncodeRequest, Tensor,
        denoiser_service_client::DenoiserServiceClient,
        text_encoder_service_client::TextEncoderServiceClient,
        vae_service_client::VaeServiceClient,
    },
    v1::{GenerateRequest, GenerateStreamRequest, generate_stream_response::Event},
};
use std::time::Duration;
use tonic::Code;

fn request(seed: u64, steps: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a yellow star".into(),
        negative_prompt: "grey".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(steps),
        seed: Some(seed),
        ..Default::default()
    }
}

/// A stage of the sd1 tiny model, SERVING.
async fn stage(binary: &str, extra: &[&str]) -> Service {
    start_stage(binary, &tiny_model("sd1"), extra).await
}

/// An orchestrator over the given stages, SERVING.
async fn orchestrator(te: &str, dn: &str, vae: &str, extra: &[&str]) -> Service {
    let mut s = start_orchestrator(te, dn, vae, extra);
    s.wait_serving(Duration::from_secs(120)).await;
    s
}

/// One replica of each stage behind an orchestrator that runs at most `generations` at once;
/// the stages come back too, for the test to keep them running.
async fn one_replica_each(generations: u32) -> ([Service; 3], Service) {
    let te = stage("sd-text-encoder", &[]).await;
    let dn = stage("sd-denoiser", &[]).await;
    let vae = stage("sd-vae", &[]).await;
    let limit = generations.to_string();
    let orch = orchestrator(
        &te.url(),
        &dn.url(),
        &vae.url(),
        &["--max-concurrent-generations", &limit],
    )
    .await;
    ([te, dn, vae], orch)
}

fn zeros(dtype: DataType, shape: &[i64], bytes: usize) -> Tensor {
    Tensor {
        dtype: dtype as i32,
        shape: shape.to_vec(),
        data: vec![0u8; bytes].into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_generations_share_denoiser_forwards() {
    let te = stage("sd-text-encoder", &[]).await;
    let d1 = stage("sd-denoiser", &["--batch-wait-ms", "50"]).await;
    let d2 = stage("sd-denoiser", &["--batch-wait-ms", "50"]).await;
    let vae = stage("sd-vae", &[]).await;
    let orch = orchestrator(
        &te.url(),
        &format!("{},{}", d1.url(), d2.url()),
        &vae.url(),
        &[],
    )
    .await;

    // Eight generations at once through two replicas all succeed.
    let client = sd_e2e::client(&orch.url()).await;
    let runs: Vec<_> = (0..8u64)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(request(100 + i, 6)).await })
        })
        .collect();
    for run in runs {
        let r = run.await.unwrap().unwrap().into_inner();
        assert_eq!(r.images.len(), 1);
        let t = r.timings.unwrap();
        assert!(t.denoise_seconds > 0.0 && t.total_seconds >= t.denoise_seconds);
    }

    // Steps of different "generations" (different timesteps) sent together join one forward.
    let mut dn = DenoiserServiceClient::connect(d1.url()).await.unwrap();
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let mut dn = dn.clone();
            tokio::spawn(async move {
                dn.denoise(DenoiseRequest {
                    sample: Some(zeros(DataType::Float32, &[1, 4, 8, 8], 4 * 64 * 4)),
                    timesteps: Some(Tensor::from_f32(&[1], &[100.0 * i as f32])),
                    encoder_hidden_states: Some(zeros(
                        DataType::Float32,
                        &[2, 77, 32],
                        2 * 77 * 32 * 4,
                    )),
                    guidance_scale: vec![7.5],
                    guidance_rescale: vec![],
                    context_id: String::new(),
                })
                .await
            })
        })
        .collect();
    let mut largest = 0;
    for call in calls {
        let r = call.await.unwrap().unwrap().into_inner();
        largest = largest.max(r.batch_calls);
    }
    assert!(largest > 1, "no batch had more than one call");
    // A lone call still works and is its own batch.
    let r = dn
        .denoise(DenoiseRequest {
            sample: Some(zeros(DataType::Float32, &[1, 4, 8, 8], 4 * 64 * 4)),
            timesteps: Some(Tensor::from_f32(&[1], &[10.0])),
            encoder_hidden_states: Some(zeros(DataType::Float32, &[1, 77, 32], 77 * 32 * 4)),
            guidance_scale: vec![],
            guidance_rescale: vec![],
            context_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.batch_calls, r.batch_rows), (1, 1));
}

/// Runs `f(i)` for every `i` in `0..n` at once and collects the results in order.
async fn all_at_once<T: Send + 'static, F>(n: usize, f: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    let (a, b) = (a.to_f32_vec("a").unwrap(), b.to_f32_vec("b").unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread")]
async fn text_encoder_and_vae_batch_concurrent_calls_and_answer_each_its_own() {
    let te = stage("sd-text-encoder", &["--batch-wait-ms", "200"]).await;
    let vae = stage("sd-vae", &["--batch-wait-ms", "200"]).await;

    // Text encoder: six calls at once, one with bad emphasis syntax in its second prompt.
    let prompts = |i: usize| -> Vec<String> {
        let second = if i == 3 { "a)" } else { "grey" };
        vec![format!("a (red:1.2) circle number {i}"), second.to_string()]
    };
    let encode = |p: Vec<String>| EncodeRequest {
        prompts: p,
        clip_skip: vec![],
        long_prompt: false,
        prompt_weighting: true,
    };
    let client = TextEncoderServiceClient::connect(te.url()).await.unwrap();
    let together = all_at_once(6, |i| {
        let mut c = client.clone();
        let request = encode(prompts(i));
        async move { c.encode(request).await }
    })
    .await;
    let mut shared = 0;
    for (i, r) in together.into_iter().enumerate() {
        if i == 3 {
            // The bad call fails alone, naming its own prompt index.
            let err = r.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains("prompts[1]"), "{}", err.message());
            continue;
        }
        let r = r.unwrap().into_inner();
        shared = shared.max(r.batch_calls);
        let lone = client
            .clone()
            .encode(encode(prompts(i)))
            .await
            .unwrap()
            .into_inner();
        let (got, want) = (r.hidden_states.unwrap(), lone.hidden_states.unwrap());
        // Same rows as a lone call, up to the summation order of a larger matmul.
        assert!(max_abs_diff(&got, &want) < 1e-5, "call {i}");
    }
    assert!(shared > 1, "no Encode calls shared a forward");

    // VAE: four calls at once with different latents, two sizes; same-size calls share.
    let latents = |i: usize| {
        let side = if i.is_multiple_of(2) { 8 } else { 16 };
        let n = 4 * side * side;
        let values: Vec<f32> = (0..n)
            .map(|k| ((k * (i + 1)) % 7) as f32 * 0.3 - 1.0)
            .collect();
        Tensor::from_f32(&[1, 4, side as i64, side as i64], &values)
    };
    let decode = |i: usize| DecodeRequest {
        latents: Some(latents(i)),
        encoding: 0,
    };
    let client = VaeServiceClient::connect(vae.url()).await.unwrap();
    let together = all_at_once(4, |i| {
        let mut c = client.clone();
        let request = decode(i);
        async move { c.decode(request).await }
    })
    .await;
    for (i, r) in together.into_iter().enumerate() {
        let r = r.unwrap().into_inner();
        assert_eq!((r.batch_calls, r.batch_rows), (2, 2), "call {i}");
        let side = if i.is_multiple_of(2) { 64 } else { 128 };
        assert_eq!(r.images[0].width, side);
        let lone = client.clone().decode(decode(i)).await.unwrap().into_inner();
        assert_eq!(lone.batch_calls, 1);
        let (a, b) = (
            image::load_from_memory(&r.images[0].data)
                .unwrap()
                .to_rgb8(),
            image::load_from_memory(&lone.images[0].data)
                .unwrap()
                .to_rgb8(),
        );
        // 8-bit pixels: a batched forward may flip the rounding of a pixel by one level.
        let worst = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        assert!(worst <= 1, "call {i}: pixels differ by {worst}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_dying_mid_generation_changes_nothing() {
    let te = stage("sd-text-encoder", &[]).await;
    let mut d1 = Some(stage("sd-denoiser", &[]).await);
    let d2 = stage("sd-denoiser", &[]).await;
    let vae = stage("sd-vae", &[]).await;
    let denoisers = format!("{},{}", d1.as_ref().unwrap().url(), d2.url());
    let orch = orchestrator(&te.url(), &denoisers, &vae.url(), &[]).await;
    let mut client = sd_e2e::client(&orch.url()).await;

    let reference = client
        .generate(request(4242, 30))
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .generate_stream(GenerateStreamRequest {
            request: Some(request(4242, 30)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut result = None;
    while let Some(event) = stream.message().await.unwrap() {
        match event.event {
            Some(Event::Progress(p)) if p.step == 5 => drop(d1.take()), // kill replica 1
            Some(Event::Result(r)) => result = Some(r),
            _ => {}
        }
    }
    assert!(d1.is_none(), "the replica was never killed");
    let result = result.expect("the generation completed");
    assert_eq!(
        result.images[0].data, reference.images[0].data,
        "failover changed the image"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_stream_stops_the_generation_and_frees_its_slot() {
    let (_stages, orch) = one_replica_each(1).await;
    let mut client = sd_e2e::client(&orch.url()).await;
    let mut stream = client
        .generate_stream(GenerateStreamRequest {
            request: Some(request(1, 150)),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    drop(stream);
    // The one generation slot comes back within a step or two: a new request is admitted.
    let mut admitted = None;
    for _ in 0..100 {
        match client.generate(request(2, 2)).await {
            Ok(r) => {
                admitted = Some(r.into_inner());
                break;
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s}"),
        }
    }
    assert!(admitted.is_some(), "the cancelled generation kept its slot");
    assert!(
        orch.stderr().contains("cancelled by the client"),
        "{}",
        orch.stderr()
    );
}

/// A client deadline bounds the generation's steps: 150 steps do not fit in 300 ms, so the
/// generation ends with DEADLINE_EXCEEDED at the deadline (its step stream reset), and its
/// slot is free for the next request.
#[tokio::test(flavor = "multi_thread")]
async fn a_generation_past_its_deadline_ends_and_frees_its_slot() {
    let (_stages, orch) = one_replica_each(1).await;
    let mut client = sd_e2e::client(&orch.url()).await;
    // The deadline as a header only, so the orchestrator, not this client, enforces it.
    let mut late = tonic::Request::new(request(3, 150));
    late.metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let started = std::time::Instant::now();
    let err = client.generate(late).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(err.message().contains("denoiser"), "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the generation ran on past its deadline: {:?}",
        started.elapsed()
    );
    let reply = client.generate(request(4, 2)).await.unwrap().into_inner();
    assert_eq!(reply.images.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_beyond_the_limit_is_refused_while_admitted_requests_complete() {
    let (_stages, orch) = one_replica_each(2).await;
    let client = sd_e2e::client(&orch.url()).await;
    let runs: Vec<_> = (0..10u64)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(request(i, 20)).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for run in runs {
        match run.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().images.len(), 1);
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s}");
                assert!(s.metadata().get("retry-after-ms").is_some());
                refused += 1;
            }
        }
    }
    assert!(ok >= 2 && refused >= 1, "ok {ok}, refused {refused}");
}

/// With two idle denoiser replicas, each generation's later steps go to the replica that
/// cached its context at the first step (the balancer prefers it while it is no busier), so
/// no step costs a context miss and each context is cached once.
#[tokio::test(flavor = "multi_thread")]
async fn a_generation_keeps_to_the_replica_holding_its_context() {
    const GENERATIONS: u32 = 3;
    const STEPS: u32 = 8;
    let te = stage("sd-text-encoder", &[]).await;
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let d1 = stage("sd-denoiser", &metrics).await;
    let d2 = stage("sd-denoiser", &metrics).await;
    let vae = stage("sd-vae", &[]).await;
    let denoisers = format!("{},{}", d1.url(), d2.url());
    let orch = orchestrator(&te.url(), &denoisers, &vae.url(), &[]).await;
    let mut client = sd_e2e::client(&orch.url()).await;
    for seed in 0..GENERATIONS {
        client
            .generate(request(u64::from(seed), STEPS))
            .await
            .unwrap();
    }
    let (mut hits, mut misses, mut inserts) = (0.0, 0.0, 0.0);
    for d in [&d1, &d2] {
        let body = scrape_metrics(&d.metrics_addr().unwrap()).await;
        let lookups = "sd_context_cache_lookups_total{";
        hits += metric_sample(&body, lookups, "result=\"hit\"");
        misses += metric_sample(&body, lookups, "result=\"miss\"");
        inserts += metric_sample(&body, "sd_context_cache_inserts_total ", "");
    }
    assert_eq!(misses, 0.0, "steps moved away from their context");
    // Each generation sent its steps on one DenoiseSteps stream (counted when it ends, just
    // after its generation), and none as unary Denoise calls.
    let streams = |body: &str, method: &str| {
        body.lines()
            .filter(|l| {
                l.starts_with("rpc_server_call_duration_seconds_count{")
                    && l.contains(&format!("rpc_method=\"{method}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (mut opened, mut calls) = (0.0, 0.0);
        for d in [&d1, &d2] {
            let body = scrape_metrics(&d.metrics_addr().unwrap()).await;
            opened += streams(&body, "DenoiseSteps");
            calls += streams(&body, "Denoise");
        }
        assert_eq!(calls, 0.0, "steps sent as unary Denoise calls");
        if opened == f64::from(GENERATIONS) {
            break;
        }
        assert!(
            opened < f64::from(GENERATIONS) && std::time::Instant::now() < deadline,
            "{opened} step streams for {GENERATIONS} generations"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        inserts,
        f64::from(GENERATIONS),
        "one cached context per generation"
    );
    assert_eq!(hits, f64::from(GENERATIONS * (STEPS - 1)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_added_later_receives_work() {
    let te = stage("sd-text-encoder", &[]).await;
    let mut d1 = Some(stage("sd-denoiser", &[]).await);
    let vae = stage("sd-vae", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("denoisers.txt");
    std::fs::write(&list, format!("{}\n", d1.as_ref().unwrap().url())).unwrap();
    let orch = orchestrator(
        &te.url(),
        &format!("file://{}", list.display()),
        &vae.url(),
        &["--resolve-interval", "0.5"],
    )
    .await;
    let mut client = sd_e2e::client(&orch.url()).await;
    client.generate(request(3, 2)).await.unwrap();

    let d2 = stage("sd-denoiser", &[]).await;
    std::fs::write(
        &list,
        format!("{}\n{}\n", d1.as_ref().unwrap().url(), d2.url()),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // With the first replica gone, only the added one can serve the steps.
    drop(d1.take());
    let r = client.generate(request(3, 2)).await.unwrap().into_inner();
    assert_eq!(r.images.len(), 1);
}

/// A guided step for the tiny model: one sample, its context (2x77x32) when `context` is set.
fn step(t: f32, context: Option<f32>, id: &str) -> DenoiseRequest {
    let sample: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    DenoiseRequest {
        sample: Some(Tensor::from_f32(&[1, 4, 8, 8], &sample)),
        timesteps: Some(Tensor::from_f32(&[1], &[t])),
        encoder_hidden_states: context.map(|v| {
            let data: Vec<f32> = (0..2 * 77 * 32)
                .map(|i| v * (i as f32 * 0.01).cos())
                .collect();
            Tensor::from_f32(&[2, 77, 32], &data)
        }),
        guidance_scale: vec![7.5],
        guidance_rescale: vec![],
        context_id: id.into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_context_cache_serves_ids_and_reports_misses() {
    let on = stage("sd-denoiser", &["--batch-wait-ms", "0"]).await;
    let off = stage(
        "sd-denoiser",
        &["--batch-wait-ms", "0", "--context-cache-bytes", "0"],
    )
    .await;
    let mut dn = DenoiserServiceClient::connect(on.url()).await.unwrap();
    use sd_proto::stage::DenoiserServiceInfoRequest;
    let info = dn
        .info(DenoiserServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.context_cache_bytes, 256 << 20);

    // Context with an id: used and cached; the id alone then gives the same output.
    let full = dn.denoise(step(500.0, Some(0.5), "gen-1")).await.unwrap();
    let full = full.into_inner();
    assert!(full.context_cached);
    let bare = dn.denoise(step(500.0, None, "gen-1")).await.unwrap();
    let bare = bare.into_inner();
    assert!(bare.context_cached);
    assert_eq!(full.model_output, bare.model_output);
    // ... and the same output as the context sent without any id.
    let plain = dn.denoise(step(500.0, Some(0.5), "")).await.unwrap();
    let plain = plain.into_inner();
    assert!(!plain.context_cached);
    assert_eq!(plain.model_output, full.model_output);
    // Re-storing an id replaces its context.
    let other = dn.denoise(step(500.0, Some(-2.0), "gen-1")).await.unwrap();
    let again = dn.denoise(step(500.0, None, "gen-1")).await.unwrap();
    assert_eq!(
        other.into_inner().model_output,
        again.into_inner().model_output
    );

    // An id this replica never saw, without the context: FAILED_PRECONDITION, sd-context-miss.
    let miss = dn
        .denoise(step(500.0, None, "never-stored"))
        .await
        .unwrap_err();
    assert_eq!(miss.code(), Code::FailedPrecondition, "{miss}");
    assert_eq!(
        miss.metadata().get("sd-context-miss").unwrap(),
        "never-stored"
    );
    assert!(
        miss.message().contains("never-stored"),
        "{}",
        miss.message()
    );
    assert!(sd_proto::context_cache::is_miss(&miss));

    // Bad ids and a missing context without an id are INVALID_ARGUMENT.
    for (req, field) in [
        (step(1.0, None, ""), "encoder_hidden_states"),
        (step(1.0, Some(1.0), &"x".repeat(129)), "context_id"),
        (step(1.0, None, &"x".repeat(129)), "context_id"),
        (step(1.0, None, "a b"), "context_id"),
    ] {
        let err = dn.denoise(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    // A cached context of another batch layout is refused, not misused.
    let mut unguided = step(1.0, None, "gen-1");
    unguided.guidance_scale.clear();
    let err = dn.denoise(unguided).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // With the cache off, nothing is cached and the id alone is a miss.
    let mut dn_off = DenoiserServiceClient::connect(off.url()).await.unwrap();
    let r = dn_off
        .denoise(step(500.0, Some(0.5), "gen-1"))
        .await
        .unwrap();
    let r = r.into_inner();
    assert!(!r.context_cached);
    assert_eq!(r.model_output, full.model_output);
    let err = dn_off
        .denoise(step(500.0, None, "gen-1"))
        .await
        .unwrap_err();
    assert!(sd_proto::context_cache::is_miss(&err), "{err}");
    assert!(
        on.stderr().contains("context cache miss"),
        "{}",
        on.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn images_are_identical_with_the_context_cache_on_and_off() {
    let te = stage("sd-text-encoder", &[]).await;
    let on = stage("sd-denoiser", &[]).await;
    let off = stage("sd-denoiser", &["--context-cache-bytes", "0"]).await;
    let vae = stage("sd-vae", &[]).await;
    let orch_on = orchestrator(&te.url(), &on.url(), &vae.url(), &[]).await;
    let orch_off = orchestrator(&te.url(), &off.url(), &vae.url(), &[]).await;
    let mut c_on = sd_e2e::client(&orch_on.url()).await;
    let mut c_off = sd_e2e::client(&orch_off.url()).await;
    let two_images = GenerateRequest {
        num_images: Some(2),
        guidance_rescale: Some(0.7),
        ..request(7, 6)
    };
    for req in [request(11, 8), two_images] {
        let a = c_on.generate(req.clone()).await.unwrap().into_inner();
        let b = c_off.generate(req).await.unwrap().into_inner();
        assert!(!a.images.is_empty());
        assert_eq!(a.images.len(), b.images.len());
        for (x, y) in a.images.iter().zip(&b.images) {
            assert_eq!(x.data, y.data, "the context cache changed the image");
        }
    }
    // One replica that caches: every step after the first hit the cache, no miss. The replica
    // without a cache said so, and was sent the context every step: no miss either.
    for o in [&orch_on, &orch_off] {
        assert!(!o.stderr().contains("context cache miss"), "{}", o.stderr());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn context_misses_from_evictions_and_replica_changes_are_recovered() {
    // Room for one tiny-model context (2x77x32 f32 = 19712 bytes): concurrent generations
    // evict each other's contexts, and steps that move between the replicas miss too.
    // Batching is off in every stage so that every forward has the same shape as the
    // reference's (a batched forward may round differently from a lone one, cache or not).
    let unbatched = ["--max-batch", "1"];
    let te = stage("sd-text-encoder", &unbatched).await;
    let tiny = ["--context-cache-bytes", "20000", "--max-batch", "1"];
    let d1 = stage("sd-denoiser", &tiny).await;
    let d2 = stage("sd-denoiser", &tiny).await;
    let reference = stage(
        "sd-denoiser",
        &["--context-cache-bytes", "0", "--max-batch", "1"],
    )
    .await;
    let vae = stage("sd-vae", &unbatched).await;
    let orch = orchestrator(
        &te.url(),
        &format!("{},{}", d1.url(), d2.url()),
        &vae.url(),
        &[],
    )
    .await;
    let orch_ref = orchestrator(&te.url(), &reference.url(), &vae.url(), &[]).await;
    let client = sd_e2e::client(&orch.url()).await;
    let runs: Vec<_> = (0..4u64)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(request(300 + i, 8)).await })
        })
        .collect();
    let mut reference_client = sd_e2e::client(&orch_ref.url()).await;
    for (i, run) in runs.into_iter().enumerate() {
        let got = run.await.unwrap().unwrap().into_inner();
        let want = reference_client
            .generate(request(300 + i as u64, 8))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.images[0].data, want.images[0].data,
            "generation {i}: a recovered context miss changed the image"
        );
    }
    let log = orch.stderr();
    assert!(
        log.contains("context cache miss on the denoiser"),
        "no miss was exercised:\n{log}"
    );
    let misses = d1.stderr().matches("context cache miss").count()
        + d2.stderr().matches("context cache miss").count();
    assert!(misses > 0, "the denoisers logged no miss");
}
