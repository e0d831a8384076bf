//! Requests on managed files: every decision about what a lookup, open,
//! write, truncate, rename or unlink of a managed name means.
//!
//! "What happens when a CLI renames a temp file over config.yaml" is
//! [`rename_onto_managed`]; "when does the next open see a new token" is
//! [`TokenFs::open_view`] (and `view`); "what does a write do" is
//! [`ManagedHandle`] and `ManagedFile::commit`. The file's own logic
//! (templates, rendering, adoption, atomic saves) is `managed`, shared with
//! files mode; this module is what a kernel request does with it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use fuser::{FopenFlags, RenameFlags};
use parking_lot::Mutex;
use tracing::{info, warn};

use super::error::{Context as _, FsError, FsResult};
use super::inode::Node;
use super::kernel::Kernel;
use super::managed::ManagedFile;
use super::passthrough::{AttrChange, apply_meta};
use super::view::{View, Views};
use super::{Attr, Created, Entry, Handle, NO_CACHE, Opened, TokenFs, VIEW_TTL, sys};
use crate::managed::TMP_PREFIX;
use crate::secret::SecretBytes;

/// An open managed file, one variant per way it does its I/O.
pub(super) enum ManagedHandle {
    /// A reader of a view that was current at `open()`: the kernel reads
    /// the view's bytes through its page cache, kept across opens.
    Cached { view: Arc<View> },
    /// A reader through a stale view: direct I/O with the rendering that
    /// was current at `open()`.
    Direct {
        file: Arc<ManagedFile>,
        fh: u64,
        snapshot: Arc<SecretBytes>,
    },
    /// A writer: direct I/O on a private copy, saved on flush, fsync and
    /// release.
    Writer {
        file: Arc<ManagedFile>,
        fh: u64,
        buf: Mutex<WriteBuf>,
    },
}

pub(super) struct WriteBuf {
    /// May hold secrets (the rendering it started from): zeroed on drop.
    data: Vec<u8>,
    dirty: bool,
    append: bool,
}

impl Drop for WriteBuf {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data);
    }
}

/// The open-handle bookkeeping lives and dies with the handle: a cached
/// reader counts on its view (whose size must stay its own while read), a
/// direct one is known to its file (`fstat` arrives without a handle).
impl Drop for ManagedHandle {
    fn drop(&mut self) {
        match self {
            ManagedHandle::Cached { view } => view.released_cached(),
            ManagedHandle::Direct { file, fh, .. } | ManagedHandle::Writer { file, fh, .. } => {
                file.track_release(*fh)
            }
        }
    }
}

impl ManagedHandle {
    fn cached(view: &Arc<View>) -> ManagedHandle {
        view.opened_cached();
        ManagedHandle::Cached { view: view.clone() }
    }

    /// A direct reader or a writer of `m`'s current rendering, as handle
    /// `fh` of thread `tid`.
    fn direct(m: &Arc<ManagedFile>, flags: i32, fh: u64, tid: u32) -> FsResult<ManagedHandle> {
        let snapshot = m.rendering().ok_or(FsError::new(libc::ENOENT))?.bytes;
        let file = m.clone();
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            m.track_open(tid, fh, snapshot.len() as u64);
            return Ok(ManagedHandle::Direct { file, fh, snapshot });
        }
        let truncate = flags & libc::O_TRUNC != 0;
        let data = if truncate {
            Vec::new()
        } else {
            snapshot.to_vec()
        };
        m.track_open(tid, fh, data.len() as u64);
        let buf = Mutex::new(WriteBuf {
            data,
            dirty: truncate,
            append: flags & libc::O_APPEND != 0,
        });
        Ok(ManagedHandle::Writer { file, fh, buf })
    }

    pub(super) fn is_writer(&self) -> bool {
        matches!(self, ManagedHandle::Writer { .. })
    }

    /// Length of what this handle reads (its private copy for writers).
    fn len(&self) -> usize {
        match self {
            ManagedHandle::Cached { view } => view.rendering.bytes.len(),
            ManagedHandle::Direct { snapshot, .. } => snapshot.len(),
            ManagedHandle::Writer { buf, .. } => buf.lock().data.len(),
        }
    }

    #[inline]
    pub(super) fn read(&self, offset: u64, size: u32, reply: impl FnOnce(&[u8])) {
        let slice = |bytes: &[u8]| {
            let start = (offset as usize).min(bytes.len());
            let end = start.saturating_add(size as usize).min(bytes.len());
            reply(&bytes[start..end]);
        };
        match self {
            ManagedHandle::Cached { view } => slice(&view.rendering.bytes),
            ManagedHandle::Direct { snapshot, .. } => slice(snapshot),
            ManagedHandle::Writer { buf, .. } => slice(&buf.lock().data),
        }
    }

    /// Writes into the handle's private copy (`EBADF` for a reader; `EFBIG`
    /// past the file's limit, which `check_size` reports).
    pub(super) fn write(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        let ManagedHandle::Writer { file, fh, buf } = self else {
            return Err(FsError::new(libc::EBADF));
        };
        let mut w = buf.lock();
        let start = if w.append {
            w.data.len()
        } else {
            offset as usize
        };
        let end = start
            .checked_add(data.len())
            .ok_or(FsError::new(libc::EFBIG))?;
        file.check_size(end as u64)
            .map_err(|e| FsError::from(e).reported())?;
        if w.data.len() < end {
            w.data.resize(end, 0);
        }
        w.data[start..end].copy_from_slice(data);
        w.dirty = true;
        file.track_size(*fh, w.data.len() as u64);
        Ok(())
    }

    /// `ftruncate` of a writer's private copy.
    fn truncate(&self, size: u64) -> FsResult<()> {
        let ManagedHandle::Writer { file, fh, buf } = self else {
            return Err(FsError::new(libc::EBADF));
        };
        file.check_size(size)
            .map_err(|e| FsError::from(e).reported())?;
        let mut w = buf.lock();
        w.data.resize(size as usize, 0);
        w.dirty = true;
        file.track_size(*fh, size);
        Ok(())
    }

    /// A thread closed its descriptor (FLUSH): close() waits for flush but
    /// not for release, so that thread's next `fstat` must no longer be
    /// answered with this handle's size. (A forked child closing its
    /// inherited copy also flushes; only the opener's close counts.)
    pub(super) fn closed_by(&self, tid: u32) {
        match self {
            ManagedHandle::Cached { .. } => {}
            ManagedHandle::Direct { file, fh, .. } | ManagedHandle::Writer { file, fh, .. } => {
                file.track_close(*fh, tid)
            }
        }
    }

    /// Saves a writer's private copy if it changed since the last save; a
    /// save makes the file's current view old. A failure was reported by
    /// the file (log and its status).
    pub(super) fn save<K: Kernel>(&self, views: &Views<K>) -> FsResult<()> {
        let ManagedHandle::Writer { file, buf, .. } = self else {
            return Ok(());
        };
        {
            let mut w = buf.lock();
            if !w.dirty {
                return Ok(());
            }
            file.commit(&w.data)
                .map_err(|e| FsError::from(e).reported())?;
            w.dirty = false;
        }
        views.retire(file);
        Ok(())
    }

    /// SEEK_DATA/SEEK_HOLE: a rendering has no holes, data up to its end,
    /// then EOF (what `cp` asks).
    pub(super) fn seek(&self, offset: i64, whence: i32) -> FsResult<i64> {
        let len = self.len() as i64;
        match whence {
            _ if offset < 0 => Err(FsError::new(libc::EINVAL)),
            _ if offset >= len => Err(FsError::new(libc::ENXIO)),
            libc::SEEK_DATA => Ok(offset),
            libc::SEEK_HOLE => Ok(len),
            _ => Err(FsError::new(libc::EINVAL)),
        }
    }
}

impl<K: Kernel> TokenFs<K> {
    /// A managed name's entry: its current view (counted as one kernel
    /// reference), showing the file's stable `st_ino`. A current view's
    /// attributes never change, so the kernel keeps them as long as the name.
    pub(super) fn lookup_managed(&self, m: &Arc<ManagedFile>) -> FsResult<Entry> {
        let v = self.views.lookup(m).ok_or(FsError::new(libc::ENOENT))?;
        let Some(stat) = m.stat_of(&v.rendering) else {
            self.inodes.forget(v.id, 1);
            return Err(FsError::new(libc::ENOENT));
        };
        Ok(Entry {
            id: v.id,
            ino: m.id,
            stat,
            attr_ttl: VIEW_TTL,
            entry_ttl: VIEW_TTL,
        })
    }

    /// Our temp files (atomic saves in progress) are not there for anyone.
    pub(super) fn hides(&self, parent: &Node, name: &OsStr) -> bool {
        self.managed.parents.contains(&parent.key)
            && name.as_encoded_bytes().starts_with(TMP_PREFIX.as_bytes())
    }

    /// `stat` of a view, and how long the kernel may keep it. A current view
    /// is immutable; a stale one answers for its cached readers while any is
    /// open, then for whoever opens it now (a bind mount, a raced lookup).
    pub(super) fn view_attr(&self, v: &View, tid: u32, fh: Option<u64>) -> FsResult<Attr> {
        let enoent = || FsError::new(libc::ENOENT);
        let own = || v.file.stat_of(&v.rendering).ok_or_else(enoent);
        let (stat, ttl) = if v.is_current() {
            (own()?, VIEW_TTL)
        } else if v.has_cached_opens() {
            (own()?, NO_CACHE)
        } else {
            (v.file.stat(tid, fh).ok_or_else(enoent)?, NO_CACHE)
        };
        Ok(Attr {
            id: v.file.id,
            stat,
            ttl,
        })
    }

    /// A managed file was unlinked: it is absent until a program creates
    /// it again (its name then gets a new view).
    pub(super) fn unlinked_managed(&self, m: &ManagedFile) {
        info!(file = %m.core.shown.display(), "managed file unlinked; it reappears when a program creates it");
        m.set_absent();
        self.views.retire(m);
    }

    pub(super) fn managed_setattr(
        &self,
        m: &ManagedFile,
        c: &AttrChange,
        fh: Option<u64>,
    ) -> FsResult<()> {
        if !m.is_present() {
            return Err(FsError::new(libc::ENOENT));
        }
        if let Some(size) = c.size {
            self.managed_truncate(m, size, fh)?;
        }
        if c.changes_meta() {
            let fd = sys::open_path(m.dir.fd(), &m.name).context("open")?;
            apply_meta(fd.as_fd(), c, false)?;
            m.refresh_stat().context("fstat")?;
            // The current view's cached mode and times are now old.
            self.views.retire(m);
        }
        Ok(())
    }

    /// `ftruncate` through a writer changes its private copy; `truncate(2)`
    /// by path (or through a reader) applies to what readers see now.
    fn managed_truncate(&self, m: &ManagedFile, size: u64, fh: Option<u64>) -> FsResult<()> {
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        if let Some(Handle::Managed(mh)) = handle.as_deref() {
            if mh.is_writer() {
                return mh.truncate(size);
            }
        }
        m.check_size(size)
            .map_err(|e| FsError::from(e).reported())?;
        let mut bytes = m.rendering().map(|r| r.bytes.to_vec()).unwrap_or_default();
        bytes.resize(size as usize, 0);
        let bytes = SecretBytes::new(bytes);
        m.commit(&bytes).map_err(|e| FsError::from(e).reported())?;
        self.views.retire(m);
        Ok(())
    }

    /// Refuses to make a managed name into something else (a directory, a
    /// symlink, a device, a hard link).
    pub(super) fn not_managed_name(&self, parent: &Node, name: &OsStr) -> FsResult<()> {
        match self.managed.find(parent, name) {
            Some(m) if m.is_present() => Err(FsError::new(libc::EEXIST)),
            Some(_) => Err(FsError::new(libc::EPERM)),
            None => Ok(()),
        }
    }

    /// Renames that involve at most one managed name and do not wait on
    /// the disk (`managed`: the managed files `name` and `newname` are).
    pub(super) fn rename_now(
        &self,
        (p, name): (&Node, &OsStr),
        (np, newname): (&Node, &OsStr),
        flags: RenameFlags,
        managed: (Option<Arc<ManagedFile>>, Option<Arc<ManagedFile>>),
    ) -> FsResult<()> {
        let (c_old, c_new) = (sys::cname(name)?, sys::cname(newname)?);
        let rename = || sys::rename_at(p.fd(), &c_old, np.fd(), &c_new, flags.bits());
        match managed {
            (None, None) => rename().context("rename"),
            (None, Some(dst)) => rename_onto_managed(p, name, &dst, flags, &self.views),
            (Some(_), None) if flags.contains(RenameFlags::RENAME_EXCHANGE) => {
                Err(FsError::new(libc::EXDEV))
            }
            (Some(src), None) => {
                let view = self.views.current_id(&src);
                rename().context("rename")?;
                info!(file = %src.core.shown.display(), "managed file renamed away (its copy keeps the placeholders); it reappears when a program creates it");
                src.set_absent();
                self.views.retire(&src);
                if let Some(id) = view {
                    self.view_becomes_plain(id, np, &c_new);
                }
                Ok(())
            }
            (Some(a), Some(b)) if Arc::ptr_eq(&a, &b) => Ok(()),
            // Two managed files: let the program fall back to copy + unlink,
            // which goes through the normal write path.
            (Some(_), Some(_)) => Err(FsError::new(libc::EXDEV)),
        }
    }

    /// After a managed file was renamed to `dir`/`name`, the kernel's dentry
    /// of that name still points at the file's view `id`: the node id now
    /// names the plain file (its placeholder copy). If that fails the name
    /// shows ENOENT until the kernel looks it up again.
    fn view_becomes_plain(&self, id: u64, dir: &Node, name: &std::ffi::CStr) {
        let opened = sys::open_path(dir.fd(), name)
            .and_then(|fd| sys::stat_fd(fd.as_fd()).map(|st| (fd, st)));
        match opened {
            Ok((fd, st)) => {
                self.inodes.become_plain(id, fd, &st);
            }
            Err(e) => {
                warn!(mount = %self.dir.display(), "a managed file renamed away: cannot follow its new name: {e}")
            }
        }
    }

    /// Opens a view. A reader of the current view reads its bytes through
    /// the page cache (kept across opens: the view never changes). Anyone
    /// else — a writer, or a reader of a view a rotation replaced — gets
    /// direct I/O with a private copy of the current rendering.
    pub(super) fn open_view(
        &self,
        v: &Arc<View>,
        flags: i32,
        tid: u32,
    ) -> FsResult<Opened<K::Backing>> {
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY;
        if read_only && v.is_current() {
            let fh = self.add_handle(Handle::Managed(ManagedHandle::cached(v)));
            // A reader has nothing to commit at close: no FLUSH round trip.
            let flags = FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH;
            return Ok(self::opened(fh, flags));
        }
        if !read_only {
            // Its bytes will change: new readers must not share its cache.
            self.views.retire(&v.file);
        } else {
            self.views.forget_name(v);
        }
        let fh = self.open_managed(&v.file, flags, tid)?;
        let mut flags = FopenFlags::FOPEN_DIRECT_IO;
        if read_only {
            flags |= FopenFlags::FOPEN_NOFLUSH;
        }
        Ok(self::opened(fh, flags))
    }

    fn open_managed(&self, m: &Arc<ManagedFile>, flags: i32, tid: u32) -> FsResult<u64> {
        let fh = self.new_fh();
        let h = ManagedHandle::direct(m, flags, fh, tid)?;
        self.insert_handle(fh, Handle::Managed(h));
        Ok(fh)
    }

    /// `creat` on a managed name: creates it if absent; the creator writes
    /// through direct I/O, and the name is looked up again next time
    /// (entry TTL 0), finding the view of what it saved.
    pub(super) fn create_managed(
        &self,
        m: &Arc<ManagedFile>,
        mode: u32,
        flags: i32,
        tid: u32,
    ) -> FsResult<Created<K::Backing>> {
        if m.is_present() {
            if flags & libc::O_EXCL != 0 {
                return Err(FsError::new(libc::EEXIST));
            }
        } else {
            m.create_empty(mode).context("create")?;
            info!(file = %m.core.shown.display(), "managed file created by a program");
        }
        let fh = self.open_managed(m, flags, tid)?;
        let view = self.views.lookup(m);
        let st = view.as_ref().and_then(|v| m.stat_of(&v.rendering));
        let (Some(v), Some(stat)) = (view, st) else {
            self.handles.lock().remove(&fh);
            return Err(FsError::new(libc::ENOENT));
        };
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.views.retire(m);
        }
        let entry = Entry {
            id: v.id,
            ino: m.id,
            stat,
            attr_ttl: NO_CACHE,
            entry_ttl: NO_CACHE,
        };
        let open = self::opened(fh, FopenFlags::FOPEN_DIRECT_IO);
        Ok(Created { entry, open })
    }
}

fn opened<B>(fh: u64, flags: FopenFlags) -> Opened<B> {
    Opened {
        fh,
        flags,
        backing: None,
    }
}

/// The atomic-save pattern: a program wrote a temp file and renames it
/// over a managed file. The temp file's bytes are committed as a write
/// (secrets become placeholders) and the temp file is removed, so the
/// managed file keeps its inode and no token lands on disk.
///
/// The kernel then moves its cached name of the temp file onto the managed
/// name, still pointing at the temp file's node until the invalidation of
/// the name arrives: that node becomes a stale view of the managed file, so
/// even an open in that instant gets the rendering. (A temp file with other
/// hard links keeps its node; such names are never cached, see `entry_ttl`.)
pub(super) fn rename_onto_managed<K: Kernel>(
    p: &Node,
    name: &OsStr,
    dst: &Arc<ManagedFile>,
    flags: RenameFlags,
    views: &Views<K>,
) -> FsResult<()> {
    if flags.contains(RenameFlags::RENAME_EXCHANGE) {
        return Err(FsError::new(libc::EXDEV));
    }
    if flags.contains(RenameFlags::RENAME_NOREPLACE) && dst.is_present() {
        return Err(FsError::new(libc::EEXIST));
    }
    let c = sys::cname(name)?;
    let st = sys::stat_name(p.fd(), &c).context("stat")?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(FsError::new(libc::EISDIR)),
        _ => return Err(FsError::new(libc::EXDEV)),
    }
    dst.check_size(st.st_size.max(0) as u64)
        .map_err(|e| FsError::from(e).reported())?;
    let bytes = read_whole(p, &c, st.st_size.max(0) as usize).context("read")?;
    dst.commit(&bytes)
        .map_err(|e| FsError::from(e).reported())?;
    views.retire(dst);
    if let Err(e) = sys::unlink_at(p.fd(), &c, 0) {
        warn!(file = %dst.core.shown.display(), "saved, but could not remove the renamed temp file: {e}");
    }
    if st.st_nlink == 1 {
        views.alias((st.st_dev, st.st_ino), dst);
    }
    Ok(())
}

/// The bytes of `dir`/`name` (a program's temp file: may hold secrets).
fn read_whole(dir: &Node, name: &std::ffi::CStr, size: usize) -> io::Result<SecretBytes> {
    let fd = sys::open_at(dir.fd(), name, libc::O_RDONLY, 0)?;
    let mut bytes = Vec::with_capacity(size);
    io::Read::read_to_end(&mut File::from(fd), &mut bytes)?;
    Ok(SecretBytes::new(bytes))
}
