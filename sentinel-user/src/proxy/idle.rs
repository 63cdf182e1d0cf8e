//! Idle keep-alive connections, held without a task.
//!
//! A plain HTTP/1 connection that has parked (see `listener::Watched`)
//! needs nothing until its client sends again but its socket, when to give
//! up on it, and what it takes to serve it again. Waiting in a task of its
//! own, it would keep tokio's task cell, the task's future, its
//! registration with tokio's reactor and its shared state: about 1.8 KiB
//! of the daemon's memory for every idle client (docs/benchmarks.md). Here it is one slot in a table and its socket
//! one entry in an epoll set of this module's own (kernel memory, as an
//! idle connection is for nginx). One task, [`Idle::watch`], serves the
//! set: a connection with bytes to read goes back to tokio and is served
//! by a new task; one idle past its deadline, or whose client closed, is
//! closed here; when the daemon drains, all are closed.
//!
//! The sessions that parked connections freed are given back to the
//! system once parking quiets down (see [`Trim`]).
//!
//! Parking and resuming cost four `epoll_ctl` calls (out of tokio's set
//! and into this one, then back), paid only by a connection idle for
//! longer than `PARK_AFTER`.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    io,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
    time::Duration,
};

use tokio::{
    io::unix::AsyncFd,
    sync::{Notify, watch},
    time::Instant,
};
use tracing::{debug, warn};

/// How many readiness events one `epoll_wait` takes.
const EVENTS: usize = 256;

/// Idle connections, each with its `T`: what it takes to serve it again.
pub struct Idle<T> {
    /// The epoll set of the held sockets; readable when one of them is.
    epoll: AsyncFd<OwnedFd>,
    table: Mutex<Table<T>>,
    /// Woken when a connection parks with a deadline earlier than any
    /// other's, or first since the last trim, so that the watcher's clock
    /// moves to it.
    earlier: Notify,
}

struct Table<T> {
    slots: Vec<Slot<T>>,
    /// Indices of empty slots, the lowest taken first, so that the held
    /// ones gather at the front and the table can shrink from its end.
    free: BinaryHeap<Reverse<u32>>,
    /// How many slots hold a connection.
    held: usize,
    /// When each held connection is closed unless its client sends first,
    /// earliest first. An entry stays when its connection leaves early
    /// (its slot's generation tells) and is skipped when it comes up;
    /// the heap is rebuilt when such entries outnumber the live ones. One
    /// vector, unlike a tree's node per few connections: what an idle
    /// connection leaves in the allocator's heap is nothing but its share
    /// of two vectors, so the memory its session used can go back whole.
    deadlines: BinaryHeap<Reverse<Deadline>>,
    /// Set once the watcher has stopped: nothing parks after it.
    closed: bool,
    /// When the first and the last connection parked or left since the
    /// watcher last gave freed memory back (see [`Trim`]).
    changes_since_trim: Option<(Instant, Instant)>,
}

struct Slot<T> {
    /// Told apart from the slot's earlier holders in epoll's events.
    generation: u32,
    held: Option<Held<T>>,
}

struct Held<T> {
    socket: TcpStream,
    deadline: Instant,
    state: T,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Instant,
    index: u32,
    generation: u32,
}

impl<T> Table<T> {
    /// Empties slot `index` if it still holds the connection of
    /// `generation`.
    fn take(&mut self, index: u32, generation: u32) -> Option<Held<T>> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let held = slot.held.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(Reverse(index));
        self.held -= 1;
        self.changed(Instant::now());
        Some(held)
    }

    /// Notes a connection parking or leaving; true when it is the first
    /// since the last trim.
    fn changed(&mut self, now: Instant) -> bool {
        let first = self.changes_since_trim.is_none();
        self.changes_since_trim = Some(match self.changes_since_trim {
            Some((since, _)) => (since, now),
            None => (now, now),
        });
        first
    }

    fn is_live(&self, d: &Deadline) -> bool {
        self.slots
            .get(d.index as usize)
            .is_some_and(|s| s.generation == d.generation && s.held.is_some())
    }

    /// The earliest deadline of a connection still held.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse(d)) = self.deadlines.peek() {
            if self.is_live(d) {
                return Some(d.at);
            }
            self.deadlines.pop();
        }
        None
    }

    fn add_deadline(&mut self, d: Deadline) {
        self.deadlines.push(Reverse(d));
        if self.deadlines.len() > 2 * self.held + 64 {
            // Mostly connections that left early: keep the live ones.
            self.keep_live_deadlines();
        }
    }

    fn keep_live_deadlines(&mut self) {
        let live: Vec<_> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(index, s)| {
                let held = s.held.as_ref()?;
                Some(Reverse(Deadline {
                    at: held.deadline,
                    index: index as u32,
                    generation: s.generation,
                }))
            })
            .collect();
        self.deadlines = BinaryHeap::from(live);
    }

    /// Gives back what a crowd of idle connections that has since gone
    /// left in the table: empty slots at its end, and spare capacity.
    /// The deadlines are rebuilt first, so that none names a slot that is
    /// gone (one made again starts its generations anew).
    fn shrink(&mut self) {
        self.keep_live_deadlines();
        while self.slots.last().is_some_and(|s| s.held.is_none()) {
            self.slots.pop();
        }
        let len = self.slots.len();
        self.free.retain(|Reverse(index)| (*index as usize) < len);
        if self.slots.capacity() > 2 * len + 64 {
            self.slots.shrink_to(len + len / 4 + 64);
            self.free.shrink_to_fit();
            self.deadlines.shrink_to_fit();
        }
    }
}

/// What an epoll event's data says: the slot and its generation.
fn token(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

fn untoken(data: u64) -> (u32, u32) {
    (data as u32, (data >> 32) as u32)
}

impl<T: Send + 'static> Idle<T> {
    /// An empty set; within a tokio runtime.
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory arguments; the descriptor it
        // returns is ours alone.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the descriptor is owned by the `AsyncFd` and stays open
        // as long as it does.
        let epoll =
            unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            epoll,
            table: Mutex::new(Table {
                slots: Vec::new(),
                free: BinaryHeap::new(),
                held: 0,
                deadlines: BinaryHeap::new(),
                closed: false,
                changes_since_trim: None,
            }),
            earlier: Notify::new(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table<T>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `socket` (non-blocking, out of tokio's reactor) until its
    /// client sends, closes, or `deadline` passes. When it cannot be held
    /// (the set is closed, or the kernel refused it), it is closed.
    pub fn park(&self, socket: TcpStream, deadline: Instant, state: T) -> io::Result<()> {
        let fd = socket.as_raw_fd();
        let mut table = self.table();
        if table.closed {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the daemon is draining",
            ));
        }
        let index = match table.free.pop() {
            Some(Reverse(index)) if (index as usize) < table.slots.len() => index,
            _ => {
                let index = u32::try_from(table.slots.len())
                    .map_err(|_| io::Error::other("too many idle connections"))?;
                table.slots.push(Slot {
                    generation: 0,
                    held: None,
                });
                index
            }
        };
        let first_since_trim = table.changed(Instant::now());
        let earliest = first_since_trim || table.next_deadline().is_none_or(|at| deadline < at);
        let slot = &mut table.slots[index as usize];
        let generation = slot.generation;
        slot.held = Some(Held {
            socket,
            deadline,
            state,
        });
        table.held += 1;
        table.add_deadline(Deadline {
            at: deadline,
            index,
            generation,
        });
        // Added while the table is locked: the watcher, told of it at once,
        // finds it in its slot.
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token(index, generation),
        };
        // SAFETY: both descriptors are open; `event` outlives the call.
        let added = unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd,
                &mut event,
            )
        };
        if added != 0 {
            let error = io::Error::last_os_error();
            drop(table.take(index, generation));
            return Err(error);
        }
        drop(table);
        if earliest {
            self.earlier.notify_one();
        }
        Ok(())
    }

    /// How many connections are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table().held
    }

    /// Serves the set until `draining` turns true (or its sender goes),
    /// then closes every connection held and refuses new ones. A held
    /// connection whose client sends is handed to `resume`, with its
    /// socket still non-blocking.
    pub async fn watch(
        &self,
        mut draining: watch::Receiver<bool>,
        mut resume: impl FnMut(TcpStream, T),
    ) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let mut trim = Trim::new();
        loop {
            if *draining.borrow_and_update() {
                break;
            }
            let next = {
                let mut table = self.table();
                let trim_at = trim.due(table.changes_since_trim);
                match (table.next_deadline(), trim_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            let clock = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = draining.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = self.earlier.notified() => {}
                () = clock => {
                    self.expire();
                    let parks = {
                        let mut table = self.table();
                        let due = trim.due(table.changes_since_trim);
                        if due.is_some_and(|at| at <= Instant::now()) {
                            table.shrink();
                            table.changes_since_trim.take()
                        } else {
                            None
                        }
                    };
                    if parks.is_some() {
                        trim.now();
                    }
                }
                ready = self.epoll.readable() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(error) => {
                            warn!(%error, "the idle connections' epoll set failed; closing them");
                            break;
                        }
                    };
                    // One batch per wake-up. A batch that did not fill
                    // `events` emptied the set's ready list: readiness is
                    // cleared without asking again (tokio keeps it if the
                    // set became readable since); a full one leaves it,
                    // and this loop comes back for more.
                    match guard.try_io(|epoll| wait(epoll.get_ref().as_raw_fd(), &mut events)) {
                        Ok(Ok(n)) => {
                            if n < events.len() {
                                guard.clear_ready();
                            }
                            self.ready(&events[..n], &mut resume);
                        }
                        Ok(Err(error)) => {
                            warn!(%error, "epoll_wait on the idle connections failed; closing them");
                            break;
                        }
                        Err(_would_block) => {}
                    }
                }
            }
        }
        let held: Vec<Held<T>> = {
            let mut table = self.table();
            table.closed = true;
            table.deadlines.clear();
            table.held = 0;
            table.free.clear();
            table.slots.drain(..).filter_map(|s| s.held).collect()
        };
        debug!(connections = held.len(), "idle connections closed");
    }

    /// Takes the connections that `events` name out of the set; those
    /// whose client sent something are resumed, the rest closed.
    fn ready(&self, events: &[libc::epoll_event], resume: &mut impl FnMut(TcpStream, T)) {
        for event in events {
            let (index, generation) = untoken(event.u64);
            let Some(held) = self.table().take(index, generation) else {
                continue;
            };
            let fd = held.socket.as_raw_fd();
            // Taken out of the set before tokio registers it again.
            // SAFETY: both descriptors are open; DEL ignores the event.
            unsafe {
                libc::epoll_ctl(
                    self.epoll.get_ref().as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    fd,
                    std::ptr::null_mut(),
                );
            }
            let flags = event.events;
            let hung_up = flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
            if hung_up && !has_bytes(fd) {
                // The client closed (or the socket failed) while idle:
                // nothing to serve. Dropping `held` closes it.
                continue;
            }
            resume(held.socket, held.state);
        }
    }

    /// Closes every connection whose deadline has passed.
    fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<Held<T>> = {
            let mut table = self.table();
            let mut out = Vec::new();
            while let Some(&Reverse(d)) = table.deadlines.peek()
                && d.at <= now
            {
                table.deadlines.pop();
                out.extend(table.take(d.index, d.generation));
            }
            out
        };
        // Closing a descriptor takes it out of every epoll set.
        drop(expired);
    }
}

/// Giving back to the system the memory that parked sessions freed.
///
/// A connection's session (hyper's buffers, its task, the request's
/// state: tens of KiB) is freed when it parks, but glibc's allocator
/// returns only the top of a heap to the system: what a burst of sessions
/// freed stays resident, below whatever was allocated after it, for as
/// long as the daemon runs; and a crowd of idle connections that has gone
/// leaves the table its size. Once the set quiets down (no connection
/// parked or left for [`Trim::QUIET`]), or at the latest [`Trim::LATEST`]
/// into a busy spell, the watcher shrinks its table and asks the
/// allocator to return its free pages, at most once per
/// [`Trim::INTERVAL`]:
/// `malloc_trim` walks the allocator's free chunks, a fraction of a
/// millisecond for a daemon's heaps, done off the proxy's workers.
struct Trim {
    last: Option<Instant>,
}

impl Trim {
    const QUIET: Duration = Duration::from_millis(100);
    const LATEST: Duration = Duration::from_secs(10);
    const INTERVAL: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self { last: None }
    }

    /// When to trim next, given when connections parked since the last
    /// trim.
    fn due(&self, parks: Option<(Instant, Instant)>) -> Option<Instant> {
        let (first, last) = parks?;
        let at = (last + Self::QUIET).min(first + Self::LATEST);
        Some(match self.last {
            Some(trimmed) => at.max(trimmed + Self::INTERVAL),
            None => at,
        })
    }

    /// Trims on a blocking thread: with a large heap, walking it could
    /// hold up the requests of the worker that runs the watcher.
    fn now(&mut self) {
        self.last = Some(Instant::now());
        #[cfg(target_env = "gnu")]
        tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim takes no pointers and is thread-safe.
            unsafe { libc::malloc_trim(0) };
        });
    }
}

/// One `epoll_wait` that does not block; `WouldBlock` when nothing is ready.
fn wait(epoll: RawFd, events: &mut [libc::epoll_event]) -> io::Result<usize> {
    loop {
        // SAFETY: `events` is valid for its length, which fits an i32.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 0) };
        match n {
            0 => return Err(io::ErrorKind::WouldBlock.into()),
            n if n > 0 => return Ok(n as usize),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// Whether bytes wait on `fd` (a request sent before its client shut its
/// side down still gets served).
fn has_bytes(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: one byte into a valid buffer; MSG_PEEK leaves it queued.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        sync::Arc,
        time::Duration,
    };

    use super::*;

    /// A connected pair: the client's end, and the server's end as the
    /// listener hands it over (non-blocking).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (client, server)
    }

    /// Reads until the peer closes; true when it did (not a timeout).
    fn closed(client: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(client.read(&mut buf), Ok(0))
    }

    struct Watcher {
        idle: Arc<Idle<u32>>,
        drain: watch::Sender<bool>,
        resumed: tokio::sync::mpsc::UnboundedReceiver<(TcpStream, u32)>,
        task: tokio::task::JoinHandle<()>,
    }

    fn watcher() -> Watcher {
        let idle = Arc::new(Idle::new().unwrap());
        let (drain, draining) = watch::channel(false);
        let (tx, resumed) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn({
            let idle = idle.clone();
            async move {
                idle.watch(draining, |socket, state| {
                    let _ = tx.send((socket, state));
                })
                .await;
            }
        });
        Watcher {
            idle,
            drain,
            resumed,
            task,
        }
    }

    fn later(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn a_client_that_sends_is_resumed_with_its_state_and_bytes() {
        let mut w = watcher();
        let (mut client, server) = pair();
        let (_other_client, other) = pair();
        w.idle.park(server, later(60_000), 7).unwrap();
        w.idle.park(other, later(60_000), 8).unwrap();
        assert_eq!(w.idle.len(), 2);
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let (mut socket, state) = w.resumed.recv().await.unwrap();
        assert_eq!(state, 7);
        assert_eq!(w.idle.len(), 1);
        // The bytes are still there to read, and the socket works both ways.
        socket.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 16];
        socket.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n");
        socket.write_all(b"ok").unwrap();
        let mut two = [0u8; 2];
        client.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ok");
        // Taken out of the set: more bytes do not resume it twice.
        client.write_all(b"more").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(w.resumed.try_recv().is_err());
        w.drain.send(true).unwrap();
        w.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_past_its_deadline_is_closed_and_one_parked_earlier_moves_the_clock() {
        let w = watcher();
        let (mut late_client, late) = pair();
        let (mut soon_client, soon) = pair();
        w.idle.park(late, later(60_000), 1).unwrap();
        // Parked after a later deadline: the watcher's clock must move.
        w.idle.park(soon, later(100), 2).unwrap();
        let started = std::time::Instant::now();
        let soon_closed = tokio::task::spawn_blocking(move || closed(&mut soon_client));
        assert!(soon_closed.await.unwrap(), "closed at its deadline");
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(w.idle.len(), 1);
        late_client
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(!closed(&mut late_client), "the other one is still held");
        drop(w);
    }

    #[tokio::test]
    async fn a_client_that_closes_while_idle_is_dropped_without_resuming() {
        let mut w = watcher();
        let (client, server) = pair();
        w.idle.park(server, later(60_000), 1).unwrap();
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), async {
            while w.idle.len() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("taken out of the set");
        assert!(w.resumed.try_recv().is_err());
        // A request sent just before the client shut its side down is
        // still served.
        let (mut client, server) = pair();
        w.idle.park(server, later(60_000), 2).unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (_, state) = w.resumed.recv().await.unwrap();
        assert_eq!(state, 2);
    }

    #[tokio::test]
    async fn draining_closes_every_connection_and_refuses_new_ones() {
        let w = watcher();
        let mut clients = Vec::new();
        for i in 0..3 {
            let (client, server) = pair();
            w.idle.park(server, later(60_000), i).unwrap();
            clients.push(client);
        }
        w.drain.send(true).unwrap();
        w.task.await.unwrap();
        for mut client in clients {
            assert!(closed(&mut client));
        }
        let (mut client, server) = pair();
        assert!(w.idle.park(server, later(60_000), 9).is_err());
        assert!(closed(&mut client), "refused, and so closed");
    }

    #[tokio::test]
    async fn memory_is_given_back_once_parking_quiets_down_and_not_too_often() {
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        let mut trim = Trim::new();
        assert_eq!(trim.due(None), None, "nothing parked, nothing to give back");
        assert_eq!(trim.due(Some((t0, t0 + ms(50)))), Some(t0 + ms(150)));
        // Parking that never pauses still gets a trim, 10 s after it began.
        assert_eq!(trim.due(Some((t0, t0 + ms(20_000)))), Some(t0 + ms(10_000)));
        trim.now();
        let trimmed = trim.last.unwrap();
        // Not again within a second of the last.
        assert_eq!(
            trim.due(Some((trimmed, trimmed + ms(10)))),
            Some(trimmed + ms(1000))
        );
    }

    #[tokio::test]
    async fn the_table_shrinks_once_a_crowd_of_idle_connections_has_gone() {
        let mut w = watcher();
        let mut crowd = Vec::new();
        for i in 0..300 {
            let (client, server) = pair();
            w.idle.park(server, later(60_000), i).unwrap();
            crowd.push(client);
        }
        // One that stays, parked after the crowd: its slot is the last.
        let (mut stays, server) = pair();
        w.idle.park(server, later(60_000), 1000).unwrap();
        drop(crowd);
        tokio::time::timeout(Duration::from_secs(5), async {
            while w.idle.len() > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the crowd taken out of the set");
        // Slots are taken lowest first: a new one goes to the front.
        let (mut front, server) = pair();
        w.idle.park(server, later(60_000), 2000).unwrap();
        assert_eq!(w.idle.len(), 2);
        // The one at the end leaves; once the set is quiet, the table
        // shrinks to the one at the front.
        stays.write_all(b"x").unwrap();
        let (_, state) = w.resumed.recv().await.unwrap();
        assert_eq!(state, 1000);
        tokio::time::timeout(Duration::from_secs(5), async {
            while w.idle.table().slots.len() > 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the table shrank");
        assert!(w.idle.table().slots.capacity() < 300);
        // What is left is still served, and new connections still park.
        front.write_all(b"y").unwrap();
        let (_, state) = w.resumed.recv().await.unwrap();
        assert_eq!(state, 2000);
        let (mut again, server) = pair();
        w.idle.park(server, later(60_000), 3000).unwrap();
        again.write_all(b"z").unwrap();
        let (_, state) = w.resumed.recv().await.unwrap();
        assert_eq!(state, 3000);
    }

    #[tokio::test]
    async fn slots_are_reused_and_stale_events_ignored() {
        let mut w = watcher();
        for round in 0..50u32 {
            let (mut client, server) = pair();
            w.idle.park(server, later(60_000), round).unwrap();
            client.write_all(b"x").unwrap();
            let (_, state) = w.resumed.recv().await.unwrap();
            assert_eq!(state, round);
        }
        assert_eq!(w.idle.len(), 0);
        assert!(w.idle.table().slots.len() <= 2, "slots reused");
        // Deadlines of connections that left early do not pile up.
        for round in 0..500u32 {
            let (mut client, server) = pair();
            w.idle.park(server, later(60_000), round).unwrap();
            client.write_all(b"x").unwrap();
            w.resumed.recv().await.unwrap();
        }
        assert!(w.idle.table().deadlines.len() <= 64 + 2);
    }
}
