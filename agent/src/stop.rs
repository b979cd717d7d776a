//! One way to ask a running part of the agent to stop: a flag behind a
//! condition variable, so a loop that sleeps between its tasks wakes at
//! once instead of at its next tick.
use std::{
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A stop request that sleeping loops wake up for.
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<(Mutex<bool>, Condvar)>);

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        let (flag, cv) = &*self.0;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps up to `timeout`; true when stopped.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (flag, cv) = &*self.0;
        let guard = flag.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// Waits for a stopping thread until `deadline`; false (and a log line
/// naming `what`) when it is still running then: it is left behind, and
/// the process exit ends it.
pub fn join_by<T>(handle: Option<JoinHandle<T>>, deadline: Instant, what: &str) -> bool {
    let Some(handle) = handle else {
        return true;
    };
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!("{what}: not stopped by the shutdown deadline, leaving it");
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if handle.join().is_err() {
        tracing::error!("{what}: its thread panicked");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_wakes_waiters() {
        let stop = Stop::new();
        let waiter = stop.clone();
        let t = std::thread::spawn(move || waiter.wait(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        stop.trigger();
        assert!(t.join().unwrap());
        assert!(stop.wait(Duration::from_secs(30)));
        assert!(!Stop::new().wait(Duration::from_millis(1)));
    }
}
