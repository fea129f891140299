//! One task per libvirt connection: connect (read-only, callbacks before listing), resync,
//! apply events, fetch XML off the event-loop thread, and reconnect with backoff when lost.
//!
//! While a connection is down its domains stay exported (QEMU outlives libvirtd restarts); the
//! resync after reconnecting corrects whatever changed meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use super::Shared;
use crate::inventory::{
    ConnId, DomainRef, FetchOutcome, FetchRequest, Lifecycle, ResyncReport, ResyncToken,
};
use crate::source::ffi::{DomainHandle, Watched};
use crate::source::libvirt::{self, Fetched};
use crate::source::SourceEvent;

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

type PendingOpen = tokio::task::JoinHandle<Result<Watched, libvirt::LibvirtError>>;

/// Open the spec's URI, else its fallback; returns the URI that answered.
///
/// An open that times out (a hung daemon accepts the socket but never answers) keeps its
/// blocking thread until the daemon wakes up. It is parked in `pending`, and no new attempt is
/// made while it is still stuck, so a long hang costs one thread per connection, not one per
/// retry. A timeout also skips the fallback URI: the daemon is not answering at all.
async fn open_any(
    spec: &ConnSpec,
    keepalive: Option<(Duration, u32)>,
    timeout: Duration,
    tx: mpsc::UnboundedSender<SourceEvent>,
    pending: &mut Option<PendingOpen>,
) -> Result<(Watched, String), String> {
    if let Some(stuck) = pending.take() {
        if !stuck.is_finished() {
            *pending = Some(stuck);
            return Err("the previous open attempt is still waiting for the daemon".into());
        }
        // It finished late: its callbacks point at an abandoned channel. Close it off the
        // async workers.
        tokio::spawn(async move {
            if let Ok(Ok(w)) = stuck.await {
                let _ = tokio::task::spawn_blocking(move || drop(w)).await;
            }
        });
    }
    let mut errors = Vec::new();
    for uri in std::iter::once(&spec.uri).chain(spec.fallback_uri.iter()) {
        let u = uri.clone();
        let t = tx.clone();
        let mut handle: PendingOpen =
            tokio::task::spawn_blocking(move || libvirt::open(&u, keepalive, t));
        match tokio::time::timeout(timeout, &mut handle).await {
            Ok(Ok(Ok(w))) => return Ok((w, uri.clone())),
            Ok(Ok(Err(e))) => errors.push(e.to_string()),
            Ok(Err(e)) => errors.push(format!("open task failed: {e}")),
            Err(_) => {
                *pending = Some(handle);
                errors.push(format!("open timed out after {timeout:?}"));
                break;
            }
        }
    }
    Err(errors.join("; "))
}

/// Per-connection context shared with its fetch and resync tasks.
struct ConnCtx {
    shared: Arc<Shared>,
    spec: ConnSpec,
    watched: Arc<Watched>,
    permits: Arc<Semaphore>,
}

/// Run one connection until `stop` turns true. `first_sync` fires after the first resync
/// (successful or not), for readiness.
pub async fn supervise(
    shared: Arc<Shared>,
    spec: ConnSpec,
    mut stop: watch::Receiver<bool>,
    mut first_sync: Option<oneshot::Sender<()>>,
) {
    let cfg = &shared.cfg.libvirt;
    let initial = cfg.reconnect.initial_backoff;
    let max = cfg.reconnect.max_backoff;
    let mut delays = reconnect_delays(initial, max);
    let mut pending_open: Option<PendingOpen> = None;
    let mut ever_up = false;
    let mut outage_logged = false;
    // `keepalive_interval: 0s` disables keepalive.
    let keepalive = (!cfg.keepalive_interval.is_zero())
        .then_some((cfg.keepalive_interval, cfg.keepalive_count));

    'outer: loop {
        if *stop.borrow() {
            break;
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watched = match open_any(&spec, keepalive, cfg.fetch_timeout, tx, &mut pending_open)
            .await
        {
            Ok((w, uri)) => {
                if uri != spec.uri {
                    tracing::debug!(uri = %uri, "connected through the fallback URI");
                }
                Arc::new(w)
            }
            Err(why) => {
                if outage_logged {
                    tracing::debug!(connection = %spec.label, error = %why, "libvirt still unavailable");
                } else {
                    tracing::warn!(connection = %spec.label, error = %why, "libvirt connection unavailable; retrying with backoff");
                    outage_logged = true;
                }
                shared.telemetry.set_up(spec.id, false, None);
                if let Some(tx) = first_sync.take() {
                    let _ = tx.send(());
                }
                let sleep = delays.next().unwrap_or(max);
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => continue 'outer,
                    _ = stop.changed() => break 'outer,
                }
            }
        };
        if ever_up {
            shared.telemetry.count_reconnect(spec.id);
            tracing::info!(connection = %spec.label, "libvirt connection re-established; resyncing");
        } else {
            tracing::info!(connection = %spec.label, "libvirt connection established");
        }
        ever_up = true;
        outage_logged = false;
        delays = reconnect_delays(initial, max);
        // Only for the optional `hypervisor_version` attribute: the first virConnectGetVersion on
        // a fresh (session) daemon takes about 2 s while it probes the host, and the initial
        // resync waits for it, which delayed every new pod's VMIs (and every reconnect) by that.
        let hv = if shared.cfg.metric.attributes.hypervisor_version {
            let w = Arc::clone(&watched);
            tokio::task::spawn_blocking(move || libvirt::hypervisor_version(&w))
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        shared.telemetry.set_up(spec.id, true, hv);

        let ctx = Arc::new(ConnCtx {
            shared: Arc::clone(&shared),
            spec: spec.clone(),
            watched,
            permits: Arc::new(Semaphore::new(shared.cfg.libvirt.fetch_concurrency.max(1))),
        });
        let mut resync_task: Option<tokio::task::JoinHandle<()>> =
            Some(tokio::spawn(resync(Arc::clone(&ctx))));
        let resync_every = shared.cfg.libvirt.resync_interval;
        let mut ticker = tokio::time::interval(if resync_every.is_zero() {
            Duration::from_secs(3600)
        } else {
            resync_every
        });
        ticker.tick().await; // the first tick is immediate: the initial resync is already running

        let lost = loop {
            tokio::select! {
                _ = stop.changed() => break false,
                ev = rx.recv() => match ev {
                    Some(SourceEvent::Lifecycle { domain, event, detail, handle }) => {
                        tracing::debug!(connection = %spec.label, domain = %domain.name, event = event.as_str(), detail, "lifecycle event");
                        handle_event(&ctx, domain, event, handle);
                    }
                    Some(SourceEvent::Closed { reason }) => {
                        tracing::warn!(connection = %spec.label, %reason, "libvirt connection lost; its domains stay exported until it is back");
                        break true;
                    }
                    None => break true,
                },
                _ = ticker.tick(), if !resync_every.is_zero() => {
                    if resync_task.as_ref().is_none_or(|t| t.is_finished()) {
                        resync_task = Some(tokio::spawn(resync(Arc::clone(&ctx))));
                    }
                }
                _ = async { match resync_task.as_mut() { Some(t) => { let _ = t.await; } None => std::future::pending().await } } => {
                    resync_task = None;
                    if let Some(tx) = first_sync.take() {
                        let _ = tx.send(());
                    }
                }
            }
        };
        shared.telemetry.set_up(spec.id, false, None);
        if let Some(t) = resync_task.take() {
            t.abort();
        }
        // Queued events hold domain handles, which keep the connection object alive: release
        // them now (a local unref), so that dropping the context below really closes it.
        rx.close();
        while rx.try_recv().is_ok() {}
        // Deregistration and close are RPCs: keep them off the async workers.
        // Awaited, so that when this task ends its connection is closed (a removed launcher
        // socket leaves no descriptor behind); bounded, so a hung daemon cannot hold us.
        let ctx_done = ctx;
        let closing = tokio::task::spawn_blocking(move || drop(ctx_done));
        if tokio::time::timeout(Duration::from_secs(2), closing)
            .await
            .is_err()
        {
            tracing::debug!(connection = %spec.label, "closing the connection is taking long; left to finish in the background");
        }
        if !lost {
            break;
        }
        let sleep = delays.next().unwrap_or(initial);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = stop.changed() => break,
        }
    }
    if let Some(tx) = first_sync.take() {
        let _ = tx.send(());
    }
}

/// Collapse timeout → join → libvirt results into one error string.
fn flatten<T, E: std::fmt::Display>(
    r: Result<Result<Result<T, E>, tokio::task::JoinError>, tokio::time::error::Elapsed>,
    what: &str,
) -> Result<T, String> {
    match r {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(e)) => Err(format!("{what} task failed: {e}")),
        Err(_) => Err(format!("{what} timed out")),
    }
}

/// Reconnect delays: exponential (×2) from `initial` to `max`, with random jitter so a fleet
/// does not reconnect in lockstep, never giving up.
fn reconnect_delays(initial: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(initial)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

fn handle_event(
    ctx: &Arc<ConnCtx>,
    domain: DomainRef,
    event: Lifecycle,
    handle: Option<DomainHandle>,
) {
    let shared = &ctx.shared;
    shared.telemetry.count_event(event);
    let (req, changed) = {
        let mut inv = shared.lock_inventory();
        let before = inv.version();
        let req = inv.apply_event(ctx.spec.id, domain, event);
        (req, inv.version() != before)
    };
    if changed {
        shared.push.push();
    }
    if let Some(req) = req {
        tokio::spawn(fetch_and_apply(Arc::clone(ctx), req, handle));
    }
}

/// Read a domain's XML with the connection's concurrency bound and the fetch timeout, through
/// `handle` (from the event or the listing) when there is one.
async fn fetch(ctx: &Arc<ConnCtx>, dom: DomainRef, handle: Option<DomainHandle>) -> FetchOutcome {
    let shared = &ctx.shared;
    let Ok(permit) = Arc::clone(&ctx.permits).acquire_owned().await else {
        return FetchOutcome::Failed;
    };
    let w = Arc::clone(&ctx.watched);
    let wants = shared.wants;
    let d = dom.clone();
    // The permit lives as long as the blocking call, so a hung daemon uses at most
    // `fetch_concurrency` threads, and only its own.
    let task = tokio::task::spawn_blocking(move || {
        let r = libvirt::fetch_domain(&w, &d, handle, wants);
        drop(permit);
        r
    });
    match tokio::time::timeout(shared.cfg.libvirt.fetch_timeout, task).await {
        Err(_) => {
            shared.telemetry.count_xml_error("timeout");
            tracing::warn!(connection = %ctx.spec.label, domain = %dom.name, "domain XML fetch timed out; exporting hypervisor_type=unknown until the next resync");
            FetchOutcome::Failed
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "fetch task failed");
            FetchOutcome::Failed
        }
        Ok(Ok(Fetched::Facts(f))) => {
            if ctx.spec.pod_uid.is_some() && f.kubevirt.is_none() {
                tracing::debug!(connection = %ctx.spec.label, domain = %dom.name, "launcher domain has no KubeVirt metadata; reported with plain identity");
            }
            FetchOutcome::Facts(f)
        }
        Ok(Ok(Fetched::Gone)) => {
            tracing::debug!(connection = %ctx.spec.label, domain = %dom.name, "domain gone before its XML was read");
            FetchOutcome::Gone
        }
        Ok(Ok(Fetched::LibvirtError(msg))) => {
            shared.telemetry.count_xml_error("fetch");
            tracing::warn!(connection = %ctx.spec.label, domain = %dom.name, error = %msg, "reading domain XML failed; exporting hypervisor_type=unknown");
            FetchOutcome::Failed
        }
        Ok(Ok(Fetched::ParseError(e))) => {
            shared.telemetry.count_xml_error("parse");
            tracing::warn!(connection = %ctx.spec.label, domain = %dom.name, error = %e, "domain XML could not be parsed; exporting hypervisor_type=unknown");
            FetchOutcome::Failed
        }
    }
}

async fn fetch_and_apply(ctx: Arc<ConnCtx>, req: FetchRequest, handle: Option<DomainHandle>) {
    let outcome = fetch(&ctx, req.domain.clone(), handle).await;
    let changed = ctx.shared.lock_inventory().apply_fetch(&req, outcome);
    if changed {
        ctx.shared.push.push();
    }
}

/// A resync begun in the inventory, ended exactly once whatever happens to its task: finished
/// with a listing, or aborted when dropped (a failed listing, or the task cancelled because its
/// connection was lost). A token that outlived its task would keep the connection "resyncing"
/// for good, and every later STOPPED would add a tombstone that is never cleared.
struct ResyncGuard {
    shared: Arc<Shared>,
    token: Option<ResyncToken>,
}

impl ResyncGuard {
    fn begin(shared: &Arc<Shared>, conn: ConnId) -> Self {
        let token = shared.lock_inventory().begin_resync(conn);
        Self {
            shared: Arc::clone(shared),
            token: Some(token),
        }
    }

    fn finish(mut self, listing: Vec<(DomainRef, Option<FetchOutcome>)>) -> ResyncReport {
        match self.token.take() {
            Some(token) => self.shared.lock_inventory().finish_resync(token, listing),
            None => ResyncReport::default(),
        }
    }
}

impl Drop for ResyncGuard {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.shared.lock_inventory().abort_resync(token);
        }
    }
}

/// List active domains, read only the ones not already known, apply it all at once.
async fn resync(ctx: Arc<ConnCtx>) {
    let shared = &ctx.shared;
    let id = ctx.spec.id;
    let started = Instant::now();
    let guard = ResyncGuard::begin(shared, id);
    let w = Arc::clone(&ctx.watched);
    let listing = tokio::time::timeout(
        shared.cfg.libvirt.fetch_timeout,
        tokio::task::spawn_blocking(move || libvirt::list_active(&w)),
    )
    .await;
    let libvirt::Listing {
        domains: listing,
        mut handles,
    } = match flatten(listing, "listing") {
        Ok(l) => l,
        Err(why) => {
            drop(guard);
            tracing::warn!(connection = %ctx.spec.label, error = %why, "resync failed");
            return;
        }
    };
    let need = shared.lock_inventory().needs_fetch(id, &listing);
    let fetched_count = need.len();
    let mut set = JoinSet::new();
    for dom in need {
        let c = Arc::clone(&ctx);
        let handle = handles.remove(&dom.uuid);
        set.spawn(async move {
            let outcome = fetch(&c, dom.clone(), handle).await;
            (dom.uuid, outcome)
        });
    }
    // Handles of domains already known are not needed (and a late re-read looks up again).
    drop(handles);
    let mut outcomes: HashMap<String, FetchOutcome> = HashMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((uuid, o)) = r {
            outcomes.insert(uuid, o);
        }
    }
    let listed = listing.len();
    let items = listing
        .into_iter()
        .map(|d| {
            let o = outcomes.remove(&d.uuid);
            (d, o)
        })
        .collect();
    let report = guard.finish(items);
    for req in report.fetches.iter().cloned() {
        tokio::spawn(fetch_and_apply(Arc::clone(&ctx), req, None));
    }
    let elapsed = started.elapsed();
    shared.telemetry.set_last_sync(id, elapsed);
    if report.added + report.removed + report.replaced > 0 {
        shared.push.push();
    }
    let level_info = report.added + report.removed + report.replaced > 0;
    macro_rules! log_resync {
        ($lvl:ident) => {
            tracing::$lvl!(
                connection = %ctx.spec.label,
                listed,
                fetched = fetched_count,
                added = report.added,
                removed = report.removed,
                replaced = report.replaced,
                elapsed_ms = elapsed.as_millis() as u64,
                "resync done"
            )
        };
    }
    if level_info {
        log_resync!(info);
    } else {
        log_resync!(debug);
    }
}
