//! The local HTTP endpoint: `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`, `/status` (the JSON [`Status`]) and `POST /reload`, on
//! loopback by default (`metrics.listen`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::metrics::Metrics;
use crate::status::Status;

/// Serve `/metrics`, `/healthz`, `/readyz` and `/status` (the JSON
/// [`Status`] of gateway `gateway`) until `shutdown`.
/// `POST /reload` asks `control` to read the configuration again and
/// answers with the outcome (404 without a control).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    gateway: String,
    control: Option<Control>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        let gateway = gateway.clone();
        let control = control.clone();
        tokio::spawn(async move {
            // Read up to the end of the request head; it may arrive in pieces.
            let mut buf = Vec::with_capacity(512);
            let read_head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .is_err()
            {
                return;
            }
            let req = String::from_utf8_lossy(&buf);
            let method = req.split_whitespace().next().unwrap_or("GET");
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body, ctype) = match path {
                "/reload" => match (&control, method) {
                    (Some(c), "POST") => {
                        let (status, body) = c.reload().await.http();
                        (status, body, "text/plain")
                    }
                    (Some(_), _) => (
                        "405 Method Not Allowed",
                        "use POST\n".to_string(),
                        "text/plain",
                    ),
                    (None, _) => ("404 Not Found", "not found\n".to_string(), "text/plain"),
                },
                "/metrics" => (
                    "200 OK",
                    metrics.encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                "/status" => {
                    let status = Status::snapshot(&metrics, &gateway, crate::clock::now_ms());
                    // Plain data with string keys: serializing cannot fail.
                    let body = serde_json::to_string(&status).unwrap_or_default() + "\n";
                    ("200 OK", body, "application/json")
                }
                "/readyz" if metrics.is_ready() => ("200 OK", "ready\n".to_string(), "text/plain"),
                "/readyz" => (
                    "503 Service Unavailable",
                    "not ready\n".to_string(),
                    "text/plain",
                ),
                _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_a_request_that_arrives_in_pieces() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.reject("s", "malformed");
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            metrics.clone(),
            "gw".into(),
            None,
            stop.clone(),
        ));
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /metr").await.unwrap();
        sock.flush().await.unwrap();
        tokio::task::yield_now().await;
        sock.write_all(b"ics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.contains("outpost_rejected_total{source=\"s\",reason=\"malformed\"} 1"),
            "{out}"
        );
        assert_eq!(metrics.rejected_total("malformed"), 1);
        stop.cancel();
    }
}
