//! The policy's rules, checked at fixed instants (no sleeping).

use super::*;

fn limits(rpm: Option<u32>, tpm: Option<u64>, conc: Option<u32>) -> LimitSpec {
    LimitSpec { requests_per_minute: rpm, tokens_per_minute: tpm, concurrent_requests: conc, allowed_cidrs: None }
}

fn caller<'a>(principal: &'a str, limits: &'a LimitSpec, breaking_glass: bool) -> Caller<'a> {
    Caller { principal, limits, breaking_glass }
}

#[test]
fn concurrent_callers_get_exactly_the_per_minute_budget() {
    let policy = Policy::new(Duration::from_secs(60));
    let spec = limits(Some(60), None, None);
    let now = Instant::now();
    let served = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..20 {
                    if policy.admit_request(&caller("alice", &spec, false), None, now).is_ok() {
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(served.into_inner(), 60, "320 attempts in one instant: exactly the bucket");
    let refused = policy.admit_request(&caller("alice", &spec, false), None, now).unwrap_err();
    assert_eq!(refused.rule, PolicyRule::RequestsPerMinute);
    assert!((refused.retry_after.as_secs_f64() - 1.0).abs() < 0.01, "one request refills in a second");
    // Another principal has its own bucket; a second later one more is allowed.
    assert!(policy.admit_request(&caller("bob", &spec, false), None, now).is_ok());
    let later = now + Duration::from_secs(1);
    assert!(policy.admit_request(&caller("alice", &spec, false), None, later).is_ok());
    assert!(policy.admit_request(&caller("alice", &spec, false), None, later).is_err());
}

#[test]
fn tokens_are_charged_as_generated_and_debt_blocks_until_repaid() {
    let policy = Policy::new(Duration::from_secs(60));
    let spec = limits(None, Some(600), None);
    let now = Instant::now();
    let (slot, _) = policy.admit_inference(&caller("a", &spec, false), true, false, now).unwrap();
    slot.charge(500);
    // Credit left: a second request is admitted, and overdraws.
    let (slot2, _) = policy.admit_inference(&caller("a", &spec, false), true, false, now).unwrap();
    slot2.charge(400);
    drop((slot, slot2));
    let e = policy.admit_inference(&caller("a", &spec, false), true, false, Instant::now()).unwrap_err();
    let InferenceRefusal::Limit(r) = e else { panic!("expected a limit, got {e:?}") };
    assert_eq!(r.rule, PolicyRule::TokensPerMinute);
    // 300 in debt at 10 tokens/s: about 30 s.
    assert!(r.retry_after > Duration::from_secs(29) && r.retry_after < Duration::from_secs(31), "{r:?}");
}

#[test]
fn concurrency_slots_free_themselves_on_drop() {
    let policy = Policy::new(Duration::from_secs(60));
    let spec = limits(None, None, Some(2));
    let now = Instant::now();
    let a = policy.admit_inference(&caller("p", &spec, false), true, false, now).unwrap();
    let _b = policy.admit_inference(&caller("p", &spec, false), true, false, now).unwrap();
    let e = policy.admit_inference(&caller("p", &spec, false), true, false, now).unwrap_err();
    assert!(matches!(e, InferenceRefusal::Limit(PolicyRefusal { rule: PolicyRule::ConcurrentRequests, .. })));
    drop(a);
    assert!(policy.admit_inference(&caller("p", &spec, false), true, false, now).is_ok());
}

#[test]
fn source_networks_include_mapped_ipv4_and_refuse_unknown_peers() {
    let policy = Policy::new(Duration::from_secs(60));
    let spec = LimitSpec { allowed_cidrs: Some(vec!["10.1.0.0/16".parse().unwrap()]), ..LimitSpec::default() };
    let now = Instant::now();
    let ok = |ip: &str| policy.admit_request(&caller("n", &spec, false), Some(ip.parse().unwrap()), now).is_ok();
    assert!(ok("10.1.2.3"));
    assert!(ok("::ffff:10.1.2.3"));
    assert!(!ok("10.2.0.1"));
    assert!(!ok("fe80::1"));
    let e = policy.admit_request(&caller("n", &spec, false), None, now).unwrap_err();
    assert_eq!(e.rule, PolicyRule::SourceNetwork);
}

#[test]
fn break_glass_opens_a_window_that_overrides_every_rule_then_closes() {
    let window = Duration::from_secs(10);
    let policy = Policy::new(window);
    let spec = LimitSpec {
        requests_per_minute: Some(1),
        allowed_cidrs: Some(vec!["10.0.0.0/8".parse().unwrap()]),
        ..LimitSpec::default()
    };
    let now = Instant::now();
    let outside = Some("192.168.1.1".parse().unwrap());
    assert!(policy.admit_request(&caller("doc", &spec, false), outside, now).is_err());
    assert!(!policy.in_break_glass_window("doc", now));
    let opened = policy.admit_request(&caller("doc", &spec, true), outside, now).unwrap();
    assert_eq!(opened, Some(BreakGlassOpened { rule: PolicyRule::SourceNetwork, window }));
    assert!(policy.in_break_glass_window("doc", now));
    // Inside the window: served without the header, nothing new opened.
    for i in 1..5 {
        let t = now + Duration::from_secs(i);
        assert_eq!(policy.admit_request(&caller("doc", &spec, false), outside, t), Ok(None));
    }
    // No inference permission: a human inside the window is served; a service never.
    let t = now + Duration::from_secs(5);
    assert!(policy.admit_inference(&caller("doc", &spec, false), false, true, t).is_ok());
    assert_eq!(
        policy.admit_inference(&caller("svc", &spec, true), false, false, t).unwrap_err(),
        InferenceRefusal::NoPermission
    );
    // After the window the rules apply again.
    let after = now + window + Duration::from_secs(1);
    assert!(!policy.in_break_glass_window("doc", after));
    assert!(policy.admit_request(&caller("doc", &spec, false), outside, after).is_err());
}

#[test]
fn limits_combine_most_generously_and_fall_back_to_defaults() {
    let a = limits(Some(10), None, Some(1));
    let b = LimitSpec {
        requests_per_minute: Some(30),
        allowed_cidrs: Some(vec!["10.0.0.0/8".parse().unwrap()]),
        ..LimitSpec::default()
    };
    let c = LimitSpec::most_generous([&a, &b]);
    assert_eq!(c.requests_per_minute, Some(30));
    assert_eq!(c.concurrent_requests, Some(1));
    assert_eq!(c.allowed_cidrs.as_ref().map(Vec::len), Some(1));
    let full = c.or(&limits(Some(5), Some(1000), Some(9)));
    assert_eq!(
        (full.requests_per_minute, full.tokens_per_minute, full.concurrent_requests),
        (Some(30), Some(1000), Some(1))
    );
    assert!(limits(Some(0), None, None).validate().is_err());
    assert!(LimitSpec { allowed_cidrs: Some(vec![]), ..LimitSpec::default() }.validate().is_err());
}
