//! The Python client (`clients/python`, package `iris-client`): installed
//! with pip as a user would (`pip install ./clients/python`, and pytest),
//! then its pytest suite runs against real `iris serve` processes started
//! from this build's binary: sending, offline delivery, dedup, reconnect
//! across a server restart, TLS with JWT logins, the asyncio client.

use std::process::Command;

#[test]
fn python_client_suite_passes_against_this_build() {
    tests::python::ensure_iris_client();
    let package = tests::python::client_package();
    let python = tests::python::python();
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(&package)
        .env("IRIS_BIN", tests::iris_bin())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{report}");
    assert!(report.contains(" passed"), "{report}");
    assert!(
        !report.contains("skipped"),
        "no test may be skipped:\n{report}"
    );
}
