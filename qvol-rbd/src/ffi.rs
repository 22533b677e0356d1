//! librados and librbd, loaded at run time with `dlopen` (the `libloading` crate), so that
//! qvol builds and runs without Ceph's libraries and only `rbd:` images need them.
//!
//! Only the C API functions qvol calls are bound, with the signatures of
//! `<rados/librados.h>` and `<rbd/librbd.h>` as Ceph 16 (pacific, librbd 1.16) ships them;
//! every one of them exists since librbd 1.12 (Ceph 14, where namespaces came). The libraries stay loaded for the
//! life of the process (Ceph's libraries do not support being unloaded).

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`: a cluster handle.
pub(crate) type RadosT = *mut c_void;
/// `rados_ioctx_t`: a pool I/O context.
pub(crate) type IoCtxT = *mut c_void;
/// `rbd_image_t`: an open image.
pub(crate) type ImageT = *mut c_void;
/// `rbd_completion_t`: an asynchronous request's completion.
pub(crate) type CompletionT = *mut c_void;

/// `RBD_LOCK_MODE_EXCLUSIVE` of `rbd_lock_mode_t` (librbd.h).
pub(crate) const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

/// The file names `dlopen` looks for (the sonames Debian's `librados2` and `librbd1` ship).
pub(crate) const LIBRADOS: &str = "librados.so.2";
/// See [`LIBRADOS`].
pub(crate) const LIBRBD: &str = "librbd.so.1";

macro_rules! api {
    ($( $lib:ident : $name:ident : fn($($arg:ty),*) -> $ret:ty; )*) => {
        /// The bound functions.
        #[allow(clippy::type_complexity)]
        pub(crate) struct Api {
            $( pub(crate) $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
        }

        impl Api {
            fn load(rados: &Library, rbd: &Library) -> Result<Self, String> {
                Ok(Api {
                    $( $name: {
                        let lib = if stringify!($lib) == "rados" { rados } else { rbd };
                        // SAFETY: the symbol is a function of the C API with exactly this
                        // signature (librados.h / librbd.h of librbd 1.12 and later); the
                        // library stays loaded for the life of the process (LIBS), so the
                        // pointer stays valid.
                        let sym = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                        };
                        *sym.map_err(|e| format!(
                            "{} lacks {}: {e}", stringify!($lib), stringify!($name)
                        ))?
                    }, )*
                })
            }
        }
    };
}

api! {
    rados: rados_create: fn(*mut RadosT, *const c_char) -> c_int;
    rados: rados_conf_read_file: fn(RadosT, *const c_char) -> c_int;
    rados: rados_conf_get: fn(RadosT, *const c_char, *mut c_char, usize) -> c_int;
    rados: rados_conf_set: fn(RadosT, *const c_char, *const c_char) -> c_int;
    rados: rados_connect: fn(RadosT) -> c_int;
    rados: rados_shutdown: fn(RadosT) -> ();
    rados: rados_ioctx_create: fn(RadosT, *const c_char, *mut IoCtxT) -> c_int;
    rados: rados_ioctx_destroy: fn(IoCtxT) -> ();
    rados: rados_ioctx_set_namespace: fn(IoCtxT, *const c_char) -> ();
    rbd: rbd_namespace_exists: fn(IoCtxT, *const c_char, *mut bool) -> c_int;
    rbd: rbd_create2: fn(IoCtxT, *const c_char, u64, u64, *mut c_int) -> c_int;
    rbd: rbd_remove: fn(IoCtxT, *const c_char) -> c_int;
    rbd: rbd_open: fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd: rbd_open_read_only: fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd: rbd_close: fn(ImageT) -> c_int;
    rbd: rbd_get_size: fn(ImageT, *mut u64) -> c_int;
    rbd: rbd_resize: fn(ImageT, u64) -> c_int;
    rbd: rbd_read2: fn(ImageT, u64, usize, *mut c_char, c_int) -> isize;
    rbd: rbd_write2: fn(ImageT, u64, usize, *const c_char, c_int) -> isize;
    rbd: rbd_aio_create_completion: fn(*mut c_void, *const c_void, *mut CompletionT) -> c_int;
    rbd: rbd_aio_write: fn(ImageT, u64, usize, *const c_char, CompletionT) -> c_int;
    rbd: rbd_aio_read: fn(ImageT, u64, usize, *mut c_char, CompletionT) -> c_int;
    rbd: rbd_aio_wait_for_complete: fn(CompletionT) -> c_int;
    rbd: rbd_aio_get_return_value: fn(CompletionT) -> isize;
    rbd: rbd_aio_release: fn(CompletionT) -> ();
    rbd: rbd_write_zeroes: fn(ImageT, u64, usize, c_int, c_int) -> isize;
    rbd: rbd_flush: fn(ImageT) -> c_int;
    rbd: rbd_lock_acquire: fn(ImageT, c_int) -> c_int;
    rbd: rbd_lock_get_owners: fn(ImageT, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd: rbd_lock_get_owners_cleanup: fn(*mut *mut c_char, usize) -> ();
    rbd: rbd_lock_break: fn(ImageT, c_int, *const c_char) -> c_int;
    rbd: rbd_list_lockers: fn(
        ImageT, *mut c_int, *mut c_char, *mut usize, *mut c_char, *mut usize, *mut c_char,
        *mut usize, *mut c_char, *mut usize
    ) -> isize;
}

struct Libs {
    api: Api,
    // Kept so that the function pointers in `api` stay valid; never dropped (a static).
    _rados: Library,
    _rbd: Library,
}

static LIBS: OnceLock<Result<Libs, String>> = OnceLock::new();

/// The bound API, loading the libraries on first use; the error is one sentence.
pub(crate) fn api() -> Result<&'static Api, String> {
    LIBS.get_or_init(load)
        .as_ref()
        .map(|libs| &libs.api)
        .map_err(Clone::clone)
}

fn load() -> Result<Libs, String> {
    load_from(LIBRADOS, LIBRBD)
}

fn load_from(librados: &str, librbd: &str) -> Result<Libs, String> {
    let open = |name: &str, package: &str| {
        // SAFETY: loading Ceph's libraries runs their initialisers, which only set up
        // their own state; nothing else in this process depends on that.
        unsafe { Library::new(name) }.map_err(|e| {
            log::debug!("dlopen {name}: {e}");
            format!("{name} not found: install {package} to use rbd: images")
        })
    };
    let rados = open(librados, "librados2")?;
    let rbd = open(librbd, "librbd1")?;
    let api = Api::load(&rados, &rbd)?;
    Ok(Libs {
        api,
        _rados: rados,
        _rbd: rbd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_one_sentence_naming_the_package() {
        let err = load_from("librados-absent.so.2", LIBRBD).err().unwrap();
        assert_eq!(
            err,
            "librados-absent.so.2 not found: install librados2 to use rbd: images"
        );
        let err = load_from(LIBRADOS, "librbd-absent.so.1").err();
        // Without Ceph's libraries the first one fails; either way the sentence names the
        // missing one and its package.
        let err = err.unwrap();
        assert!(err.ends_with("to use rbd: images"), "{err}");
    }
}
