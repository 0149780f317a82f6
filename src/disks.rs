//! Finding ksave's partition on whatever disks the machine has, and opening
//! the disk it is on: [`open_partition`] is the one way in for every mode
//! (save, resume, disk test), so a new driver is added here only.

use core::fmt;
use core::mem::ManuallyDrop;
use core::sync::atomic::{AtomicPtr, Ordering};

use bootinfo::acpi::RemappingUnit;
use diskdrv::ahci::{self, AhciDisk, AhciMemory};
use diskdrv::ide::{Channel, Drive, IdeDisk, IdeMemory, Mode};
use diskdrv::iommu::{self, IommuError, TranslationOff};
use diskdrv::nvme::{self, NvmeDisk, NvmeMemory};
use diskdrv::part::{self, Guid, PartError, Partition};
use diskdrv::pci::{self, Address, Storage, command};
use diskdrv::virtio::{Transport, VirtioBlk, VirtioMemory};
use diskdrv::{BlockDevice, Direction, DiskError, DiskInfo, MAX_BLOCK, Segment};
use ksave_core::store;

use crate::hw::{self, KsaveHal};
use ksave_format::filemap::{self, MapError};
use ksave_format::header::{Header, SUPERBLOCK_BYTES};
use ksave_format::reader::Source;
use ksave_format::store::{Extent, StoreError, StoreMap};
use ksave_format::PAGE;
use ksave_core::store::StoreIoError;
use crate::efi::FirmwareDisk;
use crate::work::Exclusive;
use crate::{paging, println};

/// DMA memory for one open disk at a time, in ksave's own image.
#[repr(C)]
pub struct DiskMemory {
    driver: DriverMemory,
    block: BlockBuf,
}

/// The open disk's driver memory: disks are opened one at a time, so the
/// drivers share one block (the largest one's size, not their sum).
#[repr(C)]
union DriverMemory {
    ahci: ManuallyDrop<AhciMemory>,
    ide: ManuallyDrop<IdeMemory>,
    nvme: ManuallyDrop<NvmeMemory>,
    virtio: ManuallyDrop<VirtioMemory>,
}

impl DriverMemory {
    /// Zeroes the block, which is every driver's `new()`: their memory is
    /// integers only.
    fn zeroed(&mut self) -> &mut Self {
        // SAFETY: writes only this union's own bytes; all-zero bytes are a
        // valid value of each field (plain integer arrays).
        unsafe { core::ptr::write_bytes(self as *mut Self, 0, 1) };
        self
    }

    fn ahci(&mut self) -> &mut AhciMemory {
        // SAFETY: zeroed just now, and zero is AhciMemory::new().
        unsafe { &mut self.zeroed().ahci }
    }

    fn ide(&mut self) -> &mut IdeMemory {
        // SAFETY: as for ahci().
        unsafe { &mut self.zeroed().ide }
    }

    fn nvme(&mut self) -> &mut NvmeMemory {
        // SAFETY: as for ahci().
        unsafe { &mut self.zeroed().nvme }
    }

    fn virtio(&mut self) -> &mut VirtioMemory {
        // SAFETY: as for ahci().
        unsafe { &mut self.zeroed().virtio }
    }
}

/// One logical block of the largest size, for partition tables.
#[repr(C, align(4096))]
struct BlockBuf([u8; MAX_BLOCK]);

static DISK_MEMORY: Exclusive<DiskMemory> =
    Exclusive::new(DiskMemory { driver: DriverMemory { nvme: ManuallyDrop::new(NvmeMemory::new()) }, block: BlockBuf([0; MAX_BLOCK]) });
// The block is zeroed as the largest field; a static of it stays in .bss.
const _: () = assert!(
    size_of::<NvmeMemory>() >= size_of::<AhciMemory>()
        && size_of::<NvmeMemory>() >= size_of::<IdeMemory>()
        && size_of::<NvmeMemory>() >= size_of::<VirtioMemory>()
);

/// The image store on ksave's open disk: [`store::DiskStore`] (every read,
/// write, DMA and invalidation of an image) over [`AnyDisk`], its driver's
/// memory reached through [`KsaveHal`].
pub type DiskStore<'d> = store::DiskStore<'d, AnyDisk<'static>, KsaveHal>;

/// Where a disk is.
#[derive(Clone, Copy, Debug)]
pub enum Location {
    /// A port of an AHCI HBA.
    Ahci { pci: Address, abar: u64, port: u8 },
    /// A drive on an IDE channel.
    Ide { pci: Address, channel: Channel, secondary: bool, drive: Drive },
    /// The `index`th active namespace of an NVMe controller.
    Nvme { pci: Address, bar: u64, index: usize },
    /// A virtio-blk device.
    Virtio { pci: Address, transport: Transport },
    /// A disk the UEFI firmware reads for ksave.efi (efi.rs), before it
    /// leaves boot services.
    Firmware,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ahci { pci, port, .. } => write!(f, "AHCI {pci} port {port}"),
            Self::Ide { pci, secondary, drive, .. } => {
                write!(f, "IDE {pci} {} {}", if *secondary { "secondary" } else { "primary" }, if *drive == Drive::Master { "master" } else { "slave" })
            }
            Self::Nvme { pci, index, .. } => write!(f, "NVMe {pci} namespace #{}", index + 1),
            Self::Virtio { pci, transport } => write!(f, "virtio-blk {pci} at {:#x}", transport.common),
            Self::Firmware => write!(f, "the firmware's Block I/O"),
        }
    }
}

/// A disk of any kind.
pub enum AnyDisk<'m> {
    /// On AHCI.
    Ahci(AhciDisk<'m, KsaveHal>),
    /// On IDE.
    Ide(IdeDisk<'m, KsaveHal>),
    /// An NVMe namespace.
    Nvme(NvmeDisk<'m, KsaveHal>),
    /// A virtio-blk device.
    Virtio(VirtioBlk<'m, KsaveHal>),
    /// A disk the UEFI firmware reads (read-only).
    Firmware(FirmwareDisk),
}

impl AnyDisk<'_> {
    /// Gives the hardware back as found (AHCI registers restored; IDE bus
    /// master stopped and device interrupts on again; NVMe disabled with
    /// its admin queue registers put back, for its driver's reset; virtio
    /// reset, as its driver's freeze left it). Each driver's `Drop` does
    /// it, so an error path does it too.
    pub fn close(self) {}

    /// Leaves the controller stopped (after a restore: see AhciDisk::stop;
    /// an IDE channel holds no pointer into memory between commands; an
    /// NVMe controller is left disabled).
    pub fn stop(self) {
        match self {
            Self::Ahci(d) => d.stop(),
            Self::Ide(d) => d.close(),
            Self::Nvme(d) => d.stop(),
            Self::Virtio(d) => d.stop(),
            Self::Firmware(_) => {}
        }
    }
}

impl BlockDevice for AnyDisk<'_> {
    fn info(&self) -> &DiskInfo {
        match self {
            Self::Ahci(d) => d.info(),
            Self::Ide(d) => d.info(),
            Self::Nvme(d) => d.info(),
            Self::Virtio(d) => d.info(),
            Self::Firmware(d) => d.info(),
        }
    }
    fn transfer(&mut self, dir: Direction, lba: u64, segments: &[Segment]) -> Result<(), DiskError> {
        match self {
            Self::Ahci(d) => d.transfer(dir, lba, segments),
            Self::Ide(d) => d.transfer(dir, lba, segments),
            Self::Nvme(d) => d.transfer(dir, lba, segments),
            Self::Virtio(d) => d.transfer(dir, lba, segments),
            Self::Firmware(d) => d.transfer(dir, lba, segments),
        }
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        match self {
            Self::Ahci(d) => d.flush(),
            Self::Ide(d) => d.flush(),
            Self::Nvme(d) => d.flush(),
            Self::Virtio(d) => d.flush(),
            Self::Firmware(d) => d.flush(),
        }
    }
}

/// PCI command registers changed to reach the controllers, put back when
/// dropped.
pub struct Controllers {
    saved: [(Address, u16); 16],
    count: usize,
}

impl Controllers {
    /// Nothing changed yet.
    pub const fn new() -> Self {
        Self { saved: [(Address { bus: 0, device: 0, function: 0 }, 0); 16], count: 0 }
    }

    fn enable(&mut self, at: Address, bits: u16) {
        if self.saved[..self.count].iter().any(|(a, _)| *a == at) || self.count == self.saved.len() {
            return;
        }
        self.saved[self.count] = (at, pci::enable(&KsaveHal, at, bits));
        self.count += 1;
    }
}

impl Drop for Controllers {
    /// Puts every changed command register back, on every path.
    fn drop(&mut self) {
        for (at, old) in self.saved[..self.count].iter().rev() {
            pci::restore_command(&KsaveHal, *at, *old);
        }
    }
}

/// A controller ksave found and could not use, and why: the most specific
/// reason a user gets when no disk is left.
#[derive(Clone, Copy, Debug)]
pub struct Skipped {
    /// What kind of controller.
    pub kind: &'static str,
    /// Where.
    pub pci: Address,
    /// Why.
    pub why: DiskError,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.pci, self.why)
    }
}

/// Every disk location on the machine's AHCI, IDE, NVMe and virtio-blk
/// controllers, enabling each controller's decoding and bus mastering on
/// the way; returns the first controller that could not be used.
fn each_location(controllers: &mut Controllers, mut f: impl FnMut(Location)) -> Option<Skipped> {
    let mut skipped = None;
    let mut found = [None; 8];
    let mut n = 0;
    pci::find_storage(&KsaveHal, |s| {
        if n < found.len() {
            found[n] = Some(s);
            n += 1;
        }
    });
    for storage in found.into_iter().flatten() {
        match storage {
            Storage::Ahci { function, abar } => {
                controllers.enable(function.address, command::MEMORY | command::BUS_MASTER);
                // ABAR: 0x100 of HBA registers + 0x80 a port (AHCI 1.3.1 3).
                if let Err(e) = paging::map_mmio(abar, 0x1100) {
                    println!("ksave:   AHCI {}: ABAR {abar:#x} unusable: {e}", function.address);
                    skipped.get_or_insert(Skipped { kind: "AHCI", pci: function.address, why: DiskError::Unsupported(e) });
                    continue;
                }
                let ports = ahci::disk_ports(&KsaveHal, abar);
                for port in (0..32).filter(|p| ports & (1 << p) != 0) {
                    f(Location::Ahci { pci: function.address, abar, port });
                }
            }
            Storage::Ide { function, prog_if, bus_master } => {
                controllers.enable(function.address, command::IO | command::BUS_MASTER);
                for secondary in [false, true] {
                    let Some(channel) = ide_channel(function.address, prog_if, bus_master, secondary) else { continue };
                    for drive in [Drive::Master, Drive::Slave] {
                        f(Location::Ide { pci: function.address, channel, secondary, drive });
                    }
                }
            }
            Storage::Nvme { function, bar } => {
                controllers.enable(function.address, command::MEMORY | command::BUS_MASTER);
                // Registers and the doorbells of queues 0 and 1 at any
                // stride ksave accepts (NVMe 1.4, 3.1).
                if let Err(e) = paging::map_mmio(bar, 0x2000) {
                    println!("ksave:   NVMe {}: BAR0 {bar:#x} unusable: {e}", function.address);
                    skipped.get_or_insert(Skipped { kind: "NVMe", pci: function.address, why: DiskError::Unsupported(e) });
                    continue;
                }
                // Each namespace is opened in turn; a missing one says NoDevice.
                for index in 0..nvme::MAX_NAMESPACES {
                    f(Location::Nvme { pci: function.address, bar, index });
                }
            }
            Storage::VirtioBlk { function } => {
                controllers.enable(function.address, command::MEMORY | command::BUS_MASTER);
                let transport = match Transport::find(&KsaveHal, function.address) {
                    Ok(t) => t,
                    Err(e) => {
                        println!("ksave:   virtio-blk {}: {e}", function.address);
                        skipped.get_or_insert(Skipped { kind: "virtio-blk", pci: function.address, why: e });
                        continue;
                    }
                };
                if let Some(e) = transport.spans.iter().find_map(|&(at, len)| paging::map_mmio(at, len).err()) {
                    println!("ksave:   virtio-blk {}: registers unusable: {e}", function.address);
                    skipped.get_or_insert(Skipped { kind: "virtio-blk", pci: function.address, why: DiskError::Unsupported(e) });
                    continue;
                }
                f(Location::Virtio { pci: function.address, transport });
            }
        }
    }
    skipped
}

/// A channel's ports: legacy ones in compatibility mode, BARs in native
/// mode (programming interface bit 0 / bit 2, PCI IDE Controller spec 1.0).
fn ide_channel(at: Address, prog_if: u8, bus_master: Option<u16>, secondary: bool) -> Option<Channel> {
    let native = prog_if & if secondary { 1 << 2 } else { 1 << 0 } != 0;
    let bm = bus_master.map(|b| if secondary { b + 8 } else { b });
    if !native {
        let mut ch = if secondary { Channel::secondary(None) } else { Channel::primary(None) };
        ch.bus_master = bm;
        return Some(ch);
    }
    let (cmd_bar, ctl_bar) = if secondary { (2, 3) } else { (0, 1) };
    match (pci::bar(&KsaveHal, at, cmd_bar), pci::bar(&KsaveHal, at, ctl_bar)) {
        (pci::Bar::Io(command), pci::Bar::Io(control)) => Some(Channel { command, control: control + 2, bus_master: bm }),
        _ => None,
    }
}

/// Opens the disk at `location`; also hands out the block buffer, which
/// shares the disk's memory block.
fn open<'m>(location: Location, ide_mode: Mode, mem: &'m mut DiskMemory) -> Result<(AnyDisk<'m>, &'m mut [u8; MAX_BLOCK]), DiskError> {
    let DiskMemory { driver, block } = mem;
    let disk = match location {
        // SAFETY: each_location found this HBA on PCI and enabled memory
        // decoding and bus mastering; nothing else in ksave drives it, and
        // DiskMemory is identity-mapped ksave memory.
        Location::Ahci { abar, port, .. } => AnyDisk::Ahci(unsafe { AhciDisk::open(KsaveHal, abar, port, driver.ahci())? }),
        // SAFETY: as above, for the IDE controller's I/O ports.
        Location::Ide { channel, drive, .. } => AnyDisk::Ide(unsafe { IdeDisk::open(KsaveHal, channel, drive, ide_mode, driver.ide())? }),
        // SAFETY: as above, for the NVMe controller's BAR0, mapped UC by
        // each_location.
        Location::Nvme { bar, index, .. } => AnyDisk::Nvme(unsafe { NvmeDisk::open(KsaveHal, bar, index, driver.nvme())? }),
        // SAFETY: as above, for the virtio device's structures, mapped UC by
        // each_location.
        Location::Virtio { transport, .. } => AnyDisk::Virtio(unsafe { VirtioBlk::open(KsaveHal, transport, driver.virtio())? }),
        // Found by open_firmware_partition, never by each_location.
        Location::Firmware => return Err(DiskError::NoDevice),
    };
    Ok((disk, &mut block.0))
}

/// Why the partition was not found.
#[derive(Debug)]
pub enum FindError {
    /// No disk was found at all; the first controller skipped, if one was.
    NoDisks(Option<Skipped>),
    /// Disks were found, none has the partition.
    NotFound { disks: u32 },
    /// Two disks or more have a partition with this GUID (a cloned disk,
    /// RAID1 members): which one is meant is not known, so neither is used.
    Ambiguous { found: u32 },
}

impl fmt::Display for FindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDisks(None) => write!(f, "no AHCI, IDE, NVMe or virtio-blk disk found"),
            Self::NoDisks(Some(skipped)) => write!(f, "no disk ksave can use: {skipped}"),
            Self::NotFound { disks } => write!(f, "no GPT partition with that GUID on any of {disks} disks"),
            Self::Ambiguous { found } => write!(f, "{found} disks have a partition with that GUID (a cloned disk?): refusing to guess which"),
        }
    }
}

/// Looks at every disk for the GPT partition `guid`, reporting each disk;
/// exactly one must have it.
fn find_partition(guid: Guid, ide_mode: Mode, mem: &mut DiskMemory, controllers: &mut Controllers) -> Result<(Location, Partition), FindError> {
    let mut disks = 0;
    let mut found_on = 0;
    let mut result = None;
    // An NVMe controller whose namespaces ran out: its later indices would
    // each cost a controller reset to learn the same.
    let mut namespaces_done = None;
    let skipped = each_location(controllers, |location| {
        if let Location::Nvme { pci, .. } = location
            && namespaces_done == Some(pci)
        {
            return;
        }
        let (mut disk, block) = match open(location, ide_mode, mem) {
            Ok(d) => d,
            Err(DiskError::NoDevice) => {
                if let Location::Nvme { pci, .. } = location {
                    namespaces_done = Some(pci);
                }
                return;
            }
            Err(e) => {
                println!("ksave:   {location}: {e}");
                return;
            }
        };
        disks += 1;
        let info = disk.info().clone();
        let found = part::find_gpt_partition(&mut disk, &KsaveHal, guid, block);
        disk.close();
        println!(
            "ksave:   {location}: \"{}\" {} MiB{}",
            info.model,
            (info.blocks * info.block_size as u64) >> 20,
            match found {
                Ok(_) => "  <- has the partition",
                Err(PartError::NoValidGpt) => "  (no valid GPT)",
                Err(PartError::Disk(_)) => "  (read error)",
                Err(_) => "",
            }
        );
        if let Ok(p) = found {
            found_on += 1;
            result = Some((location, p));
        }
    });
    if found_on > 1 {
        return Err(FindError::Ambiguous { found: found_on });
    }
    result.ok_or(if disks == 0 { FindError::NoDisks(skipped) } else { FindError::NotFound { disks } })
}

/// The image partition, open on its disk, with the controllers' PCI state
/// and the IOMMUs' translation to put back (fields drop in this order).
pub struct OpenPartition {
    /// The disk it is on.
    pub disk: AnyDisk<'static>,
    /// Where that disk is.
    pub location: Location,
    /// The partition.
    pub partition: Partition,
    /// The partition as one extent: the store, or where a file store's map
    /// is read from.
    whole: [Extent; 1],
    /// A file store's extents (the image's part of the file).
    file: Option<&'static [Extent]>,
    /// The file lies on an encrypted volume (its map says so): every image
    /// in it is sealed.
    pub encrypted: bool,
    controllers: Controllers,
    iommu: TranslationOff<KsaveHal>,
}

impl OpenPartition {
    /// The partition's first block.
    pub fn first_lba(&self) -> u64 {
        self.partition.first_lba
    }

    /// The partition's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.partition.blocks() * self.block_size() as u64
    }

    /// The image store (the partition, or the file in it): every image
    /// read and write goes through it.
    pub fn store(&mut self) -> DiskStore<'_> {
        let map = StoreMap::new(self.disk.info().block_size, self.file.unwrap_or(&self.whole)).expect("checked when the store was opened");
        DiskStore::new(&mut self.disk, KsaveHal, map)
    }


    /// The [`SUPERBLOCK_BYTES`] at byte `at` (a multiple of 512) of the
    /// partition `guid` on this disk, where a file system's superblock
    /// lies (ext: 1024, btrfs: 65536) or XFS's log head sector,
    /// read through `buf` (DMA memory); `None` if this disk has no such
    /// partition or it cannot be read.
    pub fn superblock<'b>(&mut self, guid: Guid, at: u64, buf: &'b mut [u8; PAGE]) -> Option<&'b [u8; SUPERBLOCK_BYTES]> {
        let block_size = self.block_size();
        let found = part::find_gpt_partition(&mut self.disk, &KsaveHal, guid, buf).ok()?;
        let whole = [Extent { lba: found.first_lba, blocks: found.blocks() }];
        let mut partition = DiskStore::new(&mut self.disk, KsaveHal, StoreMap::new(block_size, &whole).ok()?);
        let within = (at % PAGE as u64) as usize;
        partition.read_at(at - within as u64, buf).ok()?;
        buf.get(within..within + SUPERBLOCK_BYTES)?.try_into().ok()
    }

    /// How many IOMMUs were translating until ksave switched them off.
    pub fn iommus_switched(&self) -> usize {
        self.iommu.switched()
    }

    /// The disk's logical block size: LBAs count these.
    pub fn block_size(&self) -> u32 {
        self.disk.info().block_size
    }


    /// Gives the disk and the controllers back as found (the disk's and
    /// the controllers' `Drop`, in that order, as on every other path).
    pub fn close(self) {}

    /// Leaves the controller stopped and its PCI state as it is: after a
    /// restore the memory is the saved kernel's, whose driver resets it.
    pub fn stop(self) {
        let Self { disk, controllers, iommu, .. } = self;
        disk.stop();
        core::mem::forget(controllers);
        // Translation stays off: the saved kernel turned it off at its jump
        // (syscore_suspend) and turns it on itself (syscore_resume).
        core::mem::forget(iommu);
    }
}

/// The partition open while a save runs, for the exception handler: it
/// puts the disk back before ksave returns to the caller.
static OPEN_FOR_EMERGENCY: AtomicPtr<OpenPartition> = AtomicPtr::new(core::ptr::null_mut());

/// While alive, an exception closes `part` before ksave jumps back: the
/// caller's own driver then finds its registers as it left them, and no
/// DMA of ksave's is left running into memory that is the caller's again.
pub struct CloseOnException(());

impl CloseOnException {
    /// Registers `part`; it must not move while the guard lives.
    pub fn register(part: &mut OpenPartition) -> Self {
        OPEN_FOR_EMERGENCY.store(part, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for CloseOnException {
    fn drop(&mut self) {
        OPEN_FOR_EMERGENCY.store(core::ptr::null_mut(), Ordering::Relaxed);
    }
}

/// From the exception handler: closes the registered partition, if any.
pub fn close_after_exception() {
    let part = OPEN_FOR_EMERGENCY.swap(core::ptr::null_mut(), Ordering::Relaxed);
    if !part.is_null() {
        // SAFETY: registered by a live CloseOnException, so it points at an
        // OpenPartition that has not moved; the code that held it was
        // interrupted by an exception and never runs again (the handler
        // returns to the caller), so taking it by value aliases nothing
        // that is used later.
        unsafe { core::ptr::read(part) }.close();
    }
}

/// Why the partition could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// It is on no disk.
    Find(FindError),
    /// Its disk would not open.
    Open(Location, DiskError),
    /// An IOMMU would not stop translating ksave's DMA.
    Iommu(IommuError),
    /// The partition is no image store (empty, or a block size ksave
    /// does not take).
    Store(StoreError),
    /// The file store's map is unreadable, damaged, or not the one the
    /// host checked.
    FileMap(MapError<StoreIoError>),
    /// The file's image header carries another claim than its map: the
    /// map is stale or not this file's.
    FileClaim,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Find(e) => write!(f, "{e}"),
            Self::Open(location, e) => write!(f, "{location}: {e}"),
            Self::Iommu(e) => write!(f, "{e}"),
            Self::Store(e) => write!(f, "the partition is no image store: {e}"),
            Self::FileMap(e) => write!(f, "image file: {e}"),
            Self::FileClaim => write!(f, "image file: its header's claim is not its map's (the map is stale): run `ksave setup` again"),
        }
    }
}

/// Where ksave's store is: partition `guid`, or a file in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreAt {
    /// The partition's unique GUID.
    pub guid: Guid,
    /// A file store: where its map begins.
    pub file: Option<FileAt>,
}

/// Where a file store's map begins, in bytes from its partition's start
/// (docs/FORMAT.md, "File stores").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileAt {
    /// The offset.
    pub offset: u64,
    /// The CRC of the map the host checked just before (a kexec entry);
    /// none at a bootloader start, which has only the map's own CRCs and
    /// reads the image before it writes its header alone.
    pub expected_crc: Option<u32>,
}

/// A file store's extents, read from its map: 32 KiB of .bss.
static FILE_EXTENTS: Exclusive<[Extent; filemap::MAX_EXTENTS]> = Exclusive::new([Extent { lba: 0, blocks: 0 }; filemap::MAX_EXTENTS]);

/// Every mode's way to its store: the clock (drivers time out by it), the
/// IOMMUs (`iommus`: translation off while ksave does DMA), the
/// controllers, the DMA memory, the partition by GUID on any disk, its
/// disk opened, and a file store's map read. Once per entry; on failure,
/// nothing is left changed.
pub fn open_partition(at: StoreAt, ide_mode: Mode, iommus: &[RemappingUnit]) -> Result<OpenPartition, OpenError> {
    hw::calibrate_tsc();
    let iommu = translation_off(iommus).map_err(OpenError::Iommu)?;
    let mut controllers = Controllers::new();
    let mem = DISK_MEMORY.take();
    // On an error `controllers` is dropped, which puts them back.
    let (location, partition) = find_partition(at.guid, ide_mode, mem, &mut controllers).map_err(OpenError::Find)?;
    let (disk, page) = open(location, ide_mode, mem).map_err(|e| OpenError::Open(location, e))?;
    opened(disk, location, partition, page, at, controllers, iommu)
}

/// The image partition on a disk the UEFI firmware reads, for ksave.efi
/// before it leaves the firmware (efi.rs): found, and a file store's map
/// and claim read, by the same code as on ksave's own drivers. Read-only:
/// no IOMMU or controller is touched.
pub fn open_firmware_partition(at: StoreAt) -> Result<OpenPartition, OpenError> {
    let mem = DISK_MEMORY.take();
    let page = &mut mem.block.0;
    let (mut disks, mut found_on, mut found) = (0, 0, None);
    crate::efi::firmware_disks(|mut disk| {
        disks += 1;
        let has = part::find_gpt_partition(&mut disk, &KsaveHal, at.guid, page);
        let blocks = disk.info().blocks * disk.info().block_size as u64;
        println!("ksave:   firmware disk {disks}: {} MiB{}", blocks >> 20, if has.is_ok() { "  <- has the partition" } else { "" });
        if let Ok(partition) = has {
            found_on += 1;
            found = Some((disk, partition));
        }
        false
    });
    let (disk, partition) = match found {
        _ if found_on > 1 => return Err(OpenError::Find(FindError::Ambiguous { found: found_on })),
        Some(f) => f,
        None if disks == 0 => return Err(OpenError::Find(FindError::NoDisks(None))),
        None => return Err(OpenError::Find(FindError::NotFound { disks })),
    };
    let iommu = translation_off(&[]).map_err(OpenError::Iommu)?;
    opened(AnyDisk::Firmware(disk), Location::Firmware, partition, page, at, Controllers::new(), iommu)
}

/// The partition on its open disk: the store checked, a file store's map
/// read.
fn opened(
    mut disk: AnyDisk<'static>,
    location: Location,
    partition: Partition,
    page: &'static mut [u8; MAX_BLOCK],
    at: StoreAt,
    controllers: Controllers,
    iommu: TranslationOff<KsaveHal>,
) -> Result<OpenPartition, OpenError> {
    let whole = [Extent { lba: partition.first_lba, blocks: partition.blocks() }];
    StoreMap::new(disk.info().block_size, &whole).map_err(OpenError::Store)?;
    let (file, encrypted) = match at.file {
        Some(file) => {
            let (extents, encrypted) = read_file_map(&mut disk, &whole, file, page)?;
            (Some(extents), encrypted)
        }
        None => (None, false),
    };
    Ok(OpenPartition { disk, location, partition, whole, file, encrypted, controllers, iommu })
}

/// Reads the file store's map at `at` in the partition `whole` into
/// [`FILE_EXTENTS`] and returns the image's extents: only a map whose CRCs
/// hold, whose every extent lies in the partition, which is the one the
/// host checked, and whose image header (when there is one) carries the
/// map's claim. Also whether the map says the file is on an encrypted
/// volume.
fn read_file_map(disk: &mut AnyDisk<'static>, whole: &[Extent; 1], at: FileAt, page: &mut [u8; PAGE]) -> Result<(&'static [Extent], bool), OpenError> {
    let block_size = disk.info().block_size;
    let geometry = filemap::Partition { first_lba: whole[0].lba, blocks: whole[0].blocks, block_size };
    let table = FILE_EXTENTS.take();
    let head = {
        let mut partition = DiskStore::new(&mut *disk, KsaveHal, StoreMap::new(block_size, whole).map_err(OpenError::Store)?);
        let read_page = |lba: u64, buf: &mut [u8; PAGE]| partition.read_at((lba - geometry.first_lba) * block_size as u64, buf);
        filemap::read(geometry, at.offset, read_page, page, table).map_err(OpenError::FileMap)?
    };
    if let Some(expected) = at.expected_crc
        && head.crc != expected
    {
        return Err(OpenError::FileMap(MapError::Unexpected { found: head.crc, expected }));
    }
    // A map is plaintext and rewritable: a partition that begins with a
    // LUKS header makes the store encrypted whatever the map says (the
    // config pins the map's flag besides, by its CRC).
    let encrypted = {
        let mut partition = DiskStore::new(&mut *disk, KsaveHal, StoreMap::new(block_size, whole).map_err(OpenError::Store)?);
        partition.read_at(0, page).map_err(|e| OpenError::FileMap(MapError::Read(e)))?;
        head.encrypted || filemap::is_luks(&page[..])
    };
    let image = filemap::image_extents(&mut table[..head.extents], head.image_starts_at_page(), block_size);
    let map = StoreMap::new(block_size, image).map_err(OpenError::Store)?;
    let mut file = DiskStore::new(disk, KsaveHal, map);
    file.read_at(0, page).map_err(|e| OpenError::FileMap(MapError::Read(e)))?;
    if Header::decode(page).is_ok_and(|h| h.claim.id != head.claim_id) {
        return Err(OpenError::FileClaim);
    }
    let note = if encrypted { ", on an encrypted volume" } else { "" };
    println!("ksave:   image file: {} extents, {} MiB, map at byte {} of the partition{note}", image.len(), map.bytes() >> 20, at.offset);
    Ok((image, encrypted))
}

/// Turns DMA translation off on every unit of `iommus` that has it on, and
/// says what it found: nothing else makes ksave's DMA reach memory there.
fn translation_off(iommus: &[RemappingUnit]) -> Result<TranslationOff<KsaveHal>, IommuError> {
    let units = &iommus[..iommus.len().min(iommu::MAX_UNITS)];
    for unit in units {
        let (RemappingUnit::Vtd(base) | RemappingUnit::AmdVi(base)) = *unit;
        if let Err(e) = paging::map_mmio(base, 0x1000) {
            println!("ksave:   IOMMU at {base:#x}: registers unusable: {e}");
            return Err(IommuError::Unreachable(base));
        }
        let state = if iommu::translating(&KsaveHal, *unit) { "translation on: switching it off while ksave does DMA" } else { "translation off" };
        println!("ksave:   IOMMU {unit:x?}: {state}");
    }
    // SAFETY: map_mmio made each unit's registers reachable uncached; ksave
    // runs alone with the caller's devices frozen (or none started yet), so
    // no DMA relies on translation while it is off.
    unsafe { TranslationOff::new(KsaveHal, units) }
}
