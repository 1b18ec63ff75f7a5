//! Retrying what may pass: connection errors, timeouts, 5xx, 429 and malformed answers are
//! tried again after an exponentially growing, jittered wait (or the server's `Retry-After`,
//! within a cap), until the attempts or the time budget run out. Nothing waits without
//! bound: the whole of one call takes at most the budget plus one request's timeout.

use std::time::{Duration, Instant, SystemTime};

use super::RemoteError;

/// How often and how long to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// Wait before the first retry; each further wait doubles, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured; a server asking for more waits this long.
    pub max_retry_after: Duration,
    /// No retry starts after this much time has passed since the first attempt.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(10),
            budget: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first retry), before jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.first_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// What one attempt can end in, besides success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth another try: the reason, and how long the server asked us to wait.
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
    /// Final: retrying cannot help.
    Stop(RemoteError),
}

impl Failure {
    pub fn retry(why: impl Into<String>) -> Self {
        Failure::Retry {
            why: why.into(),
            retry_after: None,
        }
    }

    pub fn refused(why: impl Into<String>) -> Self {
        Failure::Stop(RemoteError::Refused(why.into()))
    }
}

impl From<RemoteError> for Failure {
    fn from(e: RemoteError) -> Self {
        Failure::Stop(e)
    }
}

/// Time as retries see it: the real clock in the stores, a fake one in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// Run `attempt` until it succeeds, fails for good, or the policy's attempts or budget are
/// spent; the last failure then becomes [`RemoteError::Transient`], naming `what` was tried.
pub fn run<T>(
    policy: &RetryPolicy,
    clock: &dyn Clock,
    what: &str,
    mut attempt: impl FnMut() -> Result<T, Failure>,
) -> Result<T, RemoteError> {
    let start = clock.now();
    let deadline = start + policy.budget;
    let mut jitter = Jitter::new();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let (why, retry_after) = match attempt() {
            Ok(v) => return Ok(v),
            Err(Failure::Stop(e)) => return Err(e),
            Err(Failure::Retry { why, retry_after }) => (why, retry_after),
        };
        let give_up = |extra: &str| {
            RemoteError::Transient(format!(
                "{what}: {why} (gave up after {tries} attempt{} in {:.1} s{extra})",
                if tries == 1 { "" } else { "s" },
                clock.now().duration_since(start).as_secs_f64()
            ))
        };
        if tries >= policy.attempts.max(1) {
            return Err(give_up(""));
        }
        // Full backoff halved at random: retries of many clients spread out.
        let backoff = policy
            .backoff(tries - 1)
            .mul_f64(jitter.next_between(0.5, 1.0));
        let wait = match retry_after {
            Some(asked) => backoff.max(asked.min(policy.max_retry_after)),
            None => backoff,
        };
        if clock.now() + wait > deadline {
            let extra = match retry_after {
                Some(asked) => format!("; the server asked to wait {} s", asked.as_secs()),
                None => String::new(),
            };
            return Err(give_up(&extra));
        }
        tracing::debug!("{what}: {why}; retrying in {wait:?}");
        clock.sleep(wait);
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP date, relative to `now`. `None` when it
/// is neither (the header is then ignored, as RFC 9110 allows).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A small random number source for jitter (xorshift, seeded from the process's
/// randomly keyed hasher): no dependency, and no two threads in step.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Jitter(h.finish() | 1)
    }

    fn next_between(&mut self, lo: f64, hi: f64) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        lo + (hi - lo) * ((x >> 11) as f64 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock that only moves when slept on, recording every sleep.
    pub(crate) struct FakeClock {
        start: Instant,
        state: Mutex<(Duration, Vec<Duration>)>,
    }

    impl FakeClock {
        pub(crate) fn new() -> Self {
            FakeClock {
                start: Instant::now(),
                state: Mutex::new((Duration::ZERO, Vec::new())),
            }
        }
        pub(crate) fn sleeps(&self) -> Vec<Duration> {
            self.state.lock().unwrap().1.clone()
        }
        /// Let time pass without a sleep (an attempt that took this long).
        pub(crate) fn advance(&self, d: Duration) {
            self.state.lock().unwrap().0 += d;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.state.lock().unwrap().0
        }
        fn sleep(&self, d: Duration) {
            let mut s = self.state.lock().unwrap();
            s.0 += d;
            s.1.push(d);
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            max_retry_after: Duration::from_secs(3),
            budget: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = policy();
        let waits: Vec<_> = (0..5).map(|r| p.backoff(r).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 400, 400]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(400));
    }

    #[test]
    fn transient_failures_are_retried_with_jittered_growing_waits() {
        let clock = FakeClock::new();
        let mut calls = 0;
        let got = run(&policy(), &clock, "GET x", || {
            calls += 1;
            if calls < 4 {
                Err(Failure::retry("connection reset"))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(got, Ok(4));
        let sleeps = clock.sleeps();
        assert_eq!(sleeps.len(), 3);
        for (i, (s, full)) in sleeps.iter().zip([100u64, 200, 400]).enumerate() {
            let ms = s.as_millis() as u64;
            assert!(
                ms >= full / 2 && ms <= full,
                "wait {i}: {ms} ms, full {full}"
            );
        }
    }

    #[test]
    fn attempts_run_out_into_a_transient_error_naming_the_last_failure() {
        let clock = FakeClock::new();
        let mut calls = 0;
        let got: Result<(), _> = run(&policy(), &clock, "GET x", || {
            calls += 1;
            Err(Failure::retry(format!("503 #{calls}")))
        });
        assert_eq!(calls, 5);
        match got {
            Err(RemoteError::Transient(m)) => {
                assert!(
                    m.starts_with("GET x: 503 #5 (gave up after 5 attempts"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(clock.sleeps().len(), 4);
    }

    #[test]
    fn final_failures_are_not_retried() {
        let clock = FakeClock::new();
        let mut calls = 0;
        let got: Result<(), _> = run(&policy(), &clock, "GET x", || {
            calls += 1;
            Err(Failure::refused("404 not found"))
        });
        assert_eq!(got, Err(RemoteError::Refused("404 not found".into())));
        assert_eq!(calls, 1);
        assert!(clock.sleeps().is_empty());
    }

    #[test]
    fn retry_after_is_honoured_within_its_cap() {
        let clock = FakeClock::new();
        let mut calls = 0;
        let asked = [Duration::from_secs(2), Duration::from_secs(60)];
        let got = run(&policy(), &clock, "GET x", || {
            calls += 1;
            match asked.get(calls - 1) {
                Some(&d) => Err(Failure::Retry {
                    why: "429".into(),
                    retry_after: Some(d),
                }),
                None => Ok(()),
            }
        });
        assert_eq!(got, Ok(()));
        assert_eq!(
            clock.sleeps(),
            [Duration::from_secs(2), Duration::from_secs(3)]
        );
    }

    #[test]
    fn the_budget_stops_retries_that_would_end_past_it() {
        let clock = FakeClock::new();
        let p = RetryPolicy {
            attempts: 100,
            budget: Duration::from_secs(5),
            ..policy()
        };
        let mut calls = 0;
        let got: Result<(), _> = run(&p, &clock, "GET x", || {
            calls += 1;
            // Each attempt times out after two seconds.
            clock.advance(Duration::from_secs(2));
            Err(Failure::Retry {
                why: "timed out".into(),
                retry_after: Some(Duration::from_secs(1)),
            })
        });
        assert!(
            matches!(got, Err(RemoteError::Transient(ref m)) if m.contains("server asked to wait 1 s")),
            "{got:?}"
        );
        // 2 s, wait 1, 2 s (at 5 s), a wait would end past the budget.
        assert_eq!(calls, 2);
        assert!(clock.now() - clock.start <= Duration::from_secs(5));
    }

    #[test]
    fn retry_after_takes_seconds_or_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        // 2015-10-21 07:28:00 GMT is `now`; 07:28:30 is thirty seconds later.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
