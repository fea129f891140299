//! The single libvirt event-loop thread.
//!
//! libvirt's default event implementation must be registered before any connection is opened
//! and can never be unregistered, so registration happens once per process. The loop runs
//! `virEventRunDefaultImpl` on one named thread; a periodic timeout wakes it so it notices a
//! stop request. The thread body is wrapped so a panic is reported, not silently lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A libvirt timer that is normally disabled (-1): [`stop`] arms it (0 = fire at once) to wake
/// the loop so it notices the stop request, and its callback disarms it again. An idle agent
/// therefore never wakes up for nothing (a periodic timer cost ~300 wakeups a minute).
static WAKE_TIMER: OnceLock<i32> = OnceLock::new();

static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();

fn set_wake_timer(ms: i32) {
    if let Some(id) = WAKE_TIMER.get() {
        virt::event::EventTimeoutWatch(*id).event_update_timeout(ms);
    }
}
static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

#[derive(Debug)]
struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    /// Agents using the loop; it stops when the last one releases it.
    users: usize,
}

/// Why the event loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("registering libvirt's default event implementation failed: {0}")]
    Register(String),
    #[error("adding the event-loop wake-up timer failed: {0}")]
    Timer(String),
    #[error("spawning the libvirt event-loop thread failed")]
    Spawn(#[source] std::io::Error),
}

/// Register the default event implementation (once per process) and make sure the loop thread
/// runs. Must be called before opening any connection. Each call must be paired with one
/// [`stop`]; the thread stops when the last user releases it.
pub fn ensure_running() -> Result<(), EventLoopError> {
    let registered = REGISTERED.get_or_init(|| {
        // libvirt prints every error to stderr by default; the agent logs what matters itself.
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
        let watch =
            virt::event::event_add_timeout(-1, |_, _| set_wake_timer(-1), std::ptr::null_mut())
                .map_err(|e| format!("timer: {e}"))?;
        let _ = WAKE_TIMER.set(watch.0);
        Ok(())
    });
    if let Err(e) = registered {
        return Err(if e.starts_with("timer: ") {
            EventLoopError::Timer(e.clone())
        } else {
            EventLoopError::Register(e.clone())
        });
    }
    let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = running.as_mut().filter(|r| !r.thread.is_finished()) {
        r.users += 1;
        return Ok(());
    }
    // A previous stop may have left the wake timer armed: disarm it for the new thread.
    set_wake_timer(-1);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(move || run(stop_flag))
        .map_err(EventLoopError::Spawn)?;
    *running = Some(Running {
        stop,
        thread,
        users: 1,
    });
    Ok(())
}

fn run(stop: Arc<AtomicBool>) {
    tracing::debug!("libvirt event loop started");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut last_error_log: Option<Instant> = None;
        while !stop.load(Ordering::Acquire) {
            if let Err(e) = virt::event::event_run_default_impl() {
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(error = %e, "libvirt event loop iteration failed");
                    last_error_log = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }));
    match result {
        Ok(()) => tracing::debug!("libvirt event loop stopped"),
        Err(_) => tracing::error!("libvirt event loop thread panicked; events stop until restart"),
    }
}

/// Release one use of the loop; the last release stops the thread and waits for it up to
/// `deadline`. Returns false if it did not stop in time (it is then left to die with the
/// process).
pub fn stop(deadline: Duration) -> bool {
    let running = {
        let mut guard = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(r) if r.users > 1 => {
                r.users -= 1;
                return true;
            }
            _ => guard.take(),
        }
    };
    let Some(running) = running else { return true };
    running.stop.store(true, Ordering::Release);
    set_wake_timer(0);
    let start = Instant::now();
    while !running.thread.is_finished() {
        if start.elapsed() > deadline {
            tracing::warn!("libvirt event loop did not stop within {deadline:?}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = running.thread.join();
    true
}

/// Whether the loop thread is alive (for health reporting).
pub fn is_running() -> bool {
    RUNNING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|r| !r.thread.is_finished())
}
