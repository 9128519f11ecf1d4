//! Clients in other languages work: Python stubs generated from `proto/` at test time call the
//! running orchestrator and get a PNG.

#![allow(clippy::unwrap_used)]

use sd_e2e::{Cluster, png_size, python, tiny_model, workspace_root};

#[tokio::test(flavor = "multi_thread")]
async fn python_grpc_client_gets_a_png() {
    let cluster = Cluster::start(&tiny_model("sd1")).await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("py.png");
    let run = tokio::process::Command::new(python())
        .arg(workspace_root().join("tests/python/client_generate.py"))
        .arg(&cluster.orchestrator.addr)
        .arg(&out)
        .arg("--stubs")
        .arg(tmp.path().join("stubs"))
        .output()
        .await
        .unwrap();
    assert!(
        run.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("seed=11"));
    assert_eq!(png_size(&std::fs::read(&out).unwrap()), (64, 64));
}
