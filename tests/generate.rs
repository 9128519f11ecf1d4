//! The main path across four processes: the three stages and the orchestrator started as
//! separate binaries on 127.0.0.1, a Python-made tiny model, images through the public API.

#![allow(clippy::unwrap_used)]

use sd_e2e::{Cluster, png_size, tiny_model};
use sd_proto::v1::{GenerateRequest, GenerateStreamRequest, generate_stream_response::Event};
use tokio_stream_free::collect_stream;

fn request(seed: Option<u64>) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: "blurry".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(4),
        seed,
        ..Default::default()
    }
}

mod tokio_stream_free {
    /// Drains a tonic stream into a vector.
    pub async fn collect_stream<T>(mut s: tonic::Streaming<T>) -> Result<Vec<T>, tonic::Status> {
        let mut out = Vec::new();
        while let Some(item) = s.message().await? {
            out.push(item);
        }
        Ok(out)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn same_seed_same_png_other_seed_differs() {
    let cluster = Cluster::start(&tiny_model("sd1")).await;
    let mut client = cluster.client().await;

    let a = client
        .generate(request(Some(42)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.images.len(), 1);
    assert_eq!(png_size(&a.images[0].data), (64, 64));
    assert_eq!((a.images[0].width, a.images[0].height), (64, 64));
    assert_eq!(a.seed, 42);
    assert_eq!(a.steps, 4);
    assert_eq!(a.scheduler, "ddim");

    let b = client
        .generate(request(Some(42)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        a.images[0].data, b.images[0].data,
        "same seed must give identical bytes"
    );

    let c = client
        .generate(request(Some(43)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        a.images[0].data, c.images[0].data,
        "another seed must give another image"
    );

    // No seed: one is drawn and returned, and it reproduces the image.
    let d = client.generate(request(None)).await.unwrap().into_inner();
    let e = client
        .generate(request(Some(d.seed)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.images[0].data, e.images[0].data);
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_reports_every_step_then_the_same_image() {
    let cluster = Cluster::start(&tiny_model("sd1")).await;
    let mut client = cluster.client().await;
    let unary = client
        .generate(request(Some(7)))
        .await
        .unwrap()
        .into_inner();
    let stream = client
        .generate_stream(GenerateStreamRequest {
            request: Some(request(Some(7))),
        })
        .await
        .unwrap()
        .into_inner();
    let events = collect_stream(stream).await.unwrap();
    let (last, progress) = events.split_last().unwrap();
    let steps: Vec<u32> = progress
        .iter()
        .map(|e| match &e.event {
            Some(Event::Progress(p)) => {
                assert_eq!(p.total_steps, 4);
                p.step
            }
            other => panic!("expected progress, got {other:?}"),
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    match &last.event {
        Some(Event::Result(r)) => assert_eq!(r.images[0].data, unary.images[0].data),
        other => panic!("expected the result last, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn several_images_without_guidance_and_non_square() {
    let cluster = Cluster::start(&tiny_model("sd1")).await;
    let mut client = cluster.client().await;
    let r = client
        .generate(GenerateRequest {
            num_images: Some(2),
            width: Some(64),
            height: Some(32),
            guidance_scale: Some(1.0),
            ..request(Some(5))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.images.len(), 2);
    for img in &r.images {
        assert_eq!(png_size(&img.data), (64, 32));
    }
    assert_ne!(
        r.images[0].data, r.images[1].data,
        "each image has its own noise"
    );
}
