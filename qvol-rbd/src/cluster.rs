//! A connection to a Ceph cluster (`rados_t`) and a pool in it (`rados_ioctx_t`).
//!
//! Which cluster and which identity: [`CephOptions`], resolved as Ceph's own tools do
//! (`--ceph-conf`, then `$CEPH_CONF`, then `/etc/ceph/ceph.conf`; `--ceph-id`, then `admin`).
//! Every call that waits on the cluster is bounded ([`TIMEOUTS`]), so a cluster that is down
//! or unreachable gives an error instead of a hang.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{check, from_rc, other};
use crate::ffi::{self, IoCtxT, RadosT};

/// The configuration file Ceph reads when neither `--ceph-conf` nor `$CEPH_CONF` names one.
pub const DEFAULT_CONF: &str = "/etc/ceph/ceph.conf";
/// The client id (`client.ID`) used when `--ceph-id` is not given.
pub const DEFAULT_ID: &str = "admin";

/// How long the cluster may take to answer: the `rados_conf_set` options of these names,
/// set where the configuration file leaves Ceph's own default (`CEPH_DEFAULTS`: wait
/// five minutes to connect, forever for a request):
/// - `client_mount_timeout`: connecting (monitors unreachable, wrong address);
/// - `rados_mon_op_timeout`: a monitor request;
/// - `rados_osd_op_timeout`: one OSD request. A write the cluster cannot take within this
///   time fails with an I/O error (the volume then refuses further writes) rather than
///   blocking the guest forever.
pub const TIMEOUTS: [(&str, Duration); 3] = [
    ("client_mount_timeout", Duration::from_secs(15)),
    ("rados_mon_op_timeout", Duration::from_secs(15)),
    ("rados_osd_op_timeout", Duration::from_secs(60)),
];

/// Ceph's defaults for [`TIMEOUTS`], in seconds (pacific's `options.cc`): a value the
/// configuration file set to anything else is kept.
const CEPH_DEFAULTS: [f64; 3] = [300.0, 0.0, 0.0];

/// Options forced after the configuration file is read: qvol's durability contract depends
/// on them (docs/FORMAT.md §11). `rbd_cache=false`: librbd's writeback cache lives in this
/// process's memory, so a write it acknowledged would not survive kill -9 of the daemon;
/// without it, `rbd_write2` returns once the OSDs have the write (in their journal).
pub const FORCED: [(&str, &str); 1] = [("rbd_cache", "false")];

/// Quiet: librados otherwise writes its own error lines on stderr, next to the one sentence
/// qvol prints (its log file, if the configuration names one, keeps them).
const QUIET: [(&str, &str); 2] = [("log_to_stderr", "false"), ("err_to_stderr", "false")];

/// Which cluster and identity to use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CephOptions {
    /// `--ceph-conf FILE`.
    pub conf: Option<PathBuf>,
    /// `--ceph-id NAME` (without `client.`).
    pub id: Option<String>,
}

impl CephOptions {
    /// The configuration file: `--ceph-conf`, then `$CEPH_CONF`, then [`DEFAULT_CONF`].
    pub fn conf_file(&self) -> PathBuf {
        if let Some(conf) = &self.conf {
            return conf.clone();
        }
        match std::env::var_os("CEPH_CONF") {
            Some(v) if !v.is_empty() => PathBuf::from(v),
            _ => PathBuf::from(DEFAULT_CONF),
        }
    }

    /// The client id: `--ceph-id`, then [`DEFAULT_ID`]; a `client.` prefix is dropped (Ceph's
    /// tools take the id both ways).
    pub fn client_id(&self) -> &str {
        let id = self.id.as_deref().unwrap_or(DEFAULT_ID);
        id.strip_prefix("client.").unwrap_or(id)
    }
}

/// A connected cluster handle; shut down when the last user drops it.
#[derive(Debug)]
pub struct Cluster {
    handle: RadosT,
    conf: PathBuf,
    id: String,
}

// SAFETY: a connected `rados_t` may be used from any thread and by several at once
// (librados.h: the cluster handle is thread-safe); it is only shut down in `drop`, when no
// other reference remains.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

fn c_string(what: &str, text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| {
        other(
            io::ErrorKind::InvalidInput,
            format!("the {what} {text:?} contains a NUL byte"),
        )
    })
}

fn path_c_string(path: &Path) -> io::Result<CString> {
    let text = path.to_str().ok_or_else(|| {
        other(
            io::ErrorKind::InvalidInput,
            format!(
                "the Ceph configuration path {} is not UTF-8",
                path.display()
            ),
        )
    })?;
    c_string("Ceph configuration path", text)
}

impl Cluster {
    /// Connects as `client.ID` to the cluster `options` name, within [`TIMEOUTS`].
    pub fn connect(options: &CephOptions) -> io::Result<Arc<Self>> {
        let api = ffi::api().map_err(|e| other(io::ErrorKind::NotFound, e))?;
        let conf = options.conf_file();
        let id = options.client_id().to_string();
        if !conf.is_file() {
            return Err(other(
                io::ErrorKind::NotFound,
                format!(
                    "the Ceph configuration file {} does not exist: pass --ceph-conf FILE or \
                     set CEPH_CONF",
                    conf.display()
                ),
            ));
        }
        let c_id = c_string("Ceph client id", &id)?;
        let mut handle: RadosT = ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer and `c_id` a NUL-terminated string that
        // outlives the call (rados_create copies it).
        let rc = unsafe { (api.rados_create)(&mut handle, c_id.as_ptr()) };
        check(rc, || {
            format!("cannot create a Ceph client handle for client.{id}")
        })?;
        // From here `cluster` owns the handle (shut down on drop, connected or not).
        let cluster = Cluster { handle, conf, id };
        for (option, value) in QUIET {
            cluster.set(option, value)?;
        }
        let c_conf = path_c_string(&cluster.conf)?;
        // SAFETY: a created, unconnected handle and a NUL-terminated path.
        let rc = unsafe { (api.rados_conf_read_file)(cluster.handle, c_conf.as_ptr()) };
        check(rc, || {
            format!(
                "cannot read the Ceph configuration file {}",
                cluster.conf.display()
            )
        })?;
        for ((option, value), default) in TIMEOUTS.into_iter().zip(CEPH_DEFAULTS) {
            let set: Option<f64> = cluster.get(option)?.trim().parse().ok();
            if set == Some(default) {
                cluster.set(option, &value.as_secs().to_string())?;
            }
        }
        for (option, value) in FORCED {
            cluster.set(option, value)?;
        }
        // SAFETY: a created, configured, unconnected handle.
        let rc = unsafe { (api.rados_connect)(cluster.handle) };
        if rc < 0 {
            return Err(from_rc(i64::from(rc), cluster.connect_failure(rc)));
        }
        Ok(Arc::new(cluster))
    }

    /// The sentence for a failed `rados_connect`, by its errno.
    fn connect_failure(&self, rc: i32) -> String {
        let who = format!(
            "cannot connect to the Ceph cluster of {} as client.{}",
            self.conf.display(),
            self.id
        );
        match -rc {
            libc::ETIMEDOUT | libc::EINTR => format!(
                "{who}: no monitor answered within client_mount_timeout (is the cluster up, \
                 and is its mon host right?)"
            ),
            libc::ENOENT => format!("{who}: no keyring holds that client's key"),
            libc::EACCES | libc::EPERM => format!("{who}: the monitors refused its key"),
            // What librados returns when cephx rejects the key it was given.
            libc::EIO => format!("{who}: the monitors did not accept its key (a wrong key?)"),
            _ => who,
        }
    }

    fn set(&self, option: &str, value: &str) -> io::Result<()> {
        let api = ffi::api().map_err(|e| other(io::ErrorKind::NotFound, e))?;
        let (c_option, c_value) = (c_string("option", option)?, c_string("value", value)?);
        // SAFETY: a created handle and two NUL-terminated strings librados copies.
        let rc = unsafe { (api.rados_conf_set)(self.handle, c_option.as_ptr(), c_value.as_ptr()) };
        check(rc, || {
            format!("cannot set the Ceph option {option}={value}")
        })?;
        Ok(())
    }

    fn get(&self, option: &str) -> io::Result<String> {
        let api = ffi::api().map_err(|e| other(io::ErrorKind::NotFound, e))?;
        let c_option = c_string("option", option)?;
        let mut buf = [0u8; 256];
        // SAFETY: a created handle, a NUL-terminated name, and a buffer of `buf.len()` bytes
        // that librados fills with a NUL-terminated value (-ENAMETOOLONG if it does not fit).
        let rc = unsafe {
            (api.rados_conf_get)(
                self.handle,
                c_option.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        check(rc, || format!("cannot read the Ceph option {option}"))?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// An I/O context on `pool`, in its `namespace` (empty: the pool's default one). A
    /// namespace that does not exist is an error here: librados would take any name and
    /// then find no image in it.
    pub fn pool(self: &Arc<Self>, pool: &str, namespace: &str) -> io::Result<Arc<Pool>> {
        let api = ffi::api().map_err(|e| other(io::ErrorKind::NotFound, e))?;
        let c_pool = c_string("pool name", pool)?;
        let c_namespace = c_string("namespace", namespace)?;
        let mut ioctx: IoCtxT = ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated name and a valid out-pointer.
        let rc = unsafe { (api.rados_ioctx_create)(self.handle, c_pool.as_ptr(), &mut ioctx) };
        if rc == -libc::ENOENT {
            return Err(other(
                io::ErrorKind::NotFound,
                format!(
                    "the Ceph cluster of {} has no pool {pool:?}",
                    self.conf.display()
                ),
            ));
        }
        check(rc, || format!("cannot open the Ceph pool {pool:?}"))?;
        // From here `pool` owns the context (destroyed on drop).
        let pool = Pool {
            ioctx,
            name: pool.to_string(),
            _cluster: Arc::clone(self),
        };
        if !namespace.is_empty() {
            pool.enter_namespace(&c_namespace, namespace)?;
        }
        Ok(Arc::new(pool))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(api) = ffi::api() {
            // SAFETY: the handle came from rados_create and no pool or image of it is
            // left (each holds an Arc of this cluster).
            unsafe { (api.rados_shutdown)(self.handle) };
        }
    }
}

/// An I/O context on one pool; keeps its cluster connected.
#[derive(Debug)]
pub struct Pool {
    ioctx: IoCtxT,
    name: String,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados I/O contexts may be shared between threads (librados.h, "thread
// safety" of rados_ioctx_t); it is destroyed only in `drop`.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    /// Checks that the namespace exists (`rbd_namespace_exists`, asked in the default
    /// namespace) and makes every later call of this context use it.
    fn enter_namespace(&self, c_namespace: &CString, namespace: &str) -> io::Result<()> {
        let api = ffi::api().map_err(|e| other(io::ErrorKind::NotFound, e))?;
        let mut exists = false;
        // SAFETY: a valid I/O context (still in the default namespace), a NUL-terminated
        // name and a valid out-pointer.
        let rc =
            unsafe { (api.rbd_namespace_exists)(self.ioctx, c_namespace.as_ptr(), &mut exists) };
        check(rc, || {
            format!(
                "cannot tell whether the pool {:?} has the namespace {namespace:?}",
                self.name
            )
        })?;
        if !exists {
            return Err(other(
                io::ErrorKind::NotFound,
                format!(
                    "the pool {:?} has no namespace {namespace:?} (`rbd namespace create \
                     {}/{namespace}` makes one)",
                    self.name, self.name
                ),
            ));
        }
        // SAFETY: a valid I/O context and a NUL-terminated name librados copies.
        unsafe { (api.rados_ioctx_set_namespace)(self.ioctx, c_namespace.as_ptr()) };
        Ok(())
    }

    pub(crate) fn ioctx(&self) -> IoCtxT {
        self.ioctx
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(api) = ffi::api() {
            // SAFETY: the context came from rados_ioctx_create; no image of it is left
            // (each holds an Arc of this pool).
            unsafe { (api.rados_ioctx_destroy)(self.ioctx) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_default() {
        let o = CephOptions {
            conf: Some("/x/ceph.conf".into()),
            id: Some("qvol".into()),
        };
        assert_eq!(o.conf_file(), PathBuf::from("/x/ceph.conf"));
        assert_eq!(o.client_id(), "qvol");
        assert_eq!(CephOptions::default().client_id(), "admin");
        let prefixed = CephOptions {
            id: Some("client.qvol".into()),
            ..CephOptions::default()
        };
        assert_eq!(prefixed.client_id(), "qvol");
    }
}
