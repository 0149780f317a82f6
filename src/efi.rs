//! ksave started by UEFI firmware as `ksave.efi` (docs/UEFI.md): the same
//! image as ksave.elf, loaded by the firmware at ksave's own address
//! (tools/src/efiimage.rs).
//!
//! While the firmware runs, ksave decides: it reads the image's header and
//! metadata through the firmware's Block I/O (its own drivers would take
//! the controllers from under the firmware's, which the next loader still
//! needs) and asks every question a bootloader start asks: the RAM and
//! ACPI NVS maps, from the UEFI memory map as Linux's EFI stub turns it
//! into the e820 map the saved kernel saw; the hardware signature; the
//! store's claim; the file systems. Nothing is written to any disk. Any
//! refusal, or any doubt, starts the next loader (`ksave.next=PATH` on
//! the ESP) or, without one, returns to the boot manager, which tries the
//! next `Boot####` entry.
//!
//! Only then does it leave boot services and resume the way a bootloader
//! start does ([`crate::boot::run_uefi`]), with its own drivers, at the
//! disk's speed. A refusal there (one the firmware's view could not
//! foresee, such as a controller ksave does not drive) can only reset; the
//! image's identity, kept in a firmware variable before leaving, makes the
//! next start hand that image to the next loader instead of trying again.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use bootinfo::memmap::MemoryMap;
use bootinfo::acpi;
use diskdrv::{BlockDevice, Direction, DiskError, DiskInfo, Segment};
use uefi_raw::protocol::block::{BlockIoMedia, BlockIoProtocol};
use uefi_raw::protocol::device_path::{DevicePathProtocol, DeviceSubType, DeviceType};
use uefi_raw::protocol::loaded_image::LoadedImageProtocol;
use uefi_raw::table::boot::{BootServices, MemoryDescriptor};
use uefi_raw::table::runtime::{RuntimeServices, VariableAttributes};
use uefi_raw::table::system::SystemTable;
use uefi_raw::{Boolean, Guid, Handle, Status, guid};

use crate::boot::Mode;
use crate::physmem::IdentityMapped;
use crate::work::Exclusive;
use crate::{cmdline, heap, hw, println, resume};

/// ACPI 2.0+ and 1.0 RSDP entries of the configuration table (UEFI 2.10, 4.6.1.1).
const ACPI_20_TABLE: Guid = guid!("8868e871-e4f1-11d3-bc22-0080c73c8881");
const ACPI_10_TABLE: Guid = guid!("eb9d2d30-2d88-11d3-9a16-0090273fc14d");

/// ksave's firmware variables (docs/UEFI.md): `KsaveRefusal`, why the last
/// start did not resume, for the booted system's log; `KsaveTried`, the
/// identity of the image a start left the firmware to resume.
pub const VENDOR: Guid = guid!("6b5f3a1e-8c1d-4e0f-9b7a-5d2c4e6f8a01");

/// What ksave.efi carries from the firmware's world into ksave's. In
/// .data: the take-over clears bss, as every entry does.
pub struct Handover {
    /// The load options, as ASCII.
    cmdline: [u8; 1024],
    cmdline_len: usize,
    /// The memory map at ExitBootServices, in e820 kinds.
    pub map: MemoryMap,
    /// The ACPI RSDP's root tables.
    pub rsdp: Option<(u32, u64)>,
}

impl Handover {
    /// The load options.
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}

/// The one [`Handover`], written by ksave.efi before it leaves the firmware
/// and read by the entry after.
struct HandoverCell(UnsafeCell<Handover>);

// SAFETY: ksave runs on one CPU, and the two entries that use the hand-over
// run one after the other.
unsafe impl Sync for HandoverCell {}

#[unsafe(link_section = ".data.handover")]
static HANDOVER: HandoverCell = HandoverCell(UnsafeCell::new(Handover { cmdline: [0; 1024], cmdline_len: 0, map: MemoryMap::new(), rsdp: None }));

/// The firmware's memory map, as GetMemoryMap writes it.
#[repr(C, align(8))]
struct MapBuffer([u8; 48 * 1024]);
static MAP_BUFFER: Exclusive<MapBuffer> = Exclusive::new(MapBuffer([0; 48 * 1024]));

unsafe extern "C" {
    /// asm/entry.s: ksave's GDT, page tables and stack, then
    /// `ksave_main(ENTRY_UEFI, handover)`.
    fn ksave_efi_take_over(handover: u64) -> !;
}

/// The firmware, while its boot services run: every call goes through
/// here.
#[derive(Clone, Copy)]
struct Firmware {
    image: Handle,
    system: *const SystemTable,
}

impl Firmware {
    fn boot(&self) -> &BootServices {
        // SAFETY: the system table the firmware passed, whose boot services
        // stay valid until ExitBootServices, after which no Firmware is used.
        unsafe { &*(*self.system).boot_services }
    }

    fn runtime(&self) -> &RuntimeServices {
        // SAFETY: as for boot(); runtime services stay callable throughout.
        unsafe { &*(*self.system).runtime_services }
    }

    /// The protocol `guid` on `handle`, if it has it.
    fn protocol<T>(&self, handle: Handle, guid: &Guid) -> Option<*mut T> {
        let mut out: *mut c_void = ptr::null_mut();
        // SAFETY: HandleProtocol (UEFI 2.10, 7.3.7) writes the interface's
        // address into `out` and nothing else.
        let status = unsafe { (self.boot().handle_protocol)(handle, guid, &mut out) };
        (status.is_success() && !out.is_null()).then_some(out.cast())
    }

    /// The image's load options (the `Boot####` entry's optional data, GRUB's
    /// `chainloader` arguments, systemd-boot's `options`), UCS-2 cut to
    /// ASCII, into `out`.
    fn load_options<'o>(&self, out: &'o mut [u8], len: &mut usize) -> &'o str {
        let Some(loaded) = self.protocol::<LoadedImageProtocol>(self.image, &LoadedImageProtocol::GUID) else { return "" };
        // SAFETY: the firmware's loaded-image protocol of this image; its
        // load options are `load_options_size` bytes at `load_options`.
        let (at, size) = unsafe { ((*loaded).load_options.cast::<u16>(), (*loaded).load_options_size as usize / 2) };
        let mut n = 0;
        for i in 0..if at.is_null() { 0 } else { size } {
            // SAFETY: i < size, inside the options.
            let c = unsafe { at.add(i).read_unaligned() };
            if c == 0 || n == out.len() {
                break;
            }
            out[n] = if (0x20..0x7f).contains(&c) { c as u8 } else { b' ' };
            n += 1;
        }
        *len = n;
        core::str::from_utf8(&out[..n]).unwrap_or("")
    }

    /// The firmware's memory map into `buf`: its descriptors' bytes, the
    /// descriptor size, and the key ExitBootServices wants.
    fn memory_map<'b>(&self, buf: &'b mut MapBuffer) -> Result<(&'b [u8], usize, usize), Status> {
        let (mut size, mut key, mut desc_size, mut version) = (buf.0.len(), 0usize, 0usize, 0u32);
        // SAFETY: GetMemoryMap (UEFI 2.10, 7.2.3) writes at most `size` bytes
        // into the buffer and the four outputs.
        let status = unsafe { (self.boot().get_memory_map)(&mut size, buf.0.as_mut_ptr().cast(), &mut key, &mut desc_size, &mut version) };
        if status.is_error() || desc_size < size_of::<MemoryDescriptor>() {
            return Err(status);
        }
        Ok((&buf.0[..size], desc_size, key))
    }

    /// The ACPI RSDP from the configuration table.
    fn rsdp(&self) -> Option<(u32, u64)> {
        // SAFETY: the system table's configuration table: that many entries.
        let tables = unsafe { core::slice::from_raw_parts((*self.system).configuration_table, (*self.system).number_of_configuration_table_entries) };
        [ACPI_20_TABLE, ACPI_10_TABLE].iter().find_map(|guid| {
            let at = tables.iter().find(|t| t.vendor_guid == *guid)?.vendor_table as u64;
            acpi::find_rsdp(&IdentityMapped, at, at + 16)
        })
    }

    /// Every whole disk the firmware reads (Block I/O on a handle that is
    /// not a partition), present media only.
    fn disks(&self, mut f: impl FnMut(FirmwareDisk) -> bool) {
        let (mut count, mut handles): (usize, *mut Handle) = (0, ptr::null_mut());
        // SAFETY: LocateHandleBuffer (UEFI 2.10, 7.3.15) ByProtocol (2)
        // allocates the handle array from pool and writes its address and
        // length; it is freed below.
        let status = unsafe { (self.boot().locate_handle_buffer)(2, &BlockIoProtocol::GUID, ptr::null(), &mut count, &mut handles) };
        if status.is_error() || handles.is_null() {
            return;
        }
        for i in 0..count {
            // SAFETY: i < count, inside the array the firmware wrote.
            let handle = unsafe { *handles.add(i) };
            let Some(io) = self.protocol::<BlockIoProtocol>(handle, &BlockIoProtocol::GUID) else { continue };
            // SAFETY: a Block I/O protocol's media (UEFI 2.10, 13.9).
            if let Some(disk) = unsafe { FirmwareDisk::new(io) }
                && f(disk)
            {
                break;
            }
        }
        // SAFETY: the array LocateHandleBuffer allocated, used no more.
        let _ = unsafe { (self.boot().free_pool)(handles.cast()) };
    }

    fn variable(&self, name: &str, buf: &mut [u8]) -> Option<usize> {
        let name = Ucs2::<32>::from(name);
        let (mut attributes, mut size) = (VariableAttributes::empty(), buf.len());
        // SAFETY: GetVariable (UEFI 2.10, 8.2.1) writes at most `size` bytes.
        let status = unsafe { (self.runtime().get_variable)(name.as_ptr(), &VENDOR, &mut attributes, &mut size, buf.as_mut_ptr()) };
        status.is_success().then_some(size)
    }

    /// Sets ksave's variable `name` (kept across a reset) to `data`.
    fn set_variable(&self, name: &str, data: &[u8]) -> Status {
        let name = Ucs2::<32>::from(name);
        let keep = VariableAttributes::NON_VOLATILE | VariableAttributes::BOOTSERVICE_ACCESS | VariableAttributes::RUNTIME_ACCESS;
        // SAFETY: SetVariable (UEFI 2.10, 8.2.3) reads `data` and the name.
        unsafe { (self.runtime().set_variable)(name.as_ptr(), &VENDOR, keep, data.len(), data.as_ptr()) }
    }

    /// Starts `path` on the device ksave.efi came from, as its child; returns
    /// only if it cannot be started, or returns.
    fn start(&self, path: &str) -> Status {
        let Some(loaded) = self.protocol::<LoadedImageProtocol>(self.image, &LoadedImageProtocol::GUID) else { return Status::NOT_FOUND };
        // SAFETY: this image's loaded-image protocol.
        let device = unsafe { (*loaded).device_handle };
        let Some(device_path) = self.protocol::<DevicePathProtocol>(device, &DevicePathProtocol::GUID) else { return Status::NOT_FOUND };
        let mut buf = [0u8; 1024];
        // SAFETY: the device's path, a list of nodes ending in an END node.
        let Some(full) = (unsafe { file_path(device_path, path, &mut buf) }) else { return Status::INVALID_PARAMETER };
        let mut child: Handle = ptr::null_mut();
        // SAFETY: LoadImage (UEFI 2.10, 7.4.1) reads the device path and
        // loads the file it names; ksave is its parent.
        let status = unsafe { (self.boot().load_image)(Boolean::FALSE, self.image, full.cast(), ptr::null(), 0, &mut child) };
        if status.is_error() {
            return status;
        }
        // SAFETY: StartImage (7.4.2) runs the image just loaded.
        unsafe { (self.boot().start_image)(child, ptr::null_mut(), ptr::null_mut()) }
    }
}

/// `device` with its END node replaced by a file-path node for `path`
/// (UEFI 2.10, 10.3.5.4: UCS-2, backslashes), then END, in `out`.
///
/// # Safety
/// `device` must be a valid device path.
unsafe fn file_path(device: *const DevicePathProtocol, path: &str, out: &mut [u8]) -> Option<*const u8> {
    let mut len = 0usize;
    loop {
        // SAFETY: the caller's device path: every node has a 4-byte header
        // whose length covers it, up to the END node.
        let (kind, node_len) = unsafe {
            let node = device.cast::<u8>().add(len).cast::<DevicePathProtocol>();
            ((*node).major_type, u16::from_le_bytes((*node).length) as usize)
        };
        if kind == DeviceType::END || node_len < 4 {
            break;
        }
        len += node_len;
    }
    let file_len = 4 + (path.len() + 1) * 2;
    if len + file_len + 4 > out.len() {
        return None;
    }
    // SAFETY: `len` bytes of the device's nodes, read above.
    out[..len].copy_from_slice(unsafe { core::slice::from_raw_parts(device.cast::<u8>(), len) });
    out[len] = DeviceType::MEDIA.0;
    out[len + 1] = DeviceSubType::MEDIA_FILE_PATH.0;
    out[len + 2..len + 4].copy_from_slice(&(file_len as u16).to_le_bytes());
    for (i, c) in path.bytes().chain([0]).enumerate() {
        let c = if c == b'/' { b'\\' } else { c };
        out[len + 4 + 2 * i..len + 6 + 2 * i].copy_from_slice(&u16::from(c).to_le_bytes());
    }
    let end = len + file_len;
    out[end..end + 4].copy_from_slice(&[DeviceType::END.0, DeviceSubType::END_ENTIRE.0, 4, 0]);
    Some(out.as_ptr())
}

/// A short ASCII string as a NUL-terminated UCS-2 one.
struct Ucs2<const N: usize>([u16; N]);

impl<const N: usize> Ucs2<N> {
    fn from(s: &str) -> Self {
        let mut out = [0u16; N];
        for (o, b) in out.iter_mut().zip(s.bytes().take(N - 1)) {
            *o = b.into();
        }
        Self(out)
    }

    fn as_ptr(&self) -> *const u16 {
        self.0.as_ptr()
    }
}

/// A whole disk read through the firmware's Block I/O: ksave's disk
/// drivers' trait, so that ksave finds its partition, reads a file store's
/// map, its claim and the file systems by the same code as on its own
/// drivers. It never writes: ksave.efi writes nothing before it leaves the
/// firmware.
pub struct FirmwareDisk {
    io: *const BlockIoProtocol,
    media_id: u32,
    info: DiskInfo,
}

impl FirmwareDisk {
    /// The whole disk behind `io`, if it is one (not a partition, media
    /// present, a block size ksave takes).
    ///
    /// # Safety
    /// `io` must be the firmware's Block I/O protocol, used only while
    /// boot services run.
    unsafe fn new(io: *const BlockIoProtocol) -> Option<Self> {
        // SAFETY: the caller's protocol, whose `media` it keeps current.
        let media: &BlockIoMedia = unsafe { &*(*io).media };
        if bool::from(media.logical_partition) || !bool::from(media.media_present) || !matches!(media.block_size, 512 | 4096) {
            return None;
        }
        let model = diskdrv::heapless_str::Str40::from_ascii_trimmed(b"firmware Block I/O");
        let info = DiskInfo { model, serial: Default::default(), blocks: media.last_block + 1, block_size: media.block_size, lba48: true, dma: true };
        Some(Self { io, media_id: media.media_id, info })
    }
}

impl BlockDevice for FirmwareDisk {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&mut self, dir: Direction, mut lba: u64, segments: &[Segment]) -> Result<(), DiskError> {
        if dir == Direction::Write {
            return Err(DiskError::Unsupported("ksave.efi writes no disk while the firmware runs"));
        }
        for segment in segments {
            // SAFETY: ReadBlocks (UEFI 2.10, 13.9.3) fills `len` bytes at the
            // segment's address, which the firmware's identity map makes a
            // pointer (2.3.4); Segment's contract makes it ours to write.
            let status = unsafe { ((*self.io).read_blocks)(self.io, self.media_id, lba, segment.len() as usize, segment.addr() as *mut c_void) };
            if status.is_error() {
                return Err(DiskError::Firmware { lba, status: status.0 as u64 });
            }
            lba += segment.len() / u64::from(self.info.block_size);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

/// The firmware's system table and ksave.efi's image handle while boot
/// services run (null before and after), for
/// [`crate::disks::open_firmware_partition`].
static SYSTEM: AtomicPtr<SystemTable> = AtomicPtr::new(ptr::null_mut());
static IMAGE: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());

/// Calls `f` with each whole disk the firmware reads until it returns true;
/// none once boot services are gone.
pub fn firmware_disks(f: impl FnMut(FirmwareDisk) -> bool) {
    let system = SYSTEM.load(Ordering::Relaxed);
    if !system.is_null() {
        Firmware { image: IMAGE.load(Ordering::Relaxed), system }.disks(f);
    }
}

/// The UEFI memory map in e820 kinds (bootinfo::uefi).
fn e820_map(bytes: &[u8], desc_size: usize, map: &mut MemoryMap) -> Result<(), &'static str> {
    bootinfo::uefi::add_memory_map(bytes, desc_size, map).map_err(|_| "more memory regions than ksave keeps")
}

/// ksave.efi's Rust entry (asm/entry.s, on ksave's stack).
#[unsafe(no_mangle)]
extern "efiapi" fn ksave_efi_main(image: Handle, system: *const SystemTable) -> Status {
    crate::console::init(true);
    heap::init();
    let fw = Firmware { image, system };
    IMAGE.store(image, Ordering::Relaxed);
    SYSTEM.store(system.cast_mut(), Ordering::Relaxed);
    // SAFETY: one CPU; the hand-over is used by this entry alone, and by
    // the next (ENTRY_UEFI) only after this one is gone.
    let handover = unsafe { &mut *HANDOVER.0.get() };
    let mut len = 0;
    let options = fw.load_options(&mut handover.cmdline, &mut len);
    handover.cmdline_len = len;
    println!("ksave {}: started by the UEFI firmware, load options \"{options}\"", env!("CARGO_PKG_VERSION"));
    let mut next = [0u8; 256];
    let next = copy_str(cmdline::get(options, "ksave.next"), &mut next);
    if let Some(mib) = cmdline::get(options, "ksave.measure_read").and_then(|v| v.parse().ok()) {
        measure_block_io(&fw, mib);
    }
    let buf = MAP_BUFFER.take();
    if decide(&fw, handover, buf).is_ok() {
        leave_firmware(&fw, handover, buf);
    }
    match next {
        Some(path) => {
            println!("ksave: starting the next loader, {path}");
            let status = fw.start(path);
            println!("ksave: the next loader {path} did not start ({status:?}): back to the boot manager");
            status
        }
        None => {
            println!("ksave: no ksave.next= in the load options: back to the boot manager, which tries the next boot entry");
            Status::NOT_FOUND
        }
    }
}

/// `ksave.measure_read=MIB` (`make bench`): reads MIB MiB (at most 256)
/// from the start of the first whole disk through the firmware's Block
/// I/O, in requests of [`READ_REQUEST`] into pages the firmware lends, and
/// says how fast. That is the rate ksave.efi could read an image at before
/// it leaves the firmware; it reads only the header, the metadata and the
/// checks' few blocks that way (docs/UEFI.md), and loads with its own
/// drivers after.
fn measure_block_io(fw: &Firmware, mib: u64) {
    const READ_REQUEST: usize = 2 << 20;
    let pages = READ_REQUEST / ksave_format::PAGE;
    let mut addr = 0u64;
    // SAFETY: AllocatePages (UEFI 2.10, 7.2.1) writes the address of
    // `pages` pages it gives this image into `addr`; freed below.
    let status = unsafe { (fw.boot().allocate_pages)(uefi_raw::table::boot::AllocateType::ANY_PAGES, uefi_raw::table::boot::MemoryType::LOADER_DATA, pages, &mut addr) };
    if status.is_error() {
        println!("ksave: measure_read: no pages from the firmware ({status:?})");
        return;
    }
    hw::calibrate_tsc();
    fw.disks(|disk| {
        let bytes = (mib.min(256) << 20).min(disk.info.blocks * u64::from(disk.info.block_size));
        let start = hw::now_us();
        let mut lba = 0;
        for _ in 0..bytes / READ_REQUEST as u64 {
            // SAFETY: ReadBlocks (UEFI 2.10, 13.9.3) fills READ_REQUEST bytes
            // at `addr`, the pages allocated above for this alone.
            let status = unsafe { ((*disk.io).read_blocks)(disk.io, disk.media_id, lba, READ_REQUEST, addr as *mut c_void) };
            if status.is_error() {
                println!("ksave: measure_read: read error at block {lba} ({status:?})");
                return true;
            }
            lba += (READ_REQUEST / disk.info.block_size as usize) as u64;
        }
        let us = (hw::now_us() - start).max(1);
        println!("ksave: firmware Block I/O read {} MiB in {} ms = {} MB/s (2 MiB requests)", bytes >> 20, us / 1000, bytes / us);
        crate::metric!(block_io_read_ms = us / 1000, block_io_read_mib = bytes >> 20);
        true
    });
    // SAFETY: the pages AllocatePages gave above, used no more.
    let _ = unsafe { (fw.boot().free_pages)(addr, pages) };
}

/// `s` copied into `buf` (the hand-over's copy of the options is ksave's
/// once the firmware is left).
fn copy_str<'b>(s: Option<&str>, buf: &'b mut [u8]) -> Option<&'b str> {
    let s = s?;
    let n = s.len().min(buf.len());
    buf[..n].copy_from_slice(&s.as_bytes()[..n]);
    core::str::from_utf8(&buf[..n]).ok()
}

/// Leaves boot services with the final memory map in the hand-over, and
/// takes the machine over; returns only if the firmware would not let go.
fn leave_firmware(fw: &Firmware, handover: &mut Handover, buf: &mut MapBuffer) {
    let mut status = Status::ABORTED;
    // The key goes stale if the firmware changes its map in between (an
    // event): UEFI 2.10, 7.4.6 says get the map again and retry.
    for _ in 0..2 {
        let (bytes, desc_size, key) = match fw.memory_map(buf) {
            Ok(m) => m,
            Err(s) => {
                status = s;
                break;
            }
        };
        handover.map = MemoryMap::new();
        if let Err(why) = e820_map(bytes, desc_size, &mut handover.map) {
            println!("ksave: not resuming: {why}");
            return;
        }
        // SAFETY: ExitBootServices with the key of the map just read; from
        // its success on, no boot service is called (SYSTEM is cleared).
        status = unsafe { (fw.boot().exit_boot_services)(fw.image, key) };
        if status.is_success() {
            SYSTEM.store(ptr::null_mut(), Ordering::Relaxed);
            // SAFETY: boot services are gone; ksave takes the machine over
            // from its own image, where the hand-over lies.
            unsafe { ksave_efi_take_over(handover as *const Handover as u64) }
        }
    }
    println!("ksave: the firmware would not let ksave take the machine over ({status:?})");
    keep_reason(fw, format_args!("ExitBootServices failed: {status:?}"));
}

/// Decides to resume: Ok once every check has passed; Err after saying
/// why not, and keeping the reason for the next system's log.
fn decide(fw: &Firmware, handover: &mut Handover, buf: &mut MapBuffer) -> Result<(), ()> {
    let at = match Mode::parse(handover.cmdline()) {
        Ok(Mode::Resume { at, .. }) => at,
        _ => {
            println!("ksave: not resuming: the load options name no store (ksave.resume=PARTUUID)");
            return Err(());
        }
    };
    handover.rsdp = fw.rsdp();
    let (bytes, desc_size, _) = fw.memory_map(buf).map_err(|s| println!("ksave: not resuming: no memory map from the firmware ({s:?})"))?;
    let mut map = MemoryMap::new();
    e820_map(bytes, desc_size, &mut map).map_err(|why| println!("ksave: not resuming: {why}"))?;
    let facs = match handover.rsdp {
        Some((rsdt, xsdt)) => acpi::hardware_signature(&IdentityMapped, rsdt, xsdt).map_err(|e| ksave_core::Message::format(format_args!("{e}"))),
        None => Err(ksave_core::Message::format(format_args!("{}", acpi::AcpiError::NoRsdp))),
    };
    let identity = match resume::check_from_firmware(at, &map, facs) {
        Ok(identity) => identity,
        Err(refused) => {
            resume::report(&refused);
            keep_reason(fw, format_args!("{}", refused.why().as_str()));
            return Err(());
        }
    };
    // An earlier start took this very image and did not reach the saved
    // kernel (the image would be invalidated): leave it to the next loader.
    let mut tried = [0u8; 16];
    if fw.variable("KsaveTried", &mut tried) == Some(identity.len()) && tried[..identity.len()] == identity {
        println!("ksave: not resuming: an earlier start took this image and did not reach the saved kernel; the next loader's initramfs resumes it");
        keep_reason(fw, format_args!("an earlier start by ksave.efi took this image and did not reach the saved kernel"));
        return Err(());
    }
    let status = fw.set_variable("KsaveTried", &identity);
    if status.is_error() {
        println!("ksave: not resuming: the firmware would not keep the image's identity ({status:?}), which stops a failed start from repeating");
        return Err(());
    }
    Ok(())
}

/// Keeps why this start did not resume in `KsaveRefusal`, for the log of
/// the system the next loader boots.
fn keep_reason(fw: &Firmware, why: core::fmt::Arguments) {
    let text = ksave_core::Message::format(why);
    let status = fw.set_variable("KsaveRefusal", text.as_str().as_bytes());
    if status.is_error() {
        println!("ksave: could not keep the reason in the firmware's variable KsaveRefusal ({status:?})");
    }
}
