//! The HTTP health endpoint for a kubelet's probes (`health.listen`, off by default).
//!
//! * `GET /livez`: 200 while the agent's loops answer, 503 once they do not. A heartbeat task on
//!   the async runtime stamps [`Health::beat`] every [`BEAT_PERIOD`], and only while the libvirt
//!   event loop thread still dispatches its own heartbeat timer
//!   ([`crate::source::event_loop::is_alive`]); the endpoint answers 503 when the last stamp is
//!   older than [`STALE_AFTER`]. This is the same condition the systemd watchdog ping is sent on
//!   (src/agent/mod.rs). A stopped process (SIGSTOP) answers nothing at all, which the probe also
//!   counts as a failure.
//! * `GET /readyz`: 200 once the first sync of every configured connection is done (the moment
//!   the agent sends systemd `READY=1`), 503 before.
//!
//! Anything else is 404 (or 405 for a method other than GET/HEAD). The server is hyper's HTTP/1
//! connection driver on the agent's runtime; it is one of the agent's helper tasks and stops with
//! them. Connections are few (a probe every few seconds): at most [`MAX_CONNECTIONS`] are served
//! at once, each for at most [`CONNECTION_LIMIT`].

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tasks::{drain_by, StopSignal};
use http::{Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::source::event_loop;

/// How often the heartbeat task stamps.
pub const BEAT_PERIOD: Duration = Duration::from_secs(1);
/// `/livez` fails once the last stamp is older than this (several missed beats, and several of
/// the event loop's own heartbeat periods).
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Bound on one connection (a probe sends one request and closes).
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// Readiness and the heartbeat, shared by the agent's tasks and the endpoint.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    ready: AtomicBool,
    /// Milliseconds since `epoch` of the last heartbeat.
    last_beat: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not ready; live (the heartbeat starts fresh).
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            ready: AtomicBool::new(false),
            last_beat: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The first sync is done.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The loops answered just now.
    pub fn beat(&self) {
        self.last_beat.store(self.now_ms(), Ordering::Release);
    }

    /// Whether the last beat is at most `stale` old.
    pub fn is_live_within(&self, stale: Duration) -> bool {
        let age = self
            .now_ms()
            .saturating_sub(self.last_beat.load(Ordering::Acquire));
        u128::from(age) <= stale.as_millis()
    }

    pub fn is_live(&self) -> bool {
        self.is_live_within(STALE_AFTER)
    }
}

/// Whether the agent's loops are alive, as both the health endpoint and the systemd watchdog
/// judge it: the libvirt event loop thread dispatched its heartbeat timer recently. (The async
/// side proves itself by running the task that asks.)
pub fn loops_alive() -> bool {
    event_loop::is_alive(STALE_AFTER)
}

/// Stamp `health` every [`BEAT_PERIOD`] while [`loops_alive`], until `stop` says stop.
pub async fn heartbeat(health: Arc<Health>, mut stop: StopSignal) {
    event_loop::enable_heartbeat();
    let mut tick = tokio::time::interval(BEAT_PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if loops_alive() {
                    health.beat();
                }
            }
            _ = stop.stopped() => return,
        }
    }
}

/// The answer to one request.
pub fn respond<B>(health: &Health, req: &Request<B>) -> Response<String> {
    let (status, body) = if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
    } else {
        match req.uri().path() {
            "/livez" if health.is_live() => (StatusCode::OK, "ok\n"),
            "/livez" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent's loops stopped answering\n",
            ),
            "/readyz" if health.is_ready() => (StatusCode::OK, "ok\n"),
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the first sync is not done yet\n",
            ),
            _ => (StatusCode::NOT_FOUND, "GET /livez or /readyz\n"),
        }
    };
    let mut response = Response::new(body.to_string());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serve `listener` until `stop` says stop; then close every open connection.
pub async fn serve(listener: TcpListener, health: Arc<Health>, mut stop: StopSignal) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "health endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                let health = Arc::clone(&health);
                conns.spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let response = respond(&health, &req);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(CONNECTION_LIMIT / 2)
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.stopped() => break,
        }
    }
    drain_by(&mut conns, std::time::Instant::now()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        let mut req = Request::new(());
        *req.uri_mut() = path.parse().expect("a valid path");
        req
    }

    #[test]
    fn readiness_follows_the_first_sync() {
        let h = Health::new();
        assert_eq!(
            respond(&h, &get("/readyz")).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.set_ready();
        assert_eq!(respond(&h, &get("/readyz")).status(), StatusCode::OK);
    }

    #[test]
    fn liveness_follows_the_heartbeat() {
        let h = Health::new();
        h.beat();
        assert_eq!(respond(&h, &get("/livez")).status(), StatusCode::OK);
        assert!(h.is_live_within(Duration::from_secs(3600)));
        // A beat older than the bound: no sleeping, the bound is zero and time has moved on.
        h.last_beat.store(0, Ordering::Release);
        std::thread::sleep(Duration::from_millis(2));
        assert!(!h.is_live_within(Duration::ZERO));
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let h = Health::new();
        assert_eq!(respond(&h, &get("/")).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&h, &get("/metrics")).status(),
            StatusCode::NOT_FOUND
        );
        let mut post = get("/livez");
        *post.method_mut() = Method::POST;
        assert_eq!(respond(&h, &post).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
