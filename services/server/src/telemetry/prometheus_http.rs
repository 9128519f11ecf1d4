//! A minimal HTTP/1.1 endpoint for Prometheus scrapes: `GET /metrics` answers the registry in
//! the text exposition format, anything else 404. One request per connection; scrapes are
//! rare and small, so no HTTP framework.

use prometheus::Encoder as _;
use std::{net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Binds `addr`, prints `metrics on ADDR` on stdout (as `bind` prints `listening on`), and
/// serves scrapes on a task.
pub(crate) async fn serve(
    addr: SocketAddr,
    registry: prometheus::Registry,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics: cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    println!("metrics on {local}");
    tracing::info!(%local, "prometheus metrics on http://{local}/metrics");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), answer(stream, &registry)).await;
            });
        }
    });
    Ok((local, task))
}

async fn answer(mut stream: TcpStream, registry: &prometheus::Registry) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        let encoder = prometheus::TextEncoder::new();
        let mut body = Vec::new();
        match encoder.encode(&registry.gather(), &mut body) {
            Ok(()) => ("200 OK", encoder.format_type().to_string(), body),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain".to_string(),
                e.to_string().into_bytes(),
            ),
        }
    } else {
        (
            "404 Not Found",
            "text/plain".to_string(),
            b"try /metrics\n".to_vec(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}
