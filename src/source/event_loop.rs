//! The single libvirt event-loop thread, shared by every user through [`EventLoop`] guards.
//!
//! libvirt's default event implementation must be registered before any connection is opened
//! and can never be unregistered, so registration happens once per process. The loop runs
//! `virEventRunDefaultImpl` on one named thread; a timer, armed only to stop it, wakes it so it
//! notices. The thread body is wrapped so a panic is reported, not silently lost. [`acquire`]
//! returns a guard; the thread stops when the last guard is released (explicitly with
//! [`EventLoop::release`], which waits for the thread with a bound, or by dropping it, which does
//! not wait), so an error between acquiring and using the loop cannot leak a user.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A libvirt timer that is normally disabled (-1): stopping arms it (0 = fire at once) to wake
/// the loop so it notices the stop request, and its callback disarms it again. An idle agent
/// therefore never wakes up for nothing (a periodic timer cost ~300 wakeups a minute).
static WAKE_TIMER: OnceLock<i32> = OnceLock::new();

static REGISTERED: OnceLock<Result<(), Failed>> = OnceLock::new();

/// A libvirt timer that proves the loop thread still dispatches: disabled (-1) until a liveness
/// check asks for it ([`enable_heartbeat`]: the HTTP health endpoint or the systemd watchdog),
/// then it fires every [`HEARTBEAT_PERIOD`] on the loop thread and stamps [`LAST_BEAT`].
static HEARTBEAT_TIMER: OnceLock<i32> = OnceLock::new();
/// When the loop thread last ran the heartbeat timer, in milliseconds since [`EPOCH`].
static LAST_BEAT: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// How often the heartbeat timer fires once enabled.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(2);

fn millis_since_epoch() -> u64 {
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn beat() {
    LAST_BEAT.store(millis_since_epoch(), Ordering::Release);
}

/// A failed one-time registration, kept to report it to every later caller.
#[derive(Clone, Debug)]
enum Failed {
    Register(String),
    Timer(String),
}

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
    /// Live guards; the thread stops when the last one is released.
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

/// One user of the event loop. Released on drop (without waiting for the thread) or with
/// [`release`](Self::release).
#[derive(Debug)]
pub struct EventLoop {
    released: bool,
}

/// Register the default event implementation (once per process) and make sure the loop thread
/// runs. Must be called before opening any connection.
pub fn acquire() -> Result<EventLoop, EventLoopError> {
    let registered = REGISTERED.get_or_init(|| {
        // libvirt prints every error to stderr by default; the agent logs what matters itself.
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl().map_err(|e| Failed::Register(e.to_string()))?;
        let watch =
            virt::event::event_add_timeout(-1, |_, _| set_wake_timer(-1), std::ptr::null_mut())
                .map_err(|e| Failed::Timer(e.to_string()))?;
        let _ = WAKE_TIMER.set(watch.0);
        let heartbeat = virt::event::event_add_timeout(-1, |_, _| beat(), std::ptr::null_mut())
            .map_err(|e| Failed::Timer(e.to_string()))?;
        let _ = HEARTBEAT_TIMER.set(heartbeat.0);
        Ok(())
    });
    match registered {
        Ok(()) => {}
        Err(Failed::Register(e)) => return Err(EventLoopError::Register(e.clone())),
        Err(Failed::Timer(e)) => return Err(EventLoopError::Timer(e.clone())),
    }
    let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = running.as_mut().filter(|r| !r.thread.is_finished()) {
        r.users += 1;
        return Ok(EventLoop { released: false });
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
    Ok(EventLoop { released: false })
}

fn run(stop: Arc<AtomicBool>) {
    tracing::debug!("libvirt event loop started");
    beat();
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

impl EventLoop {
    /// Release this use of the loop; the last release stops the thread and waits for it up to
    /// `deadline` (blocking: call it off the async workers). Returns false if it did not stop in
    /// time (it is then left to die with the process).
    pub fn release(mut self, deadline: Duration) -> bool {
        self.released = true;
        match stop_thread() {
            Some(thread) => join_within(thread, deadline),
            None => true,
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if !self.released {
            // Not waited for: a drop may happen on an async worker.
            let _ = stop_thread();
        }
    }
}

/// Drop one user; when it was the last, ask the thread to stop and hand it back.
fn stop_thread() -> Option<JoinHandle<()>> {
    let running = {
        let mut guard = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(r) if r.users > 1 => {
                r.users -= 1;
                return None;
            }
            _ => guard.take(),
        }
    }?;
    running.stop.store(true, Ordering::Release);
    set_wake_timer(0);
    Some(running.thread)
}

fn join_within(thread: JoinHandle<()>, deadline: Duration) -> bool {
    let start = Instant::now();
    while !thread.is_finished() {
        if start.elapsed() > deadline {
            tracing::warn!("libvirt event loop did not stop within {deadline:?}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = thread.join();
    true
}

/// Make the loop thread stamp a heartbeat every [`HEARTBEAT_PERIOD`] (see [`is_alive`]). Once
/// enabled it stays on for the process; only liveness checks need it.
pub fn enable_heartbeat() {
    if let Some(id) = HEARTBEAT_TIMER.get() {
        let ms = i32::try_from(HEARTBEAT_PERIOD.as_millis()).unwrap_or(i32::MAX);
        virt::event::EventTimeoutWatch(*id).event_update_timeout(ms);
    }
}

/// Whether the loop thread is alive and, with the heartbeat enabled, has dispatched its timer
/// within `stale` (a thread stuck inside a libvirt callback is alive but not dispatching).
pub fn is_alive(stale: Duration) -> bool {
    if !is_running() {
        return false;
    }
    let last = LAST_BEAT.load(Ordering::Acquire);
    let age = millis_since_epoch().saturating_sub(last);
    u128::from(age) <= stale.as_millis()
}

/// Whether the loop thread is alive (for health reporting).
pub fn is_running() -> bool {
    RUNNING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|r| !r.thread.is_finished())
}
