//! Python for the tests that run real Python clients: the interpreter
//! (`$PYTHON`, else `python3`), and the packages they need, installed with
//! pip once per test process when missing: this repository's `iris-client`
//! (`pip install ./clients/python`, as a user would) with pytest, and
//! `paho-mqtt` 2.x.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

/// The paho-mqtt the tests install when it is missing (its 2.x callback API).
pub const PAHO_REQUIREMENT: &str = "paho-mqtt>=2,<3";

/// The interpreter the tests run.
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `clients/python` in this repository.
pub fn client_package() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .join("clients/python")
}

/// `pip install --quiet ARGS...`, failing the test with pip's output.
fn pip_install(args: &[&str], what: &str) {
    let out = Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} not runnable ({what} needs Python 3.9+): {e}", python()));
    assert!(
        out.status.success(),
        "pip install {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs this build's `iris-client` package and pytest (each test
/// process once: the package under test is always the repository's).
pub fn ensure_iris_client() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let package = client_package();
        pip_install(
            &[package.to_str().expect("utf-8 path"), "pytest"],
            "the Python client",
        );
    });
}

/// Installs paho-mqtt 2.x unless it is there.
pub fn ensure_paho() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let check =
            "import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith('2.') else 1)";
        let ok = Command::new(python())
            .args(["-c", check])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            pip_install(&[PAHO_REQUIREMENT], "the MQTT tests");
        }
    });
}
