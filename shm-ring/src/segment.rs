//! A segment: one shared mapping per connection, holding a header, one wake
//! cell per side, and two rings (app→proxy, proxy→app).
//!
//! ```text
//! 0      SegmentHeader (256 bytes, bytemuck::Pod)
//! 256    WakeCell of the app     (128)
//! 384    WakeCell of the proxy   (128)
//! 512    RingCtl app→proxy       (256)
//! 768    RingCtl proxy→app       (256)
//! 4096   data app→proxy          (capacity[0])
//! ...    data proxy→app          (capacity[1])
//! ```
//!
//! The creator (the proxy) writes the header once and never reads it back:
//! it trusts only its own copy of the layout. The opener validates every
//! field before it maps anything else.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use memmap2::MmapRaw;

use crate::doorbell::{pair_on, Bell, Notifier, Waiter, WakeCell};
use crate::error::SegmentError;
use crate::ring::{Consumer, Producer, RawRing, RingCtl, MIN_CAPACITY};

/// Magic bytes at offset 0 of every segment.
pub const MAGIC: [u8; 8] = *b"MESHSHM\0";
/// Layout version this build understands.
pub const LAYOUT_VERSION: u32 = 1;
/// Default largest message (reassembled), 64 MiB.
pub const DEFAULT_MAX_MESSAGE: u64 = 64 << 20;
/// Largest ring capacity accepted (1 GiB).
pub const MAX_CAPACITY: usize = 1 << 30;

const HEADER_LEN: u64 = 256;
const WAKE_OFF: [u64; 2] = [256, 384];
const CTL_OFF: [u64; 2] = [512, 768];
const DATA_START: u64 = 4096;

/// The segment header, as laid out at offset 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct SegmentHeader {
    /// [`MAGIC`]
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`]
    pub version: u32,
    /// size of this header (256)
    pub header_len: u32,
    /// size of the whole mapping
    pub segment_len: u64,
    /// largest reassembled message either side accepts
    pub max_message: u64,
    /// offsets of the wake cells, [app, proxy]
    pub wake_offset: [u64; 2],
    /// offsets of the ring counters, [app→proxy, proxy→app]
    pub ctl_offset: [u64; 2],
    /// offsets of the data areas
    pub data_offset: [u64; 2],
    /// data-area sizes (powers of two)
    pub capacity: [u64; 2],
    /// zero
    pub reserved: [u64; 20],
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() == HEADER_LEN as usize);
const _: () = assert!(std::mem::size_of::<WakeCell>() <= 128);
const _: () = assert!(std::mem::size_of::<RingCtl>() <= 256);

impl SegmentHeader {
    fn for_sizes(cap: [usize; 2], max_message: u64) -> Self {
        let d0 = DATA_START;
        let d1 = d0 + cap[0] as u64;
        SegmentHeader {
            magic: MAGIC,
            version: LAYOUT_VERSION,
            header_len: HEADER_LEN as u32,
            segment_len: d1 + cap[1] as u64,
            max_message,
            wake_offset: WAKE_OFF,
            ctl_offset: CTL_OFF,
            data_offset: [d0, d1],
            capacity: [cap[0] as u64, cap[1] as u64],
            reserved: [0; 20],
        }
    }

    /// Check every field against what this version lays out for the same
    /// capacities, and against the real size of the mapping.
    pub fn validate(&self, mapped_len: u64) -> Result<(), SegmentError> {
        let bad = |m: String| Err(SegmentError::Invalid(m));
        if self.magic != MAGIC {
            return bad(format!("bad magic {:02x?}", self.magic));
        }
        if self.version != LAYOUT_VERSION {
            return bad(format!(
                "layout version {} (this build understands {LAYOUT_VERSION})",
                self.version
            ));
        }
        for c in self.capacity {
            if c > MAX_CAPACITY as u64 || !valid_capacity(c as usize) {
                return bad(format!("ring capacity {c} is not a power of two in range"));
            }
        }
        let expect = SegmentHeader::for_sizes(
            [self.capacity[0] as usize, self.capacity[1] as usize],
            self.max_message,
        );
        if bytemuck::bytes_of(self) != bytemuck::bytes_of(&expect) {
            return bad("offsets or sizes do not match the layout".into());
        }
        if self.segment_len != mapped_len {
            return bad(format!(
                "header says {} bytes, mapping has {mapped_len}",
                self.segment_len
            ));
        }
        if self.max_message == 0 {
            return bad("max_message is 0".into());
        }
        Ok(())
    }
}

fn valid_capacity(c: usize) -> bool {
    c.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&c)
}

/// Where a segment's memory comes from.
#[derive(Debug, Clone)]
pub enum Backing {
    /// An anonymous memfd: no name ever exists, nothing can be left behind.
    Memfd,
    /// A file in a tmpfs directory (normally `/dev/shm`), created 0600 with a
    /// unique `meshshm-<pid>-<n>` name, unlinked by [`Segment::unlink`] or
    /// on drop.
    Dir(PathBuf),
}

/// Sizes of a new segment.
#[derive(Debug, Clone)]
pub struct SegmentOptions {
    /// app→proxy data-area size (power of two)
    pub app_to_proxy: usize,
    /// proxy→app data-area size (power of two)
    pub proxy_to_app: usize,
    /// largest reassembled message
    pub max_message: u64,
    /// memfd or named file
    pub backing: Backing,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            app_to_proxy: 1 << 20,
            proxy_to_app: 1 << 20,
            max_message: DEFAULT_MAX_MESSAGE,
            backing: Backing::Memfd,
        }
    }
}

/// Which end of the segment a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// produces ring 0 (app→proxy), consumes ring 1
    App,
    /// produces ring 1 (proxy→app), consumes ring 0
    Proxy,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::App => 0,
            Side::Proxy => 1,
        }
    }
}

struct Mapping {
    map: MmapRaw,
}

// SAFETY: the mapping is shared memory reached only through raw pointers
// whose accesses follow the ring and doorbell protocols (atomics for every
// word both sides write, disjoint byte ranges for data).
unsafe impl Sync for Mapping {}
// SAFETY: as above; a mapping is not tied to a thread.
unsafe impl Send for Mapping {}

/// A mapped segment, before it is split into an [`Endpoint`].
pub struct Segment {
    map: Arc<Mapping>,
    file: File,
    header: SegmentHeader,
    name: Option<PathBuf>,
}

static SEQ: StdAtomicU64 = StdAtomicU64::new(0);

impl Segment {
    /// Create, size and map a new zeroed segment and write its header.
    ///
    /// # Errors
    /// Bad sizes, or a failing memfd/open/ftruncate/mmap.
    pub fn create(opts: &SegmentOptions) -> Result<Segment, SegmentError> {
        let cap = [opts.app_to_proxy, opts.proxy_to_app];
        for c in cap {
            if !valid_capacity(c) {
                return Err(SegmentError::Options(format!(
                    "ring capacity {c} must be a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}"
                )));
            }
        }
        if opts.max_message == 0 || opts.max_message > u32::MAX as u64 {
            return Err(SegmentError::Options(
                "max_message must be in 1..=4 GiB-1".into(),
            ));
        }
        let header = SegmentHeader::for_sizes(cap, opts.max_message);
        let (file, name) = match &opts.backing {
            Backing::Memfd => (memfd()?, None),
            Backing::Dir(dir) => {
                let name = dir.join(format!(
                    "meshshm-{}-{}",
                    std::process::id(),
                    SEQ.fetch_add(1, StdOrdering::Relaxed)
                ));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&name)
                    .map_err(|e| SegmentError::io("create segment file", e))?;
                (f, Some(name))
            }
        };
        file.set_len(header.segment_len)
            .map_err(|e| SegmentError::io("size segment", e))?;
        let map = MmapRaw::map_raw(&file).map_err(|e| SegmentError::io("map segment", e))?;
        let seg = Segment {
            map: Arc::new(Mapping { map }),
            file,
            header,
            name,
        };
        let bytes = bytemuck::bytes_of(&header);
        // SAFETY: the mapping is at least segment_len >= 4096 bytes, freshly
        // created and zeroed, and not yet shared with anyone.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), seg.map.map.as_mut_ptr(), bytes.len())
        };
        Ok(seg)
    }

    /// Map a segment received from the creator and validate its header.
    ///
    /// # Errors
    /// [`SegmentError::Invalid`] for any mismatch; I/O errors from fstat/mmap.
    pub fn open(fd: OwnedFd) -> Result<Segment, SegmentError> {
        let file = File::from(fd);
        let len = file
            .metadata()
            .map_err(|e| SegmentError::io("stat segment", e))?
            .len();
        if len < DATA_START {
            return Err(SegmentError::Invalid(format!(
                "segment of {len} bytes is too small"
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| SegmentError::io("map segment", e))?;
        let mut header = SegmentHeader::zeroed();
        // SAFETY: the mapping holds at least DATA_START > 256 bytes; the
        // header is copied out once and only the copy is checked and used.
        unsafe {
            std::ptr::copy_nonoverlapping(
                map.as_ptr(),
                bytemuck::bytes_of_mut(&mut header).as_mut_ptr(),
                HEADER_LEN as usize,
            )
        };
        header.validate(map.len() as u64)?;
        Ok(Segment {
            map: Arc::new(Mapping { map }),
            file,
            header,
            name: None,
        })
    }

    /// The header (this process's validated copy).
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// The fd, to pass to the peer (SCM_RIGHTS).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The file name, for a named segment not yet unlinked.
    pub fn path(&self) -> Option<&Path> {
        self.name.as_deref()
    }

    /// Remove the name (both sides hold the fd or the mapping now).
    pub fn unlink(&mut self) {
        if let Some(n) = self.name.take() {
            let _ = std::fs::remove_file(n);
        }
    }

    /// Split into this side's producer, consumer and doorbells. `mine` is
    /// the bell this side sleeps on, `peer` the one that wakes the other side.
    pub fn into_endpoint(mut self, side: Side, mine: Bell, peer: Bell) -> Endpoint {
        self.unlink();
        let base = self.map.map.as_mut_ptr();
        let owner: Arc<dyn Send + Sync> = self.map.clone();
        let h = self.header;
        let at = |off: u64| {
            // SAFETY: every offset comes from a header equal to
            // `for_sizes(...)` (created here or validated in open), so it lies
            // inside the mapping, which `owner` keeps alive.
            NonNull::new(unsafe { base.add(off as usize) }).expect("mapping is non-null")
        };
        let ring = |i: usize| {
            // SAFETY: ctl_offset[i] is 256-aligned inside the mapping (page
            // aligned base), data_offset[i]..+capacity[i] is inside it, and
            // capacity is a valid power of two (validated).
            unsafe {
                RawRing::new(
                    at(h.ctl_offset[i]).cast(),
                    at(h.data_offset[i]),
                    h.capacity[i] as usize,
                    owner.clone(),
                )
            }
        };
        let me = side.index();
        let other = 1 - me;
        let (waiter, _) = pair_on(at(h.wake_offset[me]).cast(), owner.clone(), mine);
        let (_, notifier) = pair_on(at(h.wake_offset[other]).cast(), owner.clone(), peer);
        Endpoint {
            tx: Producer::new(ring(me)),
            rx: Consumer::new(ring(other)),
            waiter,
            peer: notifier,
            max_message: h.max_message,
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

fn memfd() -> Result<File, SegmentError> {
    // SAFETY: the name is a NUL-terminated literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"meshshm".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(SegmentError::io(
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is fresh and owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Remove `meshshm-<pid>-*` files in `dir` whose creating process is gone
/// (left by a creator killed between create and unlink). Returns how many.
pub fn sweep_stale(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|s| s.strip_prefix("meshshm-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// One side of a connected segment: what it sends, what it receives, and
/// its doorbells.
pub struct Endpoint {
    /// this side's outgoing ring
    pub tx: Producer,
    /// this side's incoming ring
    pub rx: Consumer,
    /// sleep here when there is nothing to read (or no room to write)
    pub waiter: Waiter,
    /// wake the other side after publishing
    pub peer: Notifier,
    /// largest reassembled message
    pub max_message: u64,
}

impl Endpoint {
    /// Publish staged frames and releases, and wake the peer if it sleeps.
    pub fn flush(&mut self) {
        let a = self.tx.publish();
        let b = self.rx.publish();
        if a {
            self.peer.notify();
        } else if b {
            // Only room was freed: wake the peer only if it waits for room.
            self.peer.notify_room();
        }
    }
}
