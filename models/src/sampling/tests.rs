//! Tests of the sampler (a child module of `sampling`).

use super::*;

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}

fn logits() -> Vec<f32> {
    // Token 3 best, then 1, then 7; many low-probability tokens.
    let mut l = vec![-2.0f32; 1000];
    l[3] = 5.0;
    l[1] = 4.5;
    l[7] = 4.0;
    l
}

#[test]
fn fast_exp_is_accurate() {
    let mut x = 0.0f32;
    while x > -87.0 {
        let want = (x as f64).exp();
        let got = exp_nonpositive(x) as f64;
        assert!(((got - want) / want).abs() < 3e-7, "x={x}: {got} vs {want}");
        x -= 0.0137;
    }
    assert_eq!(exp_nonpositive(0.0), 1.0);
    assert_eq!(exp_nonpositive(-100.0), 0.0);
    assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
}

#[test]
fn greedy_picks_argmax_and_lowest_id_on_ties() {
    let mut s = Sampler::new(SamplingParams::greedy(), 1000).unwrap();
    assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 3);
    let mut tie = vec![0.0f32; 10];
    tie[4] = 2.0;
    tie[8] = 2.0;
    let mut s = Sampler::new(SamplingParams::greedy(), 10).unwrap();
    assert_eq!(s.sample(&tie, &[], 0).unwrap().token, 4);
}

#[test]
fn same_seed_same_sequence_different_seed_differs() {
    let l: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 / 30.0).collect();
    let run = |seed| {
        let mut s = Sampler::new(params(|p| p.seed = Some(seed)), 500).unwrap();
        (0..64).map(|_| s.sample(&l, &[], 0).unwrap().token).collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

/// The greedy path (vector max, then the first index holding it) picks what
/// the plain argmax picks: ties → lowest id, NaN never, `-inf` only if all
/// are; and no log-probability is computed unless asked for.
#[test]
fn greedy_token_equals_the_plain_argmax() {
    let mut seed = 0x2545_F491u32;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for case in 0..300 {
        let n = 1 + (next() as usize % 1000);
        // Few distinct values, so ties are common.
        let mut l: Vec<f32> = (0..n).map(|_| (next() % 7) as f32 - 3.0).collect();
        match case % 4 {
            0 => l[next() as usize % n] = f32::NAN,
            1 => l.iter_mut().take(n / 2).for_each(|x| *x = f32::NEG_INFINITY),
            2 => l[n - 1] = 3.0,
            _ => {}
        }
        let mut s = Sampler::new(params(|p| p.temperature = 0.0), n).unwrap();
        let out = s.sample(&l, &[], 0).unwrap();
        let clean: Vec<f32> = l.iter().map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }).collect();
        assert_eq!(out.token, argmax(&clean), "case {case}");
        assert_eq!(out.logprob, None);
    }
}

#[test]
fn top_k_one_equals_greedy() {
    let l: Vec<f32> = (0..300).map(|i| ((i * 13) % 17) as f32 + i as f32 * 1e-3).collect();
    let expected = argmax(&l);
    let mut s = Sampler::new(
        params(|p| {
            p.top_k = 1;
            p.seed = Some(1);
            p.temperature = 2.0;
        }),
        300,
    )
    .unwrap();
    for _ in 0..50 {
        assert_eq!(s.sample(&l, &[], 0).unwrap().token, expected);
    }
}

#[test]
fn top_k_restricts_to_the_k_best() {
    let mut s = Sampler::new(
        params(|p| {
            p.top_k = 3;
            p.seed = Some(5);
            p.temperature = 2.0;
        }),
        1000,
    )
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        seen.insert(s.sample(&logits(), &[], 0).unwrap().token);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 3, 7]);
}

#[test]
fn small_top_p_keeps_only_the_top_token() {
    // Also exercises the partial-sort path (1000 > PARTIAL_SORT candidates).
    let mut s = Sampler::new(
        params(|p| {
            p.top_p = 0.05;
            p.seed = Some(9);
        }),
        1000,
    )
    .unwrap();
    for _ in 0..100 {
        assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 3);
    }
    // top_p = 0.9 over nearly uniform logits needs the full-sort fallback and
    // must still draw many different tokens.
    let flat: Vec<f32> = (0..1000).map(|i| (i % 3) as f32 * 1e-3).collect();
    let mut s = Sampler::new(
        params(|p| {
            p.top_p = 0.9;
            p.seed = Some(9);
        }),
        1000,
    )
    .unwrap();
    let distinct: std::collections::BTreeSet<u32> = (0..200).map(|_| s.sample(&flat, &[], 0).unwrap().token).collect();
    assert!(distinct.len() > 100, "{}", distinct.len());
}

#[test]
fn min_p_drops_unlikely_tokens() {
    // Probabilities relative to the best: token 1 ≈ e^-0.5 ≈ 0.61, token 7 ≈ e^-1 ≈ 0.37, others ≈ e^-7.
    let mut s = Sampler::new(
        params(|p| {
            p.min_p = 0.5;
            p.seed = Some(3);
        }),
        1000,
    )
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        seen.insert(s.sample(&logits(), &[], 0).unwrap().token);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 3]);
}

#[test]
fn logit_bias_minus_100_bans_a_token_and_plus_boosts() {
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.0;
            p.logit_bias = vec![(3, -100.0)];
        }),
        1000,
    )
    .unwrap();
    assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 1);
    let mut s = Sampler::new(
        params(|p| {
            p.seed = Some(2);
            p.logit_bias = vec![(3, -100.0)];
        }),
        1000,
    )
    .unwrap();
    for _ in 0..200 {
        assert_ne!(s.sample(&logits(), &[], 0).unwrap().token, 3);
    }
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.0;
            p.logit_bias = vec![(500, 10.0)];
        }),
        1000,
    )
    .unwrap();
    assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 500);
}

#[test]
fn repetition_penalty_uses_prompt_and_generated_tokens() {
    // 5.0 / 1.2 = 4.17 < 4.5: token 3 seen in the prompt loses to token 1.
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 1.2;
        }),
        1000,
    )
    .unwrap();
    assert_eq!(s.sample(&logits(), &[3, 3, 9], 3).unwrap().token, 1);
    // Negative logits are multiplied (made more negative).
    let mut l = vec![-1.0f32; 4];
    l[0] = -0.5;
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 3.0;
        }),
        4,
    )
    .unwrap();
    assert_eq!(s.sample(&l, &[0], 1).unwrap().token, 1);
}

#[test]
fn presence_and_frequency_penalties_use_generated_tokens_only() {
    let greedy = |f: &dyn Fn(&mut SamplingParams), ctx: &[u32], prompt_len: usize| {
        let mut p = SamplingParams::greedy();
        f(&mut p);
        Sampler::new(p, 1000).unwrap().sample(&logits(), ctx, prompt_len).unwrap().token
    };
    // Token 3 only in the prompt: no presence penalty.
    assert_eq!(greedy(&|p| p.presence_penalty = 1.0, &[3], 1), 3);
    // Token 3 generated once: 5.0 - 1.0 = 4.0 < 4.5 → token 1.
    assert_eq!(greedy(&|p| p.presence_penalty = 1.0, &[3], 0), 1);
    // Frequency: once generated 5.0 - 0.4 = 4.6 still wins; twice 4.2 loses.
    assert_eq!(greedy(&|p| p.frequency_penalty = 0.4, &[9, 3], 1), 3);
    assert_eq!(greedy(&|p| p.frequency_penalty = 0.4, &[9, 3, 3], 1), 1);
    // Negative presence penalty encourages repetition.
    assert_eq!(greedy(&|p| p.presence_penalty = -2.0, &[7], 0), 7);
}

#[test]
fn logprobs_are_a_normalized_log_softmax() {
    let l = logits();
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.0;
            p.top_logprobs = Some(5);
        }),
        1000,
    )
    .unwrap();
    let out = s.sample(&l, &[], 0).unwrap();
    let logprob = out.logprob.expect("requested");
    let max = 5.0f32;
    // Reference normalizer in f64 (a running f32 sum of 1000 terms drifts by ~1e-5).
    let z = (l.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() + max as f64) as f32;
    assert!((logprob - (5.0 - z)).abs() < 5e-6, "{} vs {}", logprob, 5.0 - z);
    assert_eq!(out.top_logprobs.len(), 5);
    assert_eq!(out.top_logprobs[0], (3, logprob));
    assert_eq!(out.top_logprobs[1].0, 1);
    assert_eq!(out.top_logprobs[2].0, 7);
    // Ties among the -2.0 tokens resolve to the lowest ids.
    assert_eq!(out.top_logprobs[3].0, 0);
    assert_eq!(out.top_logprobs[4].0, 2);
    // The full distribution sums to one.
    let mut s = Sampler::new(params(|p| p.top_logprobs = Some(20)), 20).unwrap();
    let small: Vec<f32> = (0..20).map(|i| i as f32 * 0.3).collect();
    let out = s.sample(&small, &[], 0).unwrap();
    let total: f32 = out.top_logprobs.iter().map(|&(_, lp)| lp.exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "{total}");
    // Logprobs do not depend on temperature or truncation.
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.3;
            p.top_k = 1;
            p.top_logprobs = Some(1);
        }),
        20,
    )
    .unwrap();
    let hot = s.sample(&small, &[], 0).unwrap();
    assert_eq!(hot.token, 19);
    assert!((hot.logprob.unwrap() - out.top_logprobs[0].1).abs() < 1e-6);
}

#[test]
fn validation_names_the_parameter() {
    let check = |f: &dyn Fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        match p.validate(100) {
            Err(ModelError::InvalidSampling { param, .. }) => param,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    assert_eq!(check(&|p| p.temperature = 2.5), "temperature");
    assert_eq!(check(&|p| p.temperature = f32::NAN), "temperature");
    assert_eq!(check(&|p| p.top_p = 0.0), "top_p");
    assert_eq!(check(&|p| p.min_p = 1.5), "min_p");
    assert_eq!(check(&|p| p.presence_penalty = 2.5), "presence_penalty");
    assert_eq!(check(&|p| p.frequency_penalty = -3.0), "frequency_penalty");
    assert_eq!(check(&|p| p.repetition_penalty = 0.0), "repetition_penalty");
    assert_eq!(check(&|p| p.logit_bias = vec![(1, 101.0)]), "logit_bias");
    assert_eq!(check(&|p| p.logit_bias = vec![(100, 1.0)]), "logit_bias");
    assert_eq!(check(&|p| p.top_logprobs = Some(21)), "top_logprobs");
    assert!(SamplingParams::default().validate(100).is_ok());
    assert!(Sampler::new(SamplingParams::default(), 0).is_err());
}

#[test]
fn bad_logits_are_errors_not_panics() {
    let mut s = Sampler::new(SamplingParams::default(), 10).unwrap();
    assert!(s.sample(&[0.0; 9], &[], 0).is_err());
    assert!(s.sample(&[f32::NAN; 10], &[], 0).is_err());
    assert!(s.sample(&[0.0; 10], &[1], 2).is_err());
    // Out-of-vocabulary context ids are ignored by the penalties.
    let mut s = Sampler::new(params(|p| p.repetition_penalty = 1.5), 10).unwrap();
    assert!(s.sample(&[0.0; 10], &[99], 0).is_ok());
}

/// The plain argmax loop, the oracle for the greedy path: index of the largest
/// value; ties → lowest index; NaN never wins.
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best_v = x;
            best = i;
        }
    }
    best as u32
}

#[test]
fn token_rank_counts_the_strictly_more_likely_tokens() {
    let logits = [0.5, 2.0, f32::NAN, 2.0, -1.0];
    assert_eq!(token_rank(&logits, 1), 1);
    assert_eq!(token_rank(&logits, 3), 1, "ties share a rank");
    assert_eq!(token_rank(&logits, 0), 3);
    assert_eq!(token_rank(&logits, 4), 4);
    assert_eq!(token_rank(&logits, 2), 5, "NaN counts as -inf");
    assert_eq!(token_rank(&logits, 9), 6, "an id past the vocabulary ranks last");
}
