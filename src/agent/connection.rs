//! One task per libvirt connection: connect (read-only, callbacks before listing), resync,
//! apply events, fetch XML, and reconnect with backoff when lost.
//!
//! A connection's life is a small state machine ([`State`], advanced by [`Connection::step`]):
//! `Connecting` → `Up` (a [`Session`]: one open connection and every task working on it) →
//! `Lost` → `Backoff` → `Connecting` …, and `Stopping` from any state once asked to stop. Every
//! task of a session (its resync, its fetches) lives in the session's `JoinSet`: closing a session
//! ends them all before the connection is released, and the release (deregistration and close,
//! both RPCs) runs on a blocking thread, bounded by the stop deadline. Every libvirt call goes
//! through [`Calls`] (permit, timeout, stop).
//!
//! While a connection is down its domains stay exported (QEMU outlives libvirtd restarts); the
//! resync after reconnecting corrects whatever changed meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinSet};

use super::call::{CallError, Calls};
use super::Shared;
use crate::ffi::libvirt::{DomainHandle, Watched};
use crate::inventory::{ConnId, DomainRef, FetchOutcome, FetchRequest, Lifecycle};
use crate::source::libvirt::{self, Fetched};
use crate::source::{Feeds, SourceEvent};
use crate::tasks::{drain_by, Stop, StopSignal};

/// What a connection task is given.
#[derive(Clone, Debug)]
pub struct ConnSpec {
    pub id: ConnId,
    /// How the connection is named in logs and the `connection` attribute (for a launcher
    /// socket: its real path, while `uri` may use a short `/proc/self/fd` alias).
    pub label: String,
    pub uri: String,
    /// Tried when `uri` cannot be opened (a launcher socket answering the system form).
    pub fallback_uri: Option<String>,
    /// KubeVirt pod UID of a discovered launcher socket.
    pub pod_uid: Option<String>,
}

/// What every task of a connection shares, across reconnects.
#[derive(Debug)]
struct ConnCtx {
    shared: Arc<Shared>,
    spec: ConnSpec,
    calls: Calls,
}

/// A connection's life.
enum State {
    /// About to open the connection; `failures` attempts of this outage failed so far.
    Connecting { failures: u32 },
    /// Waiting before the next attempt.
    Backoff { failures: u32, delay: Duration },
    /// Open, events flowing.
    Up(Session),
    /// The daemon went away or stopped answering: close, then reconnect.
    Lost(Session),
    /// Asked to stop: close what is open, then end.
    Stopping(Option<Session>),
}

/// How serving an open connection ended.
enum Ended {
    Lost,
    Stop,
}

/// What a session's task produced.
enum Done {
    /// A resync finished (`ok`) or failed; listed domains still to be read.
    Resync {
        fetches: Vec<FetchRequest>,
        ok: bool,
    },
    Fetch,
}

/// One open connection and every task working on it.
struct Session {
    watched: Arc<Watched>,
    feeds: Feeds,
    tasks: JoinSet<Done>,
    /// The running resync task, if any (one at a time).
    resync: Option<tokio::task::Id>,
    /// Another resync is due once the running one ends (events were dropped meanwhile).
    resync_again: bool,
}

impl Session {
    fn new(watched: Arc<Watched>, feeds: Feeds) -> Self {
        Self {
            watched,
            feeds,
            tasks: JoinSet::new(),
            resync: None,
            resync_again: false,
        }
    }

    fn start_resync(&mut self, ctx: &Arc<ConnCtx>) {
        let task = resync(Arc::clone(ctx), Arc::clone(&self.watched));
        self.resync = Some(self.tasks.spawn(task).id());
    }

    /// Resync now, or right after the running resync (which may have listed before the change).
    fn want_resync(&mut self, ctx: &Arc<ConnCtx>) {
        if self.resync.is_none() {
            self.start_resync(ctx);
        } else {
            self.resync_again = true;
        }
    }

    fn spawn_fetch(&mut self, ctx: &Arc<ConnCtx>, req: FetchRequest, handle: Option<DomainHandle>) {
        let (ctx, watched) = (Arc::clone(ctx), Arc::clone(&self.watched));
        self.tasks.spawn(async move {
            fetch_and_apply(&ctx, &watched, req, handle).await;
            Done::Fetch
        });
    }

    fn handle_event(
        &mut self,
        ctx: &Arc<ConnCtx>,
        domain: DomainRef,
        event: Lifecycle,
        handle: Option<DomainHandle>,
    ) {
        if let Some(req) = ctx.shared.owner.on_event(ctx.spec.id, domain, event) {
            self.spawn_fetch(ctx, req, handle);
        }
    }
}

/// Run one connection until asked to stop. `first_sync` fires after the first resync
/// (successful or not) or the first failed attempt to connect, for readiness.
pub async fn supervise(
    shared: Arc<Shared>,
    spec: ConnSpec,
    stop: StopSignal,
    first_sync: Option<oneshot::Sender<bool>>,
) {
    let mut conn = Connection::new(shared, spec, stop, first_sync);
    let mut state = State::Connecting { failures: 0 };
    while let Some(next) = conn.step(state).await {
        state = next;
    }
    conn.synced(false);
}

/// Connect once, run one resync and the reads it leaves, close: everything by `by` (the
/// `inventory` command). Past `by` the calls still running are abandoned as
/// [`CallError::Stopped`].
pub async fn sync_once(shared: Arc<Shared>, spec: ConnSpec, by: Instant) -> Result<(), CallError> {
    let (stop_tx, stop) = Stop::new();
    let conn = Connection::new(shared, spec, stop, None);
    let work = async {
        let (watched, feeds) = conn.open().await?;
        let mut session = Session::new(watched, feeds);
        let synced = resync_once(&conn.ctx, &session.watched).await;
        if let Ok(fetches) = &synced {
            for req in fetches.iter().cloned() {
                session.spawn_fetch(&conn.ctx, req, None);
            }
            drain_by(&mut session.tasks, by).await;
        }
        conn.close(session, by).await;
        synced.map(|_| ())
    };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        _ = tokio::time::sleep_until(by.into()) => {
            stop_tx.stop(by);
            work.await
        }
    }
}

/// The state a connection's life carries from one step to the next.
struct Connection {
    ctx: Arc<ConnCtx>,
    stop: StopSignal,
    first_sync: Option<oneshot::Sender<bool>>,
    delays: ExponentialBackoff,
    /// How many times the connection was established.
    sessions: u64,
    /// When a full backlog was last warned about (at most one warning a minute).
    overflow_warned: Option<Instant>,
}

/// Least time between two warnings about a full event backlog of one connection.
const OVERFLOW_WARN_EVERY: Duration = Duration::from_secs(60);

impl Connection {
    fn new(
        shared: Arc<Shared>,
        spec: ConnSpec,
        stop: StopSignal,
        first_sync: Option<oneshot::Sender<bool>>,
    ) -> Self {
        let lv = &shared.cfg.libvirt;
        let calls = Calls::new(lv.fetch_concurrency, lv.fetch_timeout, stop.clone());
        let delays = reconnect_delays(&shared);
        Self {
            ctx: Arc::new(ConnCtx {
                shared,
                spec,
                calls,
            }),
            stop,
            first_sync,
            delays,
            sessions: 0,
            overflow_warned: None,
        }
    }

    /// Report the first sync's outcome for readiness (once): `ok` false when the connection
    /// could not be opened or its resync failed.
    fn synced(&mut self, ok: bool) {
        if let Some(tx) = self.first_sync.take() {
            let _ = tx.send(ok);
        }
    }

    /// The stop deadline, once asked to stop.
    fn stopping(&self) -> Option<Instant> {
        self.stop.deadline()
    }

    /// Advance the connection's life by one state; `None` once it ended.
    async fn step(&mut self, state: State) -> Option<State> {
        match state {
            State::Connecting { .. } | State::Backoff { .. } if self.stopping().is_some() => None,
            State::Connecting { failures } => Some(self.connect(failures).await),
            State::Backoff { failures, delay } => {
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => Some(State::Connecting { failures }),
                    _ = stop.stopped() => None,
                }
            }
            State::Up(mut session) => Some(match self.serve(&mut session).await {
                Ended::Lost => State::Lost(session),
                Ended::Stop => State::Stopping(Some(session)),
            }),
            State::Lost(session) => {
                let ctx = Arc::clone(&self.ctx);
                ctx.shared.owner.set_up(ctx.spec.id, false, None);
                self.close(session, Instant::now() + self.ctx.calls.timeout())
                    .await;
                self.delays = reconnect_delays(&self.ctx.shared);
                let delay = self.delays.next().unwrap_or(Duration::ZERO);
                Some(State::Backoff { failures: 0, delay })
            }
            State::Stopping(session) => {
                if let Some(session) = session {
                    let by = self.stopping().unwrap_or_else(Instant::now);
                    self.close(session, by).await;
                }
                None
            }
        }
    }

    /// Open the connection (its URI, else its fallback), read what the first sync needs and
    /// start it.
    async fn connect(&mut self, failures: u32) -> State {
        let (watched, feeds) = match self.open().await {
            Ok(opened) => opened,
            Err(CallError::Stopped { .. }) => return State::Stopping(None),
            Err(e) => {
                let spec = &self.ctx.spec;
                if failures == 0 {
                    tracing::warn!(connection = %spec.label, error = %e, "libvirt connection unavailable; retrying with backoff");
                } else {
                    tracing::debug!(connection = %spec.label, error = %e, "libvirt still unavailable");
                }
                self.ctx.shared.owner.set_up(spec.id, false, None);
                self.synced(false);
                let delay = self
                    .delays
                    .next()
                    .unwrap_or(self.ctx.shared.cfg.libvirt.reconnect.max_backoff);
                return State::Backoff {
                    failures: failures + 1,
                    delay,
                };
            }
        };
        let ctx = Arc::clone(&self.ctx);
        let spec = &ctx.spec;
        if self.sessions > 0 {
            ctx.shared.owner.count_reconnect(spec.id);
            tracing::info!(connection = %spec.label, "libvirt connection re-established; resyncing");
        } else {
            tracing::info!(connection = %spec.label, "libvirt connection established");
        }
        self.sessions += 1;
        self.delays = reconnect_delays(&ctx.shared);
        // Only for the optional `hypervisor_version` attribute: the first virConnectGetVersion on
        // a fresh (session) daemon takes about 2 s while it probes the host, and the initial
        // resync waits for it, which delayed every new pod's VMIs (and every reconnect) by that.
        let hv = if ctx.shared.cfg.metric.attributes.hypervisor_version {
            let w = Arc::clone(&watched);
            let version = ctx.calls.run("reading the hypervisor version", move || {
                libvirt::hypervisor_version(&w)
            });
            version.await.unwrap_or_else(|e| {
                tracing::debug!(connection = %spec.label, error = %e, "no hypervisor version");
                None
            })
        } else {
            None
        };
        ctx.shared.owner.set_up(spec.id, true, hv);
        let mut session = Session::new(watched, feeds);
        session.start_resync(&ctx);
        State::Up(session)
    }

    /// Open the spec's URI, else its fallback. A timeout skips the fallback: the daemon is not
    /// answering at all. An open that timed out keeps its thread and permit until the daemon
    /// answers (then the late connection is closed on that thread).
    async fn open(&self) -> Result<(Arc<Watched>, Feeds), CallError> {
        let spec = &self.ctx.spec;
        let cfg = &self.ctx.shared.cfg.libvirt;
        // `keepalive_interval: 0s` disables keepalive.
        let keepalive = (!cfg.keepalive_interval.is_zero())
            .then_some((cfg.keepalive_interval, cfg.keepalive_count));
        let backlog = cfg.event_backlog;
        let mut first_error = None;
        for uri in std::iter::once(&spec.uri).chain(spec.fallback_uri.iter()) {
            let u = uri.clone();
            let opened = self
                .ctx
                .calls
                .open(move || libvirt::open(&u, keepalive, backlog))
                .await;
            match opened {
                Ok((w, feeds)) => {
                    if *uri != spec.uri {
                        tracing::debug!(uri = %uri, "connected through the fallback URI");
                    }
                    return Ok((Arc::new(w), feeds));
                }
                Err(e @ (CallError::Timeout { .. } | CallError::Stopped { .. })) => {
                    return Err(first_error.unwrap_or(e))
                }
                Err(e) if first_error.is_none() => first_error = Some(e),
                Err(e) => tracing::debug!(uri = %uri, error = %e, "the fallback URI failed too"),
            }
        }
        Err(first_error.unwrap_or(CallError::Stopped {
            what: "opening the connection",
        }))
    }

    /// Apply events and run resyncs until the connection is lost or asked to stop.
    async fn serve(&mut self, session: &mut Session) -> Ended {
        let ctx = Arc::clone(&self.ctx);
        let every = ctx.shared.cfg.libvirt.resync_interval;
        let mut ticker = tokio::time::interval(if every.is_zero() {
            Duration::from_secs(3600)
        } else {
            every
        });
        ticker.tick().await; // the first tick is immediate: the initial resync is already running
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                biased;
                _ = stop.stopped() => return Ended::Stop,
                ev = session.feeds.events.recv() => match ev {
                    Some(SourceEvent { domain, event, detail, handle }) => {
                        tracing::debug!(connection = %ctx.spec.label, domain = %domain.name, event = event.as_str(), detail, "lifecycle event");
                        session.handle_event(&ctx, domain, event, handle);
                    }
                    None => return Ended::Lost,
                },
                reason = async { session.feeds.closed.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                    let reason = reason.map_or_else(|| "callbacks released".to_string(), |r| r.to_string());
                    tracing::warn!(connection = %ctx.spec.label, %reason, "libvirt connection lost; its domains stay exported until it is back");
                    return Ended::Lost;
                }
                _ = session.feeds.overflow.notified() => {
                    // A notification left over from drops already counted brings nothing new.
                    let dropped = take_dropped(&ctx, &session.feeds);
                    if dropped > 0 {
                        let backlog = ctx.shared.cfg.libvirt.event_backlog;
                        if self.overflow_warned.is_none_or(|t| t.elapsed() >= OVERFLOW_WARN_EVERY) {
                            self.overflow_warned = Some(Instant::now());
                            tracing::warn!(connection = %ctx.spec.label, dropped, backlog, "lifecycle events dropped (backlog full); resyncing (warned at most once a minute; lifecycle_events_dropped counts them all)");
                        } else {
                            tracing::debug!(connection = %ctx.spec.label, dropped, backlog, "lifecycle events dropped (backlog full); resyncing");
                        }
                        session.want_resync(&ctx);
                    }
                }
                Some(done) = session.tasks.join_next_with_id(), if !session.tasks.is_empty() => {
                    self.reaped(session, done);
                }
                _ = ticker.tick(), if !every.is_zero() => {
                    if session.resync.is_none() {
                        session.start_resync(&ctx);
                    }
                }
            }
        }
    }

    /// A session task ended.
    fn reaped(&mut self, session: &mut Session, done: Result<(tokio::task::Id, Done), JoinError>) {
        match done {
            Ok((_, Done::Resync { fetches, ok })) => {
                self.resync_ended(session, ok);
                for req in fetches {
                    session.spawn_fetch(&self.ctx, req, None);
                }
            }
            Ok((_, Done::Fetch)) => {}
            Err(e) => {
                if session.resync == Some(e.id()) {
                    self.resync_ended(session, false);
                }
                if e.is_panic() {
                    tracing::error!(connection = %self.ctx.spec.label, "a connection task panicked");
                }
            }
        }
    }

    fn resync_ended(&mut self, session: &mut Session, ok: bool) {
        session.resync = None;
        self.synced(ok);
        if std::mem::take(&mut session.resync_again) {
            session.start_resync(&self.ctx);
        }
    }

    /// End every task of the session, then release the connection off the async worker, all by
    /// `by`. Past it, the release is left to finish on its blocking thread.
    async fn close(&self, session: Session, by: Instant) {
        let Session {
            watched,
            mut feeds,
            mut tasks,
            ..
        } = session;
        let by = tokio::time::Instant::from_std(by);
        // Aborted tasks drop their futures (and the resync its token) at once; the libvirt calls
        // they started hold only the connection and their permit, on their blocking threads.
        drain_by(&mut tasks, std::time::Instant::now()).await;
        // Queued events hold domain handles: release them (a local unref) while the connection
        // is still referenced here, so the last reference is the one dropped below.
        feeds.events.close();
        while feeds.events.try_recv().is_ok() {}
        // Drops the session did not get to see are counted all the same.
        take_dropped(&self.ctx, &feeds);
        let closing = tokio::task::spawn_blocking(move || drop(watched));
        if tokio::time::timeout_at(by, closing).await.is_err() {
            tracing::debug!(connection = %self.ctx.spec.label, "closing the connection is taking long; left to finish on its blocking thread");
        }
    }
}

/// Move the events dropped on a full backlog into the connection's counter; how many.
fn take_dropped(ctx: &ConnCtx, feeds: &Feeds) -> u64 {
    let n = feeds.dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
    ctx.shared.owner.count_dropped_events(ctx.spec.id, n);
    n
}

/// Reconnect delays: exponential (×2) from the configured initial to the maximum backoff, with
/// random jitter so a fleet does not reconnect in lockstep, never giving up.
fn reconnect_delays(shared: &Shared) -> ExponentialBackoff {
    let rc = &shared.cfg.libvirt.reconnect;
    ExponentialBuilder::new()
        .with_min_delay(rc.initial_backoff)
        .with_max_delay(rc.max_backoff)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Read a domain's XML through the connection's calls, through `handle` (from the event or the
/// listing) when there is one.
async fn fetch(
    ctx: &ConnCtx,
    watched: &Arc<Watched>,
    dom: DomainRef,
    handle: Option<DomainHandle>,
) -> FetchOutcome {
    let shared = &ctx.shared;
    let label = &ctx.spec.label;
    let (w, d, wants) = (Arc::clone(watched), dom.clone(), shared.wants);
    let fetched = ctx.calls.run("reading the domain's XML", move || {
        libvirt::fetch_domain(&w, &d, handle, wants)
    });
    match fetched.await {
        Ok(Fetched::Facts(f)) => {
            if ctx.spec.pod_uid.is_some() && !f.kubevirt {
                tracing::debug!(connection = %label, domain = %dom.name, "launcher domain has no KubeVirt metadata; reported with plain identity");
            }
            FetchOutcome::Facts(f)
        }
        Ok(Fetched::Gone) => {
            tracing::debug!(connection = %label, domain = %dom.name, "domain gone before its XML was read");
            FetchOutcome::Gone
        }
        Ok(Fetched::Unparsable(e)) => {
            shared.owner.telemetry().count_xml_error("parse");
            tracing::warn!(connection = %label, domain = %dom.name, error = %e, "domain XML could not be parsed; exporting hypervisor_type=unknown");
            FetchOutcome::Failed
        }
        Err(CallError::Stopped { .. }) => FetchOutcome::Failed,
        Err(e @ CallError::Timeout { .. }) => {
            shared.owner.telemetry().count_xml_error("timeout");
            tracing::warn!(connection = %label, domain = %dom.name, error = %e, "exporting hypervisor_type=unknown until the next resync");
            FetchOutcome::Failed
        }
        Err(e) => {
            shared.owner.telemetry().count_xml_error("fetch");
            tracing::warn!(connection = %label, domain = %dom.name, error = %e, "exporting hypervisor_type=unknown");
            FetchOutcome::Failed
        }
    }
}

async fn fetch_and_apply(
    ctx: &ConnCtx,
    watched: &Arc<Watched>,
    req: FetchRequest,
    handle: Option<DomainHandle>,
) {
    let outcome = fetch(ctx, watched, req.domain.clone(), handle).await;
    ctx.shared.owner.on_fetch(&req, outcome);
}

/// A session's resync task.
async fn resync(ctx: Arc<ConnCtx>, watched: Arc<Watched>) -> Done {
    match resync_once(&ctx, &watched).await {
        Ok(fetches) => Done::Resync { fetches, ok: true },
        Err(e) => {
            tracing::warn!(connection = %ctx.spec.label, error = %e, "resync failed");
            Done::Resync {
                fetches: Vec::new(),
                ok: false,
            }
        }
    }
}

/// List active domains, read only the ones not already known (concurrently, within this task,
/// bounded by the connection's permits), apply it all at once. Returns the listed domains that
/// still need their XML read.
async fn resync_once(
    ctx: &ConnCtx,
    watched: &Arc<Watched>,
) -> Result<Vec<FetchRequest>, CallError> {
    let shared = &ctx.shared;
    let id = ctx.spec.id;
    let started = Instant::now();
    let resync = shared.owner.begin_resync(id);
    let w = Arc::clone(watched);
    let libvirt::Listing {
        domains: listing,
        mut handles,
    } = ctx
        .calls
        .run("listing active domains", move || libvirt::list_active(&w))
        .await?;
    let need = shared.owner.needs_fetch(id, &listing);
    let fetched_count = need.len();
    let mut fetches: FuturesUnordered<_> = need
        .into_iter()
        .map(|dom| {
            let handle = handles.remove(&dom.uuid);
            async move {
                let uuid = dom.uuid.clone();
                (uuid, fetch(ctx, watched, dom, handle).await)
            }
        })
        .collect();
    // Handles of domains already known are not needed (and a late re-read looks up again).
    drop(handles);
    let mut outcomes: HashMap<String, FetchOutcome> = HashMap::new();
    while let Some((uuid, o)) = fetches.next().await {
        outcomes.insert(uuid, o);
    }
    let listed = listing.len();
    let items = listing
        .into_iter()
        .map(|d| {
            let o = outcomes.remove(&d.uuid);
            (d, o)
        })
        .collect();
    let report = resync.finish(items);
    let elapsed = started.elapsed();
    shared.owner.set_last_sync(id, elapsed);
    let changed = report.added + report.removed + report.replaced > 0;
    macro_rules! log_resync {
        ($lvl:ident) => {
            tracing::$lvl!(
                connection = %ctx.spec.label,
                listed,
                fetched = fetched_count,
                added = report.added,
                removed = report.removed,
                replaced = report.replaced,
                elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                "resync done"
            )
        };
    }
    if changed {
        log_resync!(info);
    } else {
        log_resync!(debug);
    }
    Ok(report.fetches)
}
