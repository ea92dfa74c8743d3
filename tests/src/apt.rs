//! Debian packages a test needs (etcd-server, faketime), installed with
//! apt-get when missing, as root on the test machines.

use std::process::Command;

/// apt-get runs one at a time on a machine: test binaries take turns here.
const INSTALL_LOCK: &str = "/tmp/iris-tests-apt.lock";

/// Installs `package` unless `installed()` already holds; fails the test if
/// it still does not hold afterwards.
pub fn ensure_installed(package: &str, installed: impl Fn() -> bool) {
    if installed() {
        return;
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(INSTALL_LOCK)
        .expect("open the apt lock file");
    lock.lock().expect("lock the apt lock file");
    if installed() {
        return;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap_or_else(|e| panic!("apt-get (a test needs {package} from Debian): {e}"))
    };
    if !install().status.success() {
        // The package lists may be missing on a fresh machine.
        let update = Command::new("apt-get").args(["update", "-q"]).output();
        assert!(
            update.is_ok_and(|o| o.status.success()),
            "apt-get update failed"
        );
        let out = install();
        assert!(
            out.status.success(),
            "apt-get install {package} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(installed(), "{package} is still not usable after apt-get");
}
