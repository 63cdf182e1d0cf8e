//! Loading a large denylist end to end: `sentinel deny import FILE` against
//! a running daemon (the CLI reads and checks every line, sends chunks of
//! 50,000 prefixes over the admin socket, the daemon writes them with
//! batched map updates).

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    daemon::{self, Daemon},
    entries::{EntrySet, Kind},
};

pub struct EndToEnd {
    pub kind: Kind,
    pub entries: usize,
    /// From starting the CLI to its exit.
    pub wall: Duration,
}

/// Imports `n` entries of each kind, each into a fresh daemon.
pub fn run(bin: &Path, kinds: &[Kind], n: usize) -> Result<Vec<EndToEnd>> {
    let dir = tempfile::Builder::new()
        .prefix("sentinel-bench-import-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mut out = Vec::new();
    for &kind in kinds {
        crate::interrupted()?;
        eprintln!("    {} x {n}: writing the file", kind.label());
        let set = EntrySet::generate(kind, n);
        let mut text = String::with_capacity(n * 20);
        for prefix in &set.prefixes {
            let _ = writeln!(text, "{prefix}");
        }
        let file = dir.path().join("denylist.txt");
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
        let daemon = Daemon::start(bin, None)?;
        eprintln!("    {} x {n}: sentinel deny import", kind.label());
        let file_arg = file.to_string_lossy().into_owned();
        let start = Instant::now();
        daemon.cli_ok(&["deny", "import", &file_arg])?;
        let wall = start.elapsed();
        let mut client = daemon.client()?;
        let loaded = daemon::denylist_entries(&mut client)?;
        ensure!(
            loaded == n,
            "the daemon holds {loaded} denylist entries after importing {n}"
        );
        out.push(EndToEnd {
            kind,
            entries: n,
            wall,
        });
    }
    Ok(out)
}
