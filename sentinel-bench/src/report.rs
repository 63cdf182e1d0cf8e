//! The tables `sentinel-bench xdp` prints, with the targets read off them.

use std::time::Duration;

use crate::{
    entries::{Kind, count_label},
    filters::Dropper,
    flood::Flood,
    import::EndToEnd,
    latency::Latency,
    table::{Table, max, median, percent, verdict},
    testrun::{Case, Cell, LoadTime},
};

/// Largest growth from the smallest to the largest size that meets the
/// target.
pub const GROWTH_TARGET: f64 = 1.20;
/// Longest load of the largest list that meets the target.
pub const LOAD_TARGET: Duration = Duration::from_secs(2);

fn ns(v: f64) -> String {
    format!("{v:.0}")
}

/// `median (min-max)` of nanosecond samples.
fn ns_spread(samples: &[f64]) -> String {
    let min = samples.iter().copied().fold(f64::NAN, f64::min);
    format!("{:.0} ({min:.0}-{:.0})", median(samples), max(samples))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

fn case_label(kind: Kind, case: Case) -> String {
    match case {
        Case::Hit => format!("hit /{} (drop)", kind.hit_len()),
        Case::Miss => "miss (pass)".to_owned(),
    }
}

fn peer_given(kind: Kind, n: usize) -> String {
    match kind {
        Kind::V4Host => format!("the same {} addresses", count_label(n)),
        _ => format!("{} addresses, 1 per prefix (no prefixes)", count_label(n)),
    }
}

/// Per-packet cost, every cell.
pub fn per_packet(cells: &[Cell], repeat: u32, rounds: usize) -> Table {
    let mut t = Table::new(
        "1. Nanoseconds per packet, BPF_PROG_TEST_RUN (median of rounds)",
        &[
            "entries",
            "kind",
            "packet",
            "sentinel ns (min-max)",
            "xdp-filter ns (min-max)",
            "xdp-filter was given",
            "sentinel / xdp-filter",
            "target: sentinel <= xdp-filter",
        ],
    );
    for c in cells {
        let (ours, peer) = (median(&c.ours), median(&c.peer));
        t.row(vec![
            count_label(c.entries),
            c.kind.label().to_owned(),
            case_label(c.kind, c.case),
            ns_spread(&c.ours),
            ns_spread(&c.peer),
            peer_given(c.kind, c.entries),
            format!("{:.2}", ours / peer),
            verdict(ours <= peer),
        ]);
    }
    t.note(&format!(
        "Each number: median (and range) over {rounds} rounds of the kernel's mean over {repeat} runs of one frame; rounds rotate which program runs first. Hit rows: the frame's source lies in an entry of the length shown (the most common length of the list)."
    ));
    t.note("xdp-filter: its own object (xdpfilt_alw_ip.o, `-f ipv4,ipv6`, allow policy) with its two address maps resized to the entry count (as shipped they hold 10,000); exact addresses only, so prefix rows give it one address inside each prefix, and the hit packet's source is one of them.");
    t
}

/// Each program's cost with nothing to look up.
pub fn fixed_cost(cells: &[Cell]) -> Table {
    let mut t = Table::new(
        "1d. Fixed cost: empty lists, miss packet",
        &[
            "packet",
            "sentinel ns",
            "xdp-filter ns",
            "sentinel - xdp-filter",
        ],
    );
    for c in cells {
        let (ours, peer) = (median(&c.ours), median(&c.peer));
        let family = if c.kind.is_v6() {
            "IPv6 UDP"
        } else {
            "IPv4 UDP"
        };
        t.row(vec![
            family.to_owned(),
            ns(ours),
            ns(peer),
            format!("{:+.0} ns", ours - peer),
        ]);
    }
    t.note("The miss frames of the rows above, with every list empty: what each program costs before any entry is looked at (parsing, empty lookups, counters, the test-run loop itself).");
    t
}

/// Growth from the smallest to the largest size, per kind and packet.
pub fn growth(cells: &[Cell]) -> Option<Table> {
    let smallest = cells.iter().map(|c| c.entries).min()?;
    let largest = cells.iter().map(|c| c.entries).max()?;
    if smallest == largest {
        return None;
    }
    let (s, l) = (count_label(smallest), count_label(largest));
    let mut t = Table::new(
        &format!("1b. Growth with entry count, {s} -> {l}"),
        &[
            "kind",
            "packet",
            &format!("sentinel {s}"),
            &format!("sentinel {l}"),
            &format!("sentinel {l} vs {s}"),
            "target: <= +20%",
            &format!("xdp-filter {l} vs {s}"),
        ],
    );
    for kind in Kind::ALL {
        for case in [Case::Hit, Case::Miss] {
            let find = |n: usize| {
                cells
                    .iter()
                    .find(|c| c.kind == kind && c.case == case && c.entries == n)
            };
            let (Some(a), Some(b)) = (find(smallest), find(largest)) else {
                continue;
            };
            let ours = median(&b.ours) / median(&a.ours);
            let peer = median(&b.peer) / median(&a.peer);
            t.row(vec![
                kind.label().to_owned(),
                case_label(kind, case),
                ns(median(&a.ours)),
                ns(median(&b.ours)),
                percent(ours),
                verdict(ours <= GROWTH_TARGET),
                percent(peer),
            ]);
        }
    }
    Some(t)
}

/// xdp-filter as `xdp-filter load` leaves it against our resized copy.
pub fn stock_check(cells: &[Cell]) -> Option<Table> {
    let checked: Vec<&Cell> = cells.iter().filter(|c| !c.stock.is_empty()).collect();
    if checked.is_empty() {
        return None;
    }
    let mut t = Table::new(
        "1c. Cross-check: xdp-filter as `xdp-filter load` attaches it vs the resized copy",
        &[
            "entries",
            "kind",
            "packet",
            "`xdp-filter load` ns",
            "resized copy ns",
            "stock / copy",
        ],
    );
    for c in checked {
        let (stock, copy) = (median(&c.stock), median(&c.peer));
        t.row(vec![
            count_label(c.entries),
            c.kind.label().to_owned(),
            case_label(c.kind, c.case),
            ns(stock),
            ns(copy),
            format!("{:.2}", stock / copy),
        ]);
    }
    t.note("Stock: loaded by `xdp-filter load <veth> --mode native -f ipv4,ipv6` (maps of 10,000), filled through its pinned map, run with BPF_PROG_TEST_RUN like `bpftool prog run`.");
    Some(t)
}

/// Load times: in-process import and the end-to-end CLI import.
pub fn load(loads: &[LoadTime], e2e: &[EndToEnd]) -> Table {
    let largest = loads.iter().map(|l| l.entries).max().unwrap_or(0);
    let mut t = Table::new(
        "2. Time to load the denylist",
        &[
            "kind",
            "entries",
            "path",
            "time",
            "target: < 2 s (largest list)",
        ],
    );
    for l in loads {
        let target = if l.entries == largest {
            verdict(l.ours < LOAD_TARGET)
        } else {
            "-".to_owned()
        };
        t.row(vec![
            l.kind.label().to_owned(),
            count_label(l.entries),
            "RuleTables::import (in-process, batched)".to_owned(),
            ms(l.ours),
            target,
        ]);
        t.row(vec![
            l.kind.label().to_owned(),
            count_label(l.entries),
            "reference: bare LPM trie (the old prefix store), batched".to_owned(),
            ms(l.bare_trie),
            "-".to_owned(),
        ]);
        t.row(vec![
            l.kind.label().to_owned(),
            count_label(l.entries),
            "xdp-filter hash map, batched (reference)".to_owned(),
            ms(l.peer),
            "-".to_owned(),
        ]);
    }
    for e in e2e {
        t.row(vec![
            e.kind.label().to_owned(),
            count_label(e.entries),
            "`sentinel deny import FILE` to a running daemon".to_owned(),
            ms(e.wall),
            verdict(e.wall < LOAD_TARGET),
        ]);
    }
    if !loads.is_empty() {
        t.note("Bare LPM trie: the same prefixes written with BPF_MAP_UPDATE_BATCH (8,192 per call) into a fresh, unpinned LPM trie with the key and value sizes Sentinel used before its prefix indexes, keys built beforehand: what the kernel alone needed to fill the old store, whatever the daemon keeps beside it.");
    }
    t.note("End to end: from starting the CLI to its exit (it reads and checks every line on every core, then sends the list as one `import_packed` request of binary records; the daemon checks every record and writes them: new hosts, IPv6 prefixes and IPv4 long prefixes with batched map updates on several threads, IPv4 rules through mmap); the daemon is then asked how many entries it holds.");
    t
}

/// `deny add` to the first drop.
pub fn latency(l: &Latency) -> Table {
    let as_us = |d: &[Duration]| d.iter().map(|x| x.as_secs_f64() * 1e6).collect::<Vec<_>>();
    let fmt = |v: f64| format!("{v:.1} us");
    let mut t = Table::new(
        "3. From `sentinel deny add` to the first dropped packet (veth, native XDP)",
        &["measure", "median", "max", "samples"],
    );
    for (label, values) in [
        ("`deny add` returned -> drop seen", as_us(&l.after_return)),
        ("`deny add` started -> drop seen", as_us(&l.after_start)),
        ("one counter read (resolution)", as_us(&l.polls)),
    ] {
        t.row(vec![
            label.to_owned(),
            fmt(median(&values)),
            fmt(max(&values)),
            values.len().to_string(),
        ]);
    }
    t.note(&format!(
        "The first counter read after the CLI exited already saw the drop in {} of {} repetitions. Datagrams the sender got out between the CLI's exit and the first drop seen, per repetition: {:?} (a few: the drop was counted as soon as the kernel processed the sender's next datagrams). Frames the program passed after `deny add` returned (until 20 ms after the first drop, all repetitions together): {} (ARP and IPv6 neighbour discovery would count here too). Counter: the attached program's per-CPU denylist counter (what `sentinel stats` shows), read with BPF_MAP_LOOKUP_ELEM in a loop; the CLI's exit is observed with a blocking waitid. Sender: {:.0} datagrams/s from inside the namespace (one every {:.1} us on average).",
        l.first_poll,
        l.after_return.len(),
        l.sent_between,
        l.passed_after,
        l.send_rate,
        1e6 / l.send_rate.max(1.0)
    ));
    t
}

/// CPU per dropped packet under a flood, per filter.
pub fn flood(floods: &[Flood], packets: u64, rounds: usize) -> Table {
    let mut t = Table::new(
        "4. CPU time per packet under a trafgen flood over veth (median of rounds)",
        &[
            "filter",
            "sent",
            "dropped by filter",
            "wall",
            "sender+softirq CPU per packet sent (min-max)",
            "same, per dropped",
            "/proc/stat busy per dropped",
            "vs sentinel (sender+softirq)",
        ],
    );
    let per_sent = |f: &Flood| f.attributed.as_secs_f64() * 1e6 / f.sent.max(1) as f64;
    let ours_per_sent = median(
        &floods
            .iter()
            .filter(|f| f.filter == Dropper::Sentinel)
            .map(per_sent)
            .collect::<Vec<_>>(),
    );
    for filter in Dropper::ALL {
        let runs: Vec<&Flood> = floods.iter().filter(|f| f.filter == filter).collect();
        if runs.is_empty() {
            continue;
        }
        let med =
            |g: &dyn Fn(&Flood) -> f64| median(&runs.iter().map(|f| g(f)).collect::<Vec<_>>());
        let sent = med(&|f| f.sent as f64);
        let attributed = med(&per_sent);
        let dropped_cells = if runs.iter().all(|f| f.dropped.is_some()) {
            let dropped = med(&|f| f.dropped.unwrap_or(0) as f64);
            let per_dropped =
                med(&|f| f.attributed.as_secs_f64() * 1e6 / f.dropped.unwrap_or(0).max(1) as f64);
            let system =
                med(&|f| f.system_wide.as_secs_f64() * 1e6 / f.dropped.unwrap_or(0).max(1) as f64);
            (
                format!("{dropped:.0}"),
                format!("{per_dropped:.2} us"),
                format!("{system:.2} us"),
            )
        } else {
            ("0 (passes)".to_owned(), "-".to_owned(), "-".to_owned())
        };
        t.row(vec![
            filter.label().to_owned(),
            format!("{sent:.0}"),
            dropped_cells.0,
            secs(Duration::from_secs_f64(med(&|f| f.wall.as_secs_f64()))),
            {
                let all: Vec<f64> = runs.iter().map(|f| per_sent(f)).collect();
                let min = all.iter().copied().fold(f64::NAN, f64::min);
                format!("{attributed:.2} us ({min:.2}-{:.2})", max(&all))
            },
            dropped_cells.1,
            dropped_cells.2,
            format!("{:.2}", attributed / ours_per_sent),
        ]);
    }
    t.note(&format!(
        "{rounds} rounds of {packets} identical 60-byte UDP frames per filter (trafgen -n {packets} -P 1, from inside the namespace), filter order rotating per round. Sender+softirq: trafgen's own CPU time (rusage; with tick-based accounting it includes the softirq work veth and the filters do in its context) plus the ksoftirqd threads' runtime. /proc/stat busy: user+nice+system+irq+softirq over all CPUs, which also counts every other process on this shared machine."
    ));
    t
}

/// A duration for the summary lines.
pub fn short(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        secs(d)
    } else if d >= Duration::from_millis(1) {
        ms(d)
    } else {
        us(d)
    }
}
