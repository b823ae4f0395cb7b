//! Every fuzz target over its checked-in corpus, then over generated inputs (raw bytes, mutated seeds,
//! structured documents). Bounded for `make test`: `UNDERLAY_FUZZ_CASES` cases per target (default 2,000).
//! `make fuzz` without cargo-fuzz runs the same generation for `UNDERLAY_FUZZ_SECONDS` per target instead.
//! A failure prints the target, the input (shrunk) and how to replay it; docs/fuzzing.md says how to turn it
//! into a regression test.

use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use underlay_fuzz::{TARGETS, Target, corpus, generate};

#[test]
fn every_target_has_a_corpus_and_runs_it_clean() {
    for t in TARGETS {
        let files = corpus(t.name);
        assert!(
            !files.is_empty(),
            "fuzz/corpus/{}/ is empty: every target needs seeds",
            t.name
        );
        for (file, bytes) in files {
            eprintln!("{}: {file}", t.name);
            (t.run)(&bytes);
        }
    }
}

/// An input shown as an escaped byte string, so that a failure can be read and pasted into a test.
struct Input(Vec<u8>);

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `cases` generated inputs through `t`, seeded by `seed`. Panics with the shrunk input on failure.
fn generate_batch(t: &Target, cases: u32, seed: u64) {
    let seeds: Vec<Vec<u8>> = corpus(t.name).into_iter().map(|(_, b)| b).collect();
    let strategy = generate::input(t.name, seeds).prop_map(Input);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 2_000,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let run = t.run;
    if let Err(e) = runner.run(&strategy, move |input| {
        run(&input.0);
        Ok(())
    }) {
        panic!(
            "fuzz target {} failed (seed {seed}): {e}\nreplay: save the input bytes above to fuzz/corpus/{}/<case> \
             and run `cargo test -p underlay-fuzz --test fuzz`",
            t.name, t.name
        );
    }
}

#[test]
fn generated_inputs_never_panic() {
    let seconds = env_u64("UNDERLAY_FUZZ_SECONDS");
    let cases = env_u64("UNDERLAY_FUZZ_CASES").unwrap_or(2_000) as u32;
    let only = std::env::var("UNDERLAY_FUZZ_TARGET").ok();
    for t in TARGETS
        .iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.name))
    {
        let started = Instant::now();
        let mut total: u64 = 0;
        let mut seed: u64 = env_u64("UNDERLAY_FUZZ_SEED").unwrap_or(0);
        match seconds {
            None => {
                generate_batch(t, cases, seed);
                total += u64::from(cases);
            }
            Some(s) => {
                let deadline = started + Duration::from_secs(s);
                while Instant::now() < deadline {
                    generate_batch(t, 1_000, seed);
                    total += 1_000;
                    seed += 1;
                }
            }
        }
        eprintln!(
            "{}: {total} generated cases in {:.1} s, no failure",
            t.name,
            started.elapsed().as_secs_f64()
        );
    }
}
