//! Probes that need no API key: the loopback metrics listener's `/ready`.

use super::*;

#[tokio::test]
async fn the_metrics_listener_ready_probe_says_only_ready_or_not() {
    let f = fixture();
    let probe = |state: AppState| async move {
        let req = Request::builder().uri("/ready").body(Body::empty()).unwrap();
        let resp = crate::app::metrics_app(state).oneshot(req).await.unwrap();
        let status = resp.status();
        let body: Value =
            serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap()).unwrap();
        (status, body)
    };
    assert_eq!(probe(f.state.clone()).await, (StatusCode::OK, json!({"status": "ready"})));
    f.state.stop_accepting();
    assert_eq!(probe(f.state.clone()).await, (StatusCode::SERVICE_UNAVAILABLE, json!({"status": "not_ready"})));
}
