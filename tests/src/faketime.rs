//! A wall clock the test can step while a real `iris serve` runs: Debian's
//! libfaketime (package `faketime`, installed with apt-get if missing),
//! preloaded into the server, reading its offset from a file on every call
//! (`FAKETIME_TIMESTAMP_FILE` with `FAKETIME_NO_CACHE=1`), so writing the
//! file steps the process's wall clock at once, as NTP or `date -s` would.
//! `FAKETIME_DONT_FAKE_MONOTONIC=1` leaves CLOCK_MONOTONIC real: a step moves
//! the wall clock only (libfaketime fakes both by default).

use crate::unique_temp_path;
use std::path::PathBuf;

/// Where Debian's `libfaketime` package puts the library.
pub const LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Installs the `faketime` package if the library is missing.
pub fn ensure_installed() {
    crate::apt::ensure_installed("faketime", || std::path::Path::new(LIBRARY).exists());
}

/// One process's faked wall clock: an offset from the real one, in a file.
pub struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    /// A clock at the real time (offset +0).
    pub fn new() -> FakeClock {
        ensure_installed();
        let clock = FakeClock {
            file: unique_temp_path("faketime").with_extension("rc"),
        };
        clock.set_offset_secs(0);
        clock
    }

    /// The environment for the process whose wall clock this is.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", LIBRARY.to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
            // File times stay real (nothing here is about them).
            ("NO_FAKE_STAT", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Steps the wall clock to the real time plus `secs` (negative: back).
    /// Written beside and renamed over the file, so that the process never
    /// reads half a value.
    pub fn set_offset_secs(&self, secs: i64) {
        let next = self.file.with_extension("rc.next");
        std::fs::write(&next, format!("{secs:+}\n")).expect("write the faketime file");
        std::fs::rename(&next, &self.file).expect("rename the faketime file");
    }
}

impl Default for FakeClock {
    fn default() -> FakeClock {
        FakeClock::new()
    }
}

impl Drop for FakeClock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}
