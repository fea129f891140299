//! The raw libvirt calls of the agent: the calls the `virt` crate does not wrap
//! (`virConnectDomainEventRegisterAny`, `virConnectRegisterCloseCallback` and their
//! deregistrations) and an explicit close that reports errors instead of panicking (the `virt`
//! crate's `Drop` for `Connect`/`Domain` panics when the release fails).
//!
//! [`Watched`] is the RAII owner of one read-only connection with its lifecycle and close
//! callbacks: its `Drop` deregisters both and closes the connection, logging (never panicking)
//! on failure. Callbacks run on the libvirt event-loop thread; they only copy a few strings out
//! of the domain object and take a reference to it (no RPC) and hand them to a sink, and never
//! let a panic unwind into C. [`DomainHandle`] owns one domain reference.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error as VirtError;
use virt_sys as sys;

/// A lifecycle event as delivered by libvirt, copied out of the C objects.
#[derive(Debug)]
pub struct RawLifecycle {
    pub uuid: String,
    /// `None` when libvirt reports the domain inactive (id `-1`).
    pub id: Option<u32>,
    pub name: String,
    pub event: i32,
    pub detail: i32,
    /// A reference to the event's domain object, so that its XML can be read without a lookup.
    pub handle: Option<DomainHandle>,
}

/// An owned reference to a libvirt domain object (from a listing or an event): its XML can be
/// read without looking the domain up again, one RPC instead of two. Dropping it releases the
/// reference without panicking; that is local (no RPC) while the connection is open, and a
/// handle keeps its connection object alive, so drop handles before closing the connection.
#[derive(Debug)]
pub struct DomainHandle(ManuallyDrop<Domain>);

impl DomainHandle {
    /// Take ownership of a domain reference (e.g. one returned by a listing).
    pub fn new(dom: Domain) -> Self {
        Self(ManuallyDrop::new(dom))
    }

    /// A new reference to a domain libvirt lent us (in a callback).
    ///
    /// # Safety
    /// `dom` must be a valid domain pointer for the duration of the call.
    unsafe fn from_borrowed(dom: sys::virDomainPtr) -> Option<Self> {
        // SAFETY: `dom` is valid (caller's contract); on success we own one more reference.
        if unsafe { sys::virDomainRef(dom) } < 0 {
            return None;
        }
        // SAFETY: the wrapper takes over the reference taken above; `Drop` releases it once.
        Some(Self::new(unsafe { Domain::from_ptr(dom) }))
    }

    pub fn domain(&self) -> &Domain {
        &self.0
    }
}

impl Drop for DomainHandle {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and the field is never used after it; the wrapper's own
        // (panicking) `Drop` never runs, `release_domain` frees its reference instead.
        let d = unsafe { ManuallyDrop::take(&mut self.0) };
        release_domain(d);
    }
}

/// Receives lifecycle events on the event-loop thread. Must not block.
pub type LifecycleSink = Box<dyn Fn(RawLifecycle) + Send + Sync>;
/// Receives the close reason (`VIR_CONNECT_CLOSE_REASON_*`) on the event-loop thread.
pub type CloseSink = Box<dyn Fn(i32) + Send + Sync>;

type LifecycleFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type GenericFn = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// A read-only connection with its callbacks registered. Dropping it deregisters and closes.
/// Dropping may do RPCs to the daemon: drop it on a blocking thread.
#[derive(Debug)]
pub struct Watched {
    conn: Option<Connect>,
    lifecycle_id: Option<c_int>,
    close_registered: bool,
    uri: String,
}

impl Watched {
    /// Open `uri` read-only and register the close callback, then the lifecycle callback, before
    /// returning, so the caller lists domains only once events are already flowing.
    pub fn open(
        uri: &str,
        on_event: LifecycleSink,
        on_close: CloseSink,
    ) -> Result<Self, VirtError> {
        let conn = Connect::open_read_only(Some(uri))?;
        let mut watched = Watched {
            conn: Some(conn),
            lifecycle_id: None,
            close_registered: false,
            uri: uri.to_string(),
        };
        let ptr = watched.raw();

        let close_opaque = Box::into_raw(Box::new(on_close));
        // SAFETY: `ptr` is a live connection owned by `watched`. The opaque is a leaked
        // `Box<CloseSink>` that libvirt hands back to `close_trampoline` and frees through
        // `free_close_sink` when the callback is unregistered or the connection is freed.
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                ptr,
                Some(close_trampoline),
                close_opaque.cast(),
                Some(free_close_sink),
            )
        };
        if rc < 0 {
            // SAFETY: registration failed, so libvirt did not take ownership of the opaque:
            // it is still ours to free, exactly once, here.
            drop(unsafe { Box::from_raw(close_opaque) });
            return Err(VirtError::last_error());
        }
        watched.close_registered = true;

        let event_opaque = Box::into_raw(Box::new(on_event));
        // SAFETY: libvirt declares the lifecycle callback with a generic signature and expects
        // callers to cast (C's `VIR_DOMAIN_EVENT_CALLBACK`); it calls it back with the lifecycle
        // signature for `VIR_DOMAIN_EVENT_ID_LIFECYCLE`. Both are `extern "C"` function
        // pointers of the same size.
        let generic =
            unsafe { std::mem::transmute::<LifecycleFn, GenericFn>(lifecycle_trampoline) };
        // SAFETY: `ptr` is live; a null domain means "all domains". The opaque is a leaked
        // `Box<LifecycleSink>` freed by libvirt through `free_lifecycle_sink` on deregistration.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                ptr,
                ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(generic),
                event_opaque.cast(),
                Some(free_lifecycle_sink),
            )
        };
        if id < 0 {
            // SAFETY: registration failed: libvirt did not take the opaque; free it once here.
            drop(unsafe { Box::from_raw(event_opaque) });
            // `watched` drops here: unregisters the close callback and closes the connection.
            return Err(VirtError::last_error());
        }
        watched.lifecycle_id = Some(id);
        Ok(watched)
    }

    /// The connection, for safe `virt` calls (listing, lookups, XML).
    pub fn connect(&self) -> Option<&Connect> {
        self.conn.as_ref()
    }

    fn raw(&self) -> sys::virConnectPtr {
        match &self.conn {
            // SAFETY: the pointer is only used while `self.conn` keeps the reference alive.
            Some(c) => unsafe { c.as_ptr() },
            None => ptr::null_mut(),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let ptr = self.raw();
        if ptr.is_null() {
            return;
        }
        if let Some(id) = self.lifecycle_id.take() {
            // SAFETY: `ptr` is live and `id` came from a successful registration on it.
            let rc = unsafe { sys::virConnectDomainEventDeregisterAny(ptr, id) };
            if rc < 0 {
                // Expected when the connection is already dead; libvirt frees the opaque when
                // the connection object goes.
                tracing::debug!(uri = %self.uri, error = %VirtError::last_error(), "lifecycle callback deregistration failed");
            }
        }
        if self.close_registered {
            self.close_registered = false;
            // SAFETY: `ptr` is live and `close_trampoline` is the registered callback.
            let rc = unsafe { sys::virConnectUnregisterCloseCallback(ptr, Some(close_trampoline)) };
            if rc < 0 {
                tracing::debug!(uri = %self.uri, error = %VirtError::last_error(), "close callback deregistration failed");
            }
        }
        if let Some(conn) = self.conn.take() {
            close_connection(conn, &self.uri);
        }
    }
}

/// Release a connection reference, logging instead of panicking on failure.
fn close_connection(conn: Connect, uri: &str) {
    // SAFETY: we take the raw pointer and forget the wrapper so its panicking `Drop` never runs;
    // the reference it owned is released exactly once by `virConnectClose` below.
    let ptr = unsafe { conn.as_ptr() };
    std::mem::forget(conn);
    // SAFETY: `ptr` holds the reference the forgotten wrapper owned.
    let rc = unsafe { sys::virConnectClose(ptr) };
    if rc < 0 {
        tracing::warn!(uri = %uri, error = %VirtError::last_error(), "closing libvirt connection failed; leaking it");
    }
}

/// Release a domain reference, logging instead of panicking on failure.
fn release_domain(dom: Domain) {
    // SAFETY: as in `close_connection`: forget the wrapper, free its one reference explicitly.
    let ptr = unsafe { dom.as_ptr() };
    std::mem::forget(dom);
    // SAFETY: `ptr` holds the reference the forgotten wrapper owned.
    let rc = unsafe { sys::virDomainFree(ptr) };
    if rc < 0 {
        tracing::warn!(error = %VirtError::last_error(), "freeing libvirt domain object failed; leaking it");
    }
}

/// # Safety
/// Called by libvirt with a live domain and the opaque registered in [`Watched::open`].
unsafe extern "C" fn lifecycle_trampoline(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if opaque.is_null() || dom.is_null() {
            return;
        }
        // SAFETY: `opaque` is the `Box<LifecycleSink>` leaked at registration; libvirt keeps it
        // alive until `free_lifecycle_sink` runs, which cannot overlap with this call.
        let sink = unsafe { &*(opaque as *const LifecycleSink) };
        // SAFETY: `dom` is valid for the duration of the callback.
        let raw = unsafe { read_domain(dom) };
        // SAFETY: as above; the handle holds its own reference, released when it drops.
        let handle = unsafe { DomainHandle::from_borrowed(dom) };
        sink(RawLifecycle {
            uuid: raw.0,
            id: raw.1,
            name: raw.2,
            event,
            detail,
            handle,
        });
    }));
    0
}

/// # Safety
/// `dom` must be a valid domain pointer.
unsafe fn read_domain(dom: sys::virDomainPtr) -> (String, Option<u32>, String) {
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `buf` has the VIR_UUID_STRING_BUFLEN bytes libvirt writes (NUL included).
    let uuid = if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        // SAFETY: on success libvirt wrote a NUL-terminated string into `buf`.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    } else {
        String::new()
    };
    // SAFETY: `dom` is valid; the returned name is owned by the domain object and copied here.
    let name_ptr = unsafe { sys::virDomainGetName(dom) };
    let name = if name_ptr.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, NUL-terminated, alive while `dom` is.
        unsafe { CStr::from_ptr(name_ptr) }
            .to_string_lossy()
            .into_owned()
    };
    // SAFETY: `dom` is valid; returns (unsigned)-1 for an inactive domain.
    let id = unsafe { sys::virDomainGetID(dom) };
    let id = if id == u32::MAX { None } else { Some(id) };
    (uuid, id, name)
}

/// # Safety
/// Called by libvirt with the opaque registered in [`Watched::open`].
unsafe extern "C" fn close_trampoline(
    _conn: sys::virConnectPtr,
    reason: c_int,
    opaque: *mut c_void,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if opaque.is_null() {
            return;
        }
        // SAFETY: `opaque` is the `Box<CloseSink>` leaked at registration, alive until freed
        // by `free_close_sink`.
        let sink = unsafe { &*(opaque as *const CloseSink) };
        sink(reason);
    }));
}

/// # Safety
/// Called once by libvirt with the opaque leaked in [`Watched::open`].
unsafe extern "C" fn free_lifecycle_sink(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: libvirt calls the free function exactly once for the registered opaque.
        drop(unsafe { Box::from_raw(opaque as *mut LifecycleSink) });
    }
}

/// # Safety
/// Called once by libvirt with the opaque leaked in [`Watched::open`].
unsafe extern "C" fn free_close_sink(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: libvirt calls the free function exactly once for the registered opaque.
        drop(unsafe { Box::from_raw(opaque as *mut CloseSink) });
    }
}
