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

/// A thread that runs until its [`Stop`] is triggered: each signal's
/// worker. [`StoppableThread::stop`] waits for it by a deadline; dropping it
/// stops it and waits for it (errors and panics unwinding included).
#[derive(Debug)]
pub struct StoppableThread {
    stop: Stop,
    handle: Option<JoinHandle<()>>,
    /// What the log lines name.
    what: &'static str,
}

impl StoppableThread {
    /// Starts `run` on a thread named `name` with the stop it must watch.
    pub fn spawn(
        name: &str,
        what: &'static str,
        run: impl FnOnce(Stop) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Stop::new();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(flag))?;
        Ok(Self {
            stop,
            handle: Some(handle),
            what,
        })
    }

    /// Asks the thread to stop and waits until `deadline`; false (and a log
    /// line) when it is still running then: it is left behind, and the
    /// process exit ends it.
    pub fn stop(mut self, deadline: Instant) -> bool {
        self.stop.trigger();
        let Some(handle) = self.handle.take() else {
            return true;
        };
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    "{}: not stopped by the shutdown deadline, leaving it",
                    self.what
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if handle.join().is_err() {
            tracing::error!("{}: its thread panicked", self.what);
        }
        true
    }

    /// Waits for a thread that ends on its own (it failed to start).
    pub fn join(mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for StoppableThread {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
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
