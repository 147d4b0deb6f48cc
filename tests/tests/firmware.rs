//! `--firmware` on this host's `/dev/kvm`: Debian's SeaBIOS boots (real
//! mode runs here, even on PVM), finds fw_cfg, loads Abide's ACPI tables
//! through `etc/table-loader`, prints its screen on the serial console, and
//! a snapshot of the firmware-booted guest carries the firmware image:
//! after the host file is replaced by another build of the same size, the
//! restored guest keeps its own. Bad images get clear errors.
//!
//! Option ROMs and a Linux kernel through the firmware are in
//! tests/tests/linux_firmware.rs (they need real hardware virtualization).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use abide_tests::{abide_bin, read_serial, run_abide, sha256_bytes, split_snapshot, temp_dir};
use serde_json::json;

const BIOS: &str = "/usr/share/seabios/bios.bin";
/// The 256 KiB build: it also parses the DSDT it was given (and says so),
/// which the 128 KiB build leaves out.
const BIOS_256K: &str = "/usr/share/seabios/bios-256k.bin";
const TIMEOUT: Duration = Duration::from_secs(180);
/// What SeaBIOS prints on the serial console (sercon) once no device
/// booted.
const NO_BOOT: &str = "No bootable device";

fn bios() -> Vec<u8> {
    std::fs::read(BIOS).unwrap_or_else(|e| {
        panic!("{BIOS} is missing ({e}): install seabios (resources/scripts/setup.sh does)")
    })
}

struct Running {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
}

impl Running {
    fn launch(dir: &Path, tag: &str, args: &[&str]) -> Self {
        let api = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.serial"));
        let child = Command::new(abide_bin())
            .args(args)
            .arg("--api-socket")
            .arg(&api)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start abide");
        Self { child, api, serial }
    }

    fn wait_for(&mut self, needle: &str) {
        abide_tests::wait_for_serial(&mut self.child, &self.serial, needle, TIMEOUT);
    }

    fn snapshot_and_stop(mut self, path: &Path) {
        let out = abide_tests::snapshot_and_stop(&self.api, path);
        assert_eq!(out.code, Some(0), "abide snapshot failed\n{out}");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "abide did not quit cleanly: {status}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SeaBIOS boots with fw_cfg: e820, both vCPUs, Abide's ACPI tables, the
/// serial console; then, with nothing to boot, it says so on COM1.
#[test]
fn seabios_boots_and_gets_what_fw_cfg_serves() {
    let _ = bios();
    assert!(
        Path::new(BIOS_256K).is_file(),
        "{BIOS_256K} is missing: install seabios"
    );
    let dir = temp_dir("fw-boot");
    let log = dir.join("fw.log");
    let mut vm = Running::launch(
        &dir,
        "boot",
        &[
            "run",
            "--machine",
            "pc-1.0",
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--firmware",
            BIOS_256K,
            "--firmware-log",
            log.to_str().expect("utf-8"),
        ],
    );
    vm.wait_for(NO_BOOT);
    let fw = read_serial(&log);
    for needle in [
        "Found QEMU fw_cfg",
        "QEMU fw_cfg DMA interface supported",
        "qemu/e820: addr 0x0000000000100000 len 0x000000000ff00000 [RAM]",
        "Found 2 cpu(s)",
        // Abide's tables, placed by etc/table-loader, found by SeaBIOS.
        "ACPI: parse DSDT at",
        "sercon: using ioport 0x3f8",
    ] {
        assert!(
            fw.contains(needle),
            "no '{needle}' in the firmware log\n{fw}"
        );
    }
    assert!(read_serial(&vm.serial).contains("SeaBIOS (version"));
}

/// The firmware image travels with the snapshot (`rom.firmware`, optional
/// as every `rom.*` section): the host file is replaced by another build
/// of the same size, and the restored guest keeps the image it booted
/// with, which its next snapshot carries again.
#[test]
fn the_firmware_image_travels_with_the_snapshot() {
    let booted = bios();
    let dir = temp_dir("fw-snap");
    let image = dir.join("bios.bin");
    std::fs::write(&image, &booted).expect("copy");
    let image_arg = image.to_str().expect("utf-8").to_string();
    let mut vm = Running::launch(
        &dir,
        "before",
        &[
            "run",
            "--machine",
            "pc-1.0",
            "--memory",
            "128M",
            "--firmware",
            &image_arg,
        ],
    );
    vm.wait_for(NO_BOOT);
    let snap = dir.join("fw.snap");
    vm.snapshot_and_stop(&snap);
    let parts = split_snapshot(&std::fs::read(&snap).expect("read"));
    let (entry, saved) = parts.section("rom.firmware").expect("rom.firmware");
    assert_eq!(entry["optional"], json!(true));
    assert_eq!(saved, &booted[..]);
    // fw_cfg's registers: the last item SeaBIOS selected, read to its end.
    let (_, fw_cfg) = parts.section("device.fw_cfg").expect("device.fw_cfg");
    let fw_cfg: serde_json::Value = serde_json::from_slice(fw_cfg).expect("fw_cfg json");
    assert!(fw_cfg["selector"].as_u64().is_some(), "{fw_cfg}");
    assert!(fw_cfg["offset"].as_u64().is_some_and(|o| o > 0), "{fw_cfg}");
    assert_eq!(
        parts.header["manifest"]["firmware"]["image_sha256"],
        json!(sha256_bytes(&booted))
    );

    // Another build of the same size: one byte differs.
    let mut other = booted.clone();
    other[0x100] ^= 0xff;
    std::fs::write(&image, &other).expect("replace");
    let snap_arg = snap.to_str().expect("utf-8").to_string();
    let mut restored = Running::launch(&dir, "after", &["restore", &snap_arg]);
    // The restored firmware keeps running: it retries the boot and says
    // so again (60 s later in SeaBIOS's time, which the restore skips).
    std::thread::sleep(Duration::from_secs(2));
    let again = dir.join("again.snap");
    let _ = &mut restored;
    restored.snapshot_and_stop(&again);
    let parts = split_snapshot(&std::fs::read(&again).expect("read"));
    let (_, kept) = parts.section("rom.firmware").expect("rom.firmware");
    assert_eq!(
        kept,
        &booted[..],
        "the guest keeps its image, not the host file's"
    );
    assert_eq!(
        parts.header["manifest"]["firmware"]["image_sha256"],
        json!(sha256_bytes(&booted))
    );
}

/// Bad images are refused before the guest starts, clearly.
#[test]
fn bad_firmware_images_are_refused() {
    let dir = temp_dir("fw-bad");
    let big = dir.join("big.bin");
    std::fs::write(&big, vec![0u8; 512 << 10]).expect("big");
    let empty = dir.join("empty.bin");
    std::fs::write(&empty, b"").expect("empty");
    let odd = dir.join("odd.bin");
    std::fs::write(&odd, vec![0u8; 1000]).expect("odd");
    let cases: [(&Path, &str); 5] = [
        (
            &big,
            "larger than machine type 'pc-1.0''s 262144-byte (256 KiB) firmware slot",
        ),
        (&empty, "is empty"),
        (
            &odd,
            "is 1000 bytes: a PC firmware image is a multiple of 65536 bytes",
        ),
        (&dir, "is not a regular file"),
        (
            Path::new("/nonexistent/bios.bin"),
            "cannot read the firmware image",
        ),
    ];
    for (path, needle) in cases {
        let out = run_abide(
            &[
                "run",
                "--machine",
                "pc-1.0",
                "--firmware",
                path.to_str().expect("utf-8"),
            ],
            None,
            Duration::from_secs(30),
        );
        assert_eq!(out.code, Some(1), "{}: {out}", path.display());
        assert!(out.stderr.contains(needle), "{}: {out}", path.display());
    }
    let out = run_abide(
        &["run", "--machine", "pc-1.0", "--firmware-log", "/tmp/x.log"],
        None,
        Duration::from_secs(30),
    );
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("--firmware-log needs --firmware"),
        "{out}"
    );
}
