//! Block devices the agent makes without udev, libdevmapper or losetup: a read-only loop device
//! over a sealed memfd, and a dm-verity target over any block device, through the kernel's
//! ioctls (`linux/loop.h`, `linux/dm-ioctl.h`).
//!
//! With `system`'s fork and pre-exec chroot, the agent's `unsafe`: `ioctl(2)` takes a pointer to a
//! struct whose layout the kernel defines. Each struct is `repr(C)` with its size asserted
//! against the kernel's, and each call passes a pointer to a live, correctly sized value.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use transfer::VerityParameters;

/// Why a device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A control device could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The device.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error("{request} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        request: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A value does not fit the kernel's structure.
    #[error("{0}")]
    Invalid(String),
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A block device: its node and its numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// `/dev/loop0`, `/dev/dm-0`, `/dev/nbd0`.
    pub path: PathBuf,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl BlockDevice {
    /// `MAJ:MIN`, as device-mapper tables name devices.
    pub fn numbers(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }
}

fn ioctl_error(request: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |source| DeviceError::Ioctl { request, source }
}

fn open_device(path: &str, write: bool) -> Result<File, DeviceError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|source| DeviceError::Open {
            path: path.to_owned(),
            source,
        })
}

/// A loop device and an open handle on it. With autoclear, the kernel detaches the backing file
/// when the last handle closes: keep `handle` until something else (dm-verity) holds the device.
#[derive(Debug)]
pub struct AttachedLoop {
    /// The device.
    pub device: BlockDevice,
    /// Keeps the device bound.
    pub handle: File,
}

/// Attaches `backing` (a sealed memfd or a file) to a free loop device, read-only, with
/// 4096-byte logical blocks, cleared automatically once nothing holds it.
pub fn attach_loop_read_only(backing: &File) -> Result<AttachedLoop, DeviceError> {
    let control = open_device("/dev/loop-control", true)?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
    let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if number < 0 {
        return Err(ioctl_error("LOOP_CTL_GET_FREE")(
            std::io::Error::last_os_error(),
        ));
    }
    let path = format!("/dev/loop{number}");
    let device = open_device(&path, false)?;
    let fd = u32::try_from(backing.as_raw_fd())
        .map_err(|_| DeviceError::Invalid("negative backing descriptor".into()))?;
    let config = LoopConfig {
        fd,
        block_size: 4096,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            size_limit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: `config` is a live `struct loop_config` (size asserted above) for the whole call.
    let result = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_CONFIGURE,
            &config as *const LoopConfig,
        )
    };
    if result < 0 {
        return Err(ioctl_error("LOOP_CONFIGURE")(
            std::io::Error::last_os_error(),
        ));
    }
    let minor = u32::try_from(number)
        .map_err(|_| DeviceError::Invalid("negative loop device number".into()))?;
    Ok(AttachedLoop {
        device: BlockDevice {
            path: PathBuf::from(path),
            major: 7,
            minor,
        },
        handle: device,
    })
}

const DM_VERSION: libc::c_ulong = 0xc138_fd00;
const DM_DEV_CREATE: libc::c_ulong = 0xc138_fd03;
const DM_DEV_SUSPEND: libc::c_ulong = 0xc138_fd06;
const DM_TABLE_LOAD: libc::c_ulong = 0xc138_fd09;
const DM_TABLE_STATUS: libc::c_ulong = 0xc138_fd0c;
const DM_READONLY_FLAG: u32 = 1;
const DM_HEADER_BYTES: usize = 312;
const DM_TARGET_SPEC_BYTES: usize = 40;
const DM_PAYLOAD_BYTES: usize = 4096;

/// `struct dm_ioctl`, followed by room for one target and its parameters.
#[repr(C, align(8))]
struct DmRequest {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_number: u32,
    padding: u32,
    device: u64,
    name: [u8; 128],
    uuid: [u8; 129],
    data: [u8; 7],
    payload: [u8; DM_PAYLOAD_BYTES],
}

const _: () = assert!(std::mem::size_of::<DmRequest>() == DM_HEADER_BYTES + DM_PAYLOAD_BYTES);
const _: () = assert!(std::mem::offset_of!(DmRequest, device) == 40);
const _: () = assert!(std::mem::offset_of!(DmRequest, payload) == DM_HEADER_BYTES);

impl DmRequest {
    fn new(name: &str) -> Result<Box<Self>, DeviceError> {
        if name.len() >= 128 || name.contains('/') {
            return Err(DeviceError::Invalid(format!(
                "device-mapper name {name:?} is not usable"
            )));
        }
        let mut request = Box::new(DmRequest {
            // The kernel accepts any 4.x at or below its own and writes its version back.
            version: [4, 0, 0],
            data_size: (DM_HEADER_BYTES + DM_PAYLOAD_BYTES) as u32,
            data_start: DM_HEADER_BYTES as u32,
            target_count: 0,
            open_count: 0,
            flags: 0,
            event_number: 0,
            padding: 0,
            device: 0,
            name: [0; 128],
            uuid: [0; 129],
            data: [0; 7],
            payload: [0; DM_PAYLOAD_BYTES],
        });
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(request)
    }

    /// Puts one target in the payload: `sector_start length type params`.
    fn set_target(
        &mut self,
        length_sectors: u64,
        target_type: &str,
        parameters: &str,
    ) -> Result<(), DeviceError> {
        let used = DM_TARGET_SPEC_BYTES + parameters.len() + 1;
        // Kernels from 6.5 on refuse a `next` that is not 8-aligned.
        let next = (used + 7) & !7;
        if next > DM_PAYLOAD_BYTES || target_type.len() >= 16 {
            return Err(DeviceError::Invalid(
                "device-mapper table too long".to_owned(),
            ));
        }
        let payload = &mut self.payload;
        payload.fill(0);
        payload[0..8].copy_from_slice(&0u64.to_ne_bytes());
        payload[8..16].copy_from_slice(&length_sectors.to_ne_bytes());
        payload[20..24].copy_from_slice(&(next as u32).to_ne_bytes());
        payload[24..24 + target_type.len()].copy_from_slice(target_type.as_bytes());
        payload[DM_TARGET_SPEC_BYTES..DM_TARGET_SPEC_BYTES + parameters.len()]
            .copy_from_slice(parameters.as_bytes());
        self.target_count = 1;
        self.data_size = (DM_HEADER_BYTES + next) as u32;
        Ok(())
    }

    fn call(
        &mut self,
        control: &File,
        request: libc::c_ulong,
        name: &'static str,
    ) -> Result<(), DeviceError> {
        // SAFETY: `self` is a live `struct dm_ioctl` with `data_size` bytes behind it (the
        // payload is part of the same allocation), as the kernel reads and writes it.
        let result = unsafe { libc::ioctl(control.as_raw_fd(), request, self as *mut DmRequest) };
        if result < 0 {
            return Err(ioctl_error(name)(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// The dm-verity table line for `parameters` over `data` (hash tree on the same device).
pub fn verity_table(
    data: &BlockDevice,
    parameters: &VerityParameters,
) -> Result<String, DeviceError> {
    let block_bytes = u64::from(parameters.data_block_bytes);
    if block_bytes == 0 || !parameters.hash_offset_bytes.is_multiple_of(block_bytes) {
        return Err(DeviceError::Invalid(
            "verity hash offset is not a multiple of the block size".into(),
        ));
    }
    // The superblock occupies the first hash block; the tree starts right after it.
    let hash_start_block = parameters.hash_offset_bytes / block_bytes + 1;
    let salt = if parameters.salt.is_empty() {
        "-".to_owned()
    } else {
        parameters
            .salt
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    };
    let root: String = parameters
        .root_hash
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Ok(format!(
        "1 {device} {device} {data_block} {hash_block} {blocks} {hash_start_block} {algorithm} {root} {salt}",
        device = data.numbers(),
        data_block = parameters.data_block_bytes,
        hash_block = parameters.hash_block_bytes,
        blocks = parameters.data_blocks,
        algorithm = parameters.algorithm,
    ))
}

/// Creates device-mapper device `name`: a read-only dm-verity target over `data`, and returns
/// its `/dev/dm-N` node (devtmpfs makes it; there is no udev for `/dev/mapper/<name>`).
pub fn create_verity_device(
    name: &str,
    data: &BlockDevice,
    parameters: &VerityParameters,
) -> Result<BlockDevice, DeviceError> {
    let table = verity_table(data, parameters)?;
    let length_sectors = parameters
        .data_blocks
        .checked_mul(u64::from(parameters.data_block_bytes) / 512)
        .ok_or_else(|| DeviceError::Invalid("verity data size overflows".into()))?;
    let control = open_device("/dev/mapper/control", true)?;

    let mut request = DmRequest::new(name)?;
    request.call(&control, DM_VERSION, "DM_VERSION")?;

    let mut request = DmRequest::new(name)?;
    request.call(&control, DM_DEV_CREATE, "DM_DEV_CREATE")?;
    let device_number = request.device;

    let mut request = DmRequest::new(name)?;
    request.set_target(length_sectors, "verity", &table)?;
    // verity refuses a table that is not loaded read-only.
    request.flags = DM_READONLY_FLAG;
    request.call(&control, DM_TABLE_LOAD, "DM_TABLE_LOAD")?;

    // DM_DEV_SUSPEND without the suspend flag resumes: the loaded table goes live.
    let mut request = DmRequest::new(name)?;
    request.call(&control, DM_DEV_SUSPEND, "DM_DEV_SUSPEND (resume)")?;

    // The kernel encodes `dev` as glibc's makedev does for majors below 4096.
    let major = libc::major(device_number);
    let minor = libc::minor(device_number);
    Ok(BlockDevice {
        path: PathBuf::from(format!("/dev/dm-{minor}")),
        major,
        minor,
    })
}

/// The status line of device-mapper device `name` (for verity: `V` verified so far, `C` a
/// corrupted block was seen).
pub fn device_status(name: &str) -> Result<String, DeviceError> {
    let control = open_device("/dev/mapper/control", true)?;
    let mut request = DmRequest::new(name)?;
    request.call(&control, DM_TABLE_STATUS, "DM_TABLE_STATUS")?;
    if request.target_count == 0 {
        return Ok(String::new());
    }
    let parameters = &request.payload[DM_TARGET_SPEC_BYTES..];
    let end = parameters
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(parameters.len());
    Ok(String::from_utf8_lossy(&parameters[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verity_table_names_the_tree_after_the_superblock() {
        let parameters = VerityParameters {
            algorithm: "sha256".into(),
            data_block_bytes: 4096,
            hash_block_bytes: 4096,
            data_blocks: 245,
            hash_offset_bytes: 245 * 4096,
            salt: vec![0xab, 0x01],
            root_hash: [0x11; 32],
        };
        let device = BlockDevice {
            path: "/dev/loop0".into(),
            major: 7,
            minor: 0,
        };
        let table = verity_table(&device, &parameters).unwrap();
        assert_eq!(
            table,
            format!(
                "1 7:0 7:0 4096 4096 245 246 sha256 {} ab01",
                "11".repeat(32)
            )
        );
    }

    #[test]
    fn table_is_padded_to_eight_bytes() {
        let mut request = DmRequest::new("root").unwrap();
        request.set_target(8, "verity", "abc").unwrap();
        let next = u32::from_ne_bytes(request.payload[20..24].try_into().unwrap());
        assert_eq!(next % 8, 0);
        assert!(next as usize >= DM_TARGET_SPEC_BYTES + 4);
        assert!(DmRequest::new("a/b").is_err());
    }
}
