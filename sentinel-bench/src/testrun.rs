//! Cost per packet through `BPF_PROG_TEST_RUN`: our program against
//! xdp-filter's on the same frames and entry counts, and the time our
//! denylist takes to load them.
//!
//! For each entry kind and count, both programs are loaded side by side
//! with the same entries (xdp-filter: one exact address inside each prefix,
//! the only thing it can match); then, round after round, each runs the
//! hit frame and the miss frame `repeat` times, the order alternating
//! between rounds so that neither always runs on a warmer cache. The kernel
//! reports the mean time per run; the tables show the median over rounds.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use sentinel::{
    config::KernelConfig,
    kernel::{Kernel, NewRule},
    net::RuleList,
};

use crate::{
    bpf::{self, PinDir},
    entries::{EntrySet, Kind},
    xdp_filter::{PeerProgram, STOCK_CAPACITY, StockXdpFilter},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// How hard to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sizes: Vec<usize>,
    pub repeat: u32,
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    Hit,
    Miss,
}

impl Case {
    fn action(self) -> u32 {
        match self {
            Case::Hit => XDP_DROP,
            Case::Miss => XDP_PASS,
        }
    }
}

/// Medians over rounds, in nanoseconds per packet.
#[derive(Debug, Clone)]
pub struct Cell {
    pub kind: Kind,
    pub entries: usize,
    pub case: Case,
    pub ours: Vec<f64>,
    pub peer: Vec<f64>,
    /// `xdp-filter load` itself (maps capped at 10,000), when measured.
    pub stock: Vec<f64>,
}

/// How long loading took.
#[derive(Debug, Clone)]
pub struct LoadTime {
    pub kind: Kind,
    pub entries: usize,
    /// `RuleTables::import` (batched map updates).
    pub ours: Duration,
    /// The same prefixes into a bare LPM trie with the key and value sizes
    /// of Sentinel's old prefix store, batched: what the kernel alone
    /// needed to load them before the prefix indexes.
    pub bare_trie: Duration,
    /// Batched updates of xdp-filter's hash map, for reference.
    pub peer: Duration,
}

/// Fills a fresh, unpinned LPM trie shaped like Sentinel's denylist before
/// its prefix indexes with `set` in batches; how long the syscalls took
/// (keys and values are built first). A reference for the load table.
fn bare_trie(set: &EntrySet) -> Result<Duration> {
    let data_len = if set.kind.is_v6() { 16 } else { 4 };
    let key_size = 4 + data_len;
    let value_size = std::mem::size_of::<sentinel_common::RuleValue>();
    let n = set.prefixes.len();
    let fd = bpf::create_map(
        bpf::MAP_TYPE_LPM_TRIE,
        key_size as u32,
        value_size as u32,
        u32::try_from(n.max(1)).context("too many entries")?,
        bpf::F_NO_PREALLOC,
    )
    .context("cannot create an LPM trie")?;
    let mut keys = Vec::with_capacity(n * key_size);
    for prefix in &set.prefixes {
        // struct bpf_lpm_trie_key: host-order prefix length, then the
        // address in network order.
        keys.extend_from_slice(&u32::from(prefix.prefix_len()).to_ne_bytes());
        match prefix.network() {
            IpAddr::V4(a) => keys.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => keys.extend_from_slice(&a.octets()),
        }
    }
    let values = vec![0u8; n * value_size];
    let start = Instant::now();
    bpf::update_many(fd.as_fd(), key_size, value_size, &keys, &values)
        .context("cannot fill the bare LPM trie")?;
    Ok(start.elapsed())
}

/// Our program with its own pinned maps, removed on drop.
pub struct Ours {
    pub kernel: Kernel,
    // Dropped after the kernel (fields drop in order).
    _pins: PinDir,
}

impl Ours {
    /// Loads with denylist capacities of at least `entries`.
    pub fn load(entries: usize) -> Result<Self> {
        let pins = PinDir::new("ours");
        let mut cfg = KernelConfig {
            pin_path: pins.path.clone(),
            ..KernelConfig::default()
        };
        let wanted = u32::try_from(entries).context("too many entries")?;
        cfg.capacity.denylist_v4 = cfg.capacity.denylist_v4.max(wanted);
        cfg.capacity.denylist_v6 = cfg.capacity.denylist_v6.max(wanted);
        let kernel = Kernel::open(&cfg).context("cannot load Sentinel's XDP program")?;
        Ok(Self {
            kernel,
            _pins: pins,
        })
    }

    /// Imports `set` into the denylist; how long it took.
    pub fn import(&mut self, set: &EntrySet) -> Result<Duration> {
        let rule = NewRule {
            ttl: None,
            source: "bench".into(),
            reason: "bench".into(),
        };
        let start = Instant::now();
        let imported = self
            .kernel
            .tables
            .import(RuleList::Deny, &set.prefixes, &rule);
        let took = start.elapsed();
        if let Some(e) = imported.stopped {
            bail!("import stopped after {} entries: {e}", imported.created);
        }
        ensure!(
            imported.created == set.prefixes.len(),
            "import created {} of {} entries",
            imported.created,
            set.prefixes.len()
        );
        Ok(took)
    }

    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        self.kernel
            .test_run(frame, repeat)
            .context("BPF_PROG_TEST_RUN of Sentinel's program failed")
    }
}

/// A test run: (frame, repeat) -> (XDP action, mean time per run).
type Runner<'a> = dyn Fn(&[u8], u32) -> Result<(u32, Duration)> + 'a;

/// Runs `frame` through `run` `repeat` times; ns per packet. Fails unless
/// the program answered `expect`.
fn measure(who: &str, run: &Runner<'_>, frame: &[u8], repeat: u32, expect: u32) -> Result<f64> {
    let (action, mean) = run(frame, repeat)?;
    ensure!(
        action == expect,
        "{who} returned XDP action {action}, expected {expect}: the benchmark is not measuring what it claims"
    );
    Ok(mean.as_nanos() as f64)
}

/// A program measured in a cell: its name, how to run it, where its
/// samples go.
struct Contender<'a> {
    who: &'static str,
    run: &'a Runner<'a>,
    samples: &'a mut Vec<f64>,
}

impl<'a> Contender<'a> {
    fn new(who: &'static str, run: &'a Runner<'a>, samples: &'a mut Vec<f64>) -> Self {
        Self { who, run, samples }
    }
}

/// A warm-up run of each contender (which also checks the action), then
/// `plan.rounds` rounds in which each runs `frame` `plan.repeat` times, the
/// order rotating by one per round.
fn alternate(
    plan: &Plan,
    frame: &[u8],
    expect: u32,
    contenders: &mut [Contender<'_>],
) -> Result<()> {
    let warm = (plan.repeat / 10).max(1);
    for c in contenders.iter() {
        measure(c.who, c.run, frame, warm, expect)?;
    }
    let len = contenders.len();
    for round in 0..plan.rounds {
        crate::interrupted()?;
        for i in 0..len {
            let c = &mut contenders[(i + round) % len];
            let ns = measure(c.who, c.run, frame, plan.repeat, expect)?;
            c.samples.push(ns);
        }
    }
    Ok(())
}

/// The fixed cost of each program: empty lists, the IPv4 and the IPv6 miss
/// frames (cells with 0 entries).
pub fn fixed_cost(plan: &Plan) -> Result<Vec<Cell>> {
    let ours = Ours::load(1)?;
    let peer = PeerProgram::load(STOCK_CAPACITY)?;
    let ours_run = |f: &[u8], r: u32| ours.test_run(f, r);
    let peer_run = |f: &[u8], r: u32| peer.test_run(f, r);
    let mut cells = Vec::new();
    for kind in [Kind::V4Host, Kind::V6Prefix] {
        let set = EntrySet::generate(kind, 1_000);
        let frame = set.frame(set.miss);
        let mut cell = Cell {
            kind,
            entries: 0,
            case: Case::Miss,
            ours: Vec::new(),
            peer: Vec::new(),
            stock: Vec::new(),
        };
        alternate(
            plan,
            &frame,
            XDP_PASS,
            &mut [
                Contender::new("ours", &ours_run, &mut cell.ours),
                Contender::new("xdp-filter", &peer_run, &mut cell.peer),
            ],
        )?;
        cells.push(cell);
    }
    Ok(cells)
}

/// Loads `set` into a fresh copy of our program and of xdp-filter's, and
/// into a bare LPM trie; both programs stay loaded for measuring.
fn load_both(set: &EntrySet) -> Result<(Ours, PeerProgram, LoadTime)> {
    let n = set.prefixes.len();
    let mut ours = Ours::load(n)?;
    let ours_load = ours.import(set)?;
    let bare_load = bare_trie(set)?;
    let capacity = u32::try_from(n)
        .context("too many entries")?
        .max(STOCK_CAPACITY);
    let peer = PeerProgram::load(capacity)?;
    let start = Instant::now();
    peer.fill(&set.addresses)?;
    let peer_load = start.elapsed();
    let load = LoadTime {
        kind: set.kind,
        entries: n,
        ours: ours_load,
        bare_trie: bare_load,
        peer: peer_load,
    };
    Ok((ours, peer, load))
}

/// The load times alone, `n` entries of each of `kinds` (section 2 when
/// section 1 did not load that many).
pub fn load_times(kinds: &[Kind], n: usize) -> Result<Vec<LoadTime>> {
    let mut loads = Vec::new();
    for &kind in kinds {
        crate::interrupted()?;
        eprintln!("    {} x {n}: generating, loading in-process", kind.label());
        let set = EntrySet::generate(kind, n);
        let (ours, peer, load) = load_both(&set)?;
        // Unloaded before the next kind is loaded.
        drop((ours, peer));
        loads.push(load);
    }
    Ok(loads)
}

/// Every cell of the table and the load times, for `plan`. `stock`: an
/// interface xdp-filter may be attached to, for the cross-check at the
/// smallest size.
pub fn run(plan: &Plan, stock: Option<&str>) -> Result<(Vec<Cell>, Vec<LoadTime>)> {
    let mut cells = Vec::new();
    let mut loads = Vec::new();
    let smallest = plan.sizes.iter().copied().min().unwrap_or(0);
    for kind in Kind::ALL {
        for &n in &plan.sizes {
            eprintln!("    {} x {n}: generating, loading", kind.label());
            let set = EntrySet::generate(kind, n);
            let (ours, peer, load) = load_both(&set)?;
            loads.push(load);
            let stock_filter = match stock {
                Some(interface) if n == smallest && n <= STOCK_CAPACITY as usize => {
                    let s = StockXdpFilter::load(interface, "native")?;
                    s.fill(&set.addresses)?;
                    Some(s)
                }
                _ => None,
            };
            eprintln!(
                "    {} x {n}: measuring ({} rounds of {} runs)",
                kind.label(),
                plan.rounds,
                plan.repeat
            );
            let ours_run = |f: &[u8], r: u32| ours.test_run(f, r);
            let peer_run = |f: &[u8], r: u32| peer.test_run(f, r);
            let stock_run = |f: &[u8], r: u32| match &stock_filter {
                Some(s) => s.test_run(f, r),
                None => bail!("no stock xdp-filter"),
            };
            for case in [Case::Hit, Case::Miss] {
                let src = match case {
                    Case::Hit => set.hit,
                    Case::Miss => set.miss,
                };
                let frame = set.frame(src);
                let mut cell = Cell {
                    kind,
                    entries: n,
                    case,
                    ours: Vec::new(),
                    peer: Vec::new(),
                    stock: Vec::new(),
                };
                let mut contenders = vec![
                    Contender::new("ours", &ours_run, &mut cell.ours),
                    Contender::new("xdp-filter", &peer_run, &mut cell.peer),
                ];
                if stock_filter.is_some() {
                    contenders.push(Contender::new(
                        "xdp-filter (stock)",
                        &stock_run,
                        &mut cell.stock,
                    ));
                }
                alternate(plan, &frame, case.action(), &mut contenders)?;
                cells.push(cell);
            }
        }
    }
    Ok((cells, loads))
}
