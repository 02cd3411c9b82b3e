//! Regressions of the hardening issue, through the router: an unauthenticated
//! flood cannot fill the audit volume, large prompts do not stall the async
//! workers, an oversized prompt is refused before it is tokenized.

use super::*;

/// Total bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                std::fs::metadata(&p).unwrap().len()
            }
        })
        .sum()
}

/// Regression (audit volume filled by unauthenticated requests): 10,000
/// key-less requests from one source grow the trail by less than 64 KiB,
/// are answered 401 then 429 with Retry-After, are counted exactly in the
/// coalesced `auth.denied` records, and an authenticated request from the
/// same source still succeeds.
#[tokio::test]
async fn a_flood_of_key_less_requests_cannot_fill_the_audit_volume() {
    let f = fixture();
    let before = dir_bytes(f.audit_dir.path());
    let source: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let router = app(f.state.clone());
    let request = |key: Option<&str>| {
        let mut b = Request::get("/v1/models");
        if let Some(k) = key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let mut req = b.body(Body::empty()).unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(source));
        req
    };
    let (mut unauthorized, mut limited) = (0u32, 0u32);
    for _ in 0..10_000 {
        let resp = router.clone().oneshot(request(None)).await.unwrap();
        match resp.status() {
            StatusCode::UNAUTHORIZED => unauthorized += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(resp.headers().contains_key(header::RETRY_AFTER));
                limited += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(unauthorized >= 20 && limited > 9_000, "{unauthorized} x 401, {limited} x 429");
    let resp = router.clone().oneshot(request(Some(&f.inference))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "a valid key from the flooding source is still served");
    f.state.denials().flush_blocking(false).unwrap();
    let growth = dir_bytes(f.audit_dir.path()) - before;
    assert!(growth < 64 << 10, "the trail grew by {growth} bytes");
    let total: u64 = trail(&f)
        .iter()
        .filter(|r| r.kind == "auth.denied")
        .map(|r| r.detail.as_ref().unwrap()["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 10_000, "every denied request is counted once");
}

/// Regression (tokenization blocked the async runtime): while eight prompts
/// that take 400 ms each to encode are in progress on a one-worker runtime,
/// `/health` (served by that worker, like every connection) keeps answering
/// within 50 ms.
#[test]
fn health_stays_fast_while_large_prompts_are_encoded() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let f = fixture();
    // The health checker runs first; the prompts arrive while it is running.
    let state = f.state.clone();
    let checker = rt.spawn(async move {
        let mut worst = Duration::ZERO;
        // Measured from when each check was due, so a worker that is busy
        // elsewhere shows as latency.
        for _ in 0..40 {
            let due = std::time::Instant::now() + Duration::from_millis(20);
            tokio::time::sleep_until(due.into()).await;
            let (s, _, _) = send(&state, "GET", "/health", None, None).await;
            assert_eq!(s, StatusCode::OK);
            worst = worst.max(due.elapsed());
        }
        worst
    });
    std::thread::sleep(Duration::from_millis(100));
    let slow = chat_body(json!({"messages": [{"role": "user", "content": "SLOW"}]}));
    let jobs: Vec<_> = (0..8)
        .map(|_| {
            let (state, key, body) = (f.state.clone(), f.inference.clone(), slow.clone());
            rt.spawn(async move { send(&state, "POST", "/v1/chat/completions", Some(&key), Some(&body)).await.0 })
        })
        .collect();
    let worst = rt.block_on(checker).unwrap();
    assert!(worst < Duration::from_millis(50), "/health took {worst:?} while prompts were encoded");
    for j in jobs {
        assert_eq!(rt.block_on(j).unwrap(), StatusCode::OK);
    }
}

/// A prompt that cannot fit is refused from its size, before it is encoded
/// (this one would panic the codec).
#[tokio::test]
async fn an_oversized_prompt_is_refused_before_tokenizing() {
    let f = fixture();
    let long = format!("PANIC{}", "x".repeat(200));
    let body = chat_body(json!({"messages": [{"role": "user", "content": long}]}));
    let (s, v, _) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": ["ok", long]})).unwrap();
    let (s, v, _) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}
