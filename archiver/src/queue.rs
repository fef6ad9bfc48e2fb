//! The generation queue: `--max-generations` slots, handed out in turn among
//! the clients waiting for one (`docs/archiver.md#queue-and-503`).
//!
//! A first-come queue lets one client's burst of cold requests (a crawler
//! spending its whole [budget](crate::budget) at once) stand in front of
//! every other client's generation for as long as the burst takes to run.
//! Here each client (the budget's identity: an address, an IPv6 `/64`) has
//! a queue of its own, and a freed slot goes to the waiting client with the
//! fewest generations running, the one whose generation just ended still
//! counting it; among equals, to the one whose turn is next (round robin).
//! Within a client, generations run in the order they were asked for. A
//! client with nothing running therefore gets one of the next slots freed,
//! after at most one generation of each other waiting client with nothing
//! running, however many each has queued.
//!
//! And no client runs more than `slots - 1` generations at once (when there
//! are two slots or more), even with a slot free: a running generation
//! cannot be taken back, so a crawler that took every slot with long
//! generations would make every other client wait for the first of them to
//! end, past `--queue-timeout`. One slot is always another client's.
//!
//! Invariants:
//! - At most `slots` [`Permit`]s exist; a slot is free only while every
//!   waiting client runs its most (a released slot goes straight to the
//!   next waiter that may run one more).
//! - A generation several clients wait for (one started it, others joined)
//!   stands in the queue of each ([`Slots::also_for`]) and runs at the
//!   earliest of their turns, counted as the running generation of the
//!   client whose turn it was; its other places are then removed.
//! - A client's place for a generation lasts while one of its requests
//!   waits for it (a [`Place`], one per request), or for as long as the
//!   generation waits if it is the client's own: started by it
//!   ([`Slots::queue`]) or kept by its prewarm ([`Place::keep`]). When a
//!   client's last `Place` for a generation is dropped, its place leaves
//!   its queue, and the generation stays in the queues of the others: a
//!   client that joined a crawler's generation once is not charged for it,
//!   nor does it stand before its own later generations, once it left. The
//!   count is kept under this module's lock, like the queues, so a slot
//!   granted on a client's turn and that client's last request leaving
//!   happen in one order or the other. Left first, the turn goes to the
//!   next client in line. Granted first, the client still waited when its
//!   turn came: the generation has its slot, counted as that client's, and
//!   its places are gone with it; a generation no request waits for any
//!   more gives the permit back before git runs (`cache::Waiter`), to the
//!   next in turn.
//! - A generation that stops waiting (its queue timeout, shutdown, every
//!   request waiting for it gone: `cache::Waiter`) leaves no place behind:
//!   [`Queued`]'s drop removes it from every queue, and a permit granted to
//!   it that it never took is given back, to the next waiter in turn.
//! - Memory is one entry per waiting generation, per client with one, and
//!   per client standing for a generation (a count of its requests, each
//!   holding a `Place`): bounded by the generations and requests waiting.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use metrics::gauge;
use tokio::sync::oneshot;

use crate::metrics as m;

/// The generation slots and the clients waiting for them.
pub struct Slots {
    state: Mutex<State>,
}

struct State {
    free: usize,
    /// The most generations one client runs at once.
    most: usize,
    next_id: u64,
    /// Each waiting generation: where its slot goes, and the clients in
    /// whose queues it stands.
    waiting: HashMap<u64, Waiting>,
    /// Each client's waiting generations, oldest first.
    queues: HashMap<IpAddr, VecDeque<u64>>,
    /// The clients with a waiting generation, in the order of their next
    /// turn.
    turns: VecDeque<IpAddr>,
    /// Generations running, by the client whose turn gave them their slot
    /// (only clients with one).
    running: HashMap<IpAddr, usize>,
}

struct Waiting {
    grant: oneshot::Sender<Permit>,
    /// The clients in whose queues it stands, and what holds each place.
    clients: HashMap<IpAddr, Holders>,
}

/// What holds a client's place for a waiting generation: it leaves the
/// client's queue when nothing does.
#[derive(Default)]
struct Holders {
    /// The client's own generation (it started it, or its prewarm keeps
    /// it): the place lasts as long as the generation waits.
    own: bool,
    /// The client's requests that joined it and still wait for it: the
    /// [`Place`]s alive.
    requests: usize,
}

/// A request's place for a generation it joined, in its client's queue:
/// the client's place lasts while one of these (or the generation being
/// the client's own) does. Dropped with the client's last request for the
/// generation, the place leaves the client's queue.
#[must_use = "the place leaves the client's queue when dropped"]
pub struct Place {
    /// `None` once nothing is left to let go: the generation was no longer
    /// waiting, had its slot at once, or the place was kept.
    slots: Option<Arc<Slots>>,
    id: u64,
    client: IpAddr,
}

/// A generation's place in the queue, until it has its slot.
pub struct Queued {
    slots: Arc<Slots>,
    id: u64,
    granted: oneshot::Receiver<Permit>,
}

/// A generation slot, given back (to the next client in turn) when dropped.
pub struct Permit {
    slots: Option<Arc<Slots>>,
    client: IpAddr,
}

impl Slots {
    pub fn new(slots: usize) -> Arc<Slots> {
        Arc::new(Slots {
            state: Mutex::new(State {
                free: slots,
                most: slots.saturating_sub(1).max(1),
                next_id: 0,
                waiting: HashMap::new(),
                queues: HashMap::new(),
                turns: VecDeque::new(),
                running: HashMap::new(),
            }),
        })
    }

    /// A place for one generation in `client`'s queue, or its slot at once
    /// when one is free.
    pub fn queue(self: &Arc<Self>, client: IpAddr) -> Queued {
        let (grant, granted) = oneshot::channel();
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        if state.free > 0 && state.running(client) < state.most {
            state.free -= 1;
            // Its receiver is right here: the send cannot fail.
            self.grant(&mut state, grant, client);
        } else {
            state.waiting.insert(
                id,
                Waiting {
                    grant,
                    clients: HashMap::new(),
                },
            );
            // The starter's own place, held as long as it waits.
            state.stand_in(id, client, true);
            state.publish();
        }
        Queued {
            slots: self.clone(),
            id,
            granted,
        }
    }

    /// Puts the waiting generation `id` in `client`'s queue too, if it is
    /// still waiting and not there yet, for as long as the returned
    /// [`Place`] (or another of `client`'s) lives: a client that joins a
    /// generation waits on its own turn, not on the starter's, and only
    /// while it waits. With a slot free that `client` may take, that turn
    /// is now: the generation gets the slot at once (it waited only
    /// because its starter runs its most).
    pub fn also_for(self: &Arc<Self>, id: u64, client: IpAddr) -> Place {
        let mut place = Place {
            slots: Some(self.clone()),
            id,
            client,
        };
        let mut state = self.lock();
        match state.stand_in(id, client, false) {
            // Not waiting: there is no place to hold.
            None => place.slots = None,
            Some(false) => {}
            Some(true) => {
                if state.free > 0 && state.running(client) < state.most {
                    let waiting = state.leave(id).expect("it stands in a queue");
                    state.free -= 1;
                    if !self.grant(&mut state, waiting.grant, client) {
                        state.free += 1;
                    }
                    place.slots = None;
                }
                state.publish();
            }
        }
        place
    }

    /// Clients with a generation waiting.
    #[cfg(test)]
    pub(crate) fn clients_waiting(&self) -> usize {
        self.lock().turns.len()
    }

    /// The generations in `client`'s queue, oldest first.
    #[cfg(test)]
    pub(crate) fn queue_of(&self, client: IpAddr) -> Vec<u64> {
        self.lock()
            .queues
            .get(&client)
            .map(|queue| queue.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Sends a slot to `grant`, counted as `client`'s running generation;
    /// whether it was taken. A receiver gone takes nothing: the permit is
    /// not given back through its drop (that would release under this
    /// lock), and the caller keeps the slot.
    fn grant(
        self: &Arc<Self>,
        state: &mut State,
        grant: oneshot::Sender<Permit>,
        client: IpAddr,
    ) -> bool {
        *state.running.entry(client).or_default() += 1;
        let permit = Permit {
            slots: Some(self.clone()),
            client,
        };
        match grant.send(permit) {
            Ok(()) => true,
            Err(mut permit) => {
                permit.slots = None;
                state.stop_running(client);
                false
            }
        }
    }

    /// The slot of a generation `finished` had running, given back: to the
    /// next client in turn, or free.
    fn release(self: &Arc<Self>, finished: IpAddr) {
        let mut state = self.lock();
        loop {
            let Some(client) = state.next_turn(finished) else {
                state.stop_running(finished);
                state.free += 1;
                state.publish();
                return;
            };
            let queue = state
                .queues
                .get_mut(&client)
                .expect("a client in turn has a queue");
            let id = queue.pop_front().expect("a queue is never left empty");
            if queue.is_empty() {
                state.queues.remove(&client);
            } else {
                state.turns.push_back(client);
            }
            let Some(waiting) = state.leave(id) else {
                continue;
            };
            // A receiver gone: the next waiter gets the slot.
            if self.grant(&mut state, waiting.grant, client) {
                state.stop_running(finished);
                state.publish();
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is a few statements that leave the state whole.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Takes the client whose turn it is out of the turns: of those that
    /// may run one more generation once `finished`'s ends, the first with
    /// the fewest running.
    fn next_turn(&mut self, finished: IpAddr) -> Option<IpAddr> {
        let (position, _) = self
            .turns
            .iter()
            .enumerate()
            .filter(|(_, client)| {
                self.running(**client) - usize::from(**client == finished) < self.most
            })
            .min_by_key(|(_, client)| self.running(**client))?;
        self.turns.remove(position)
    }

    fn running(&self, client: IpAddr) -> usize {
        self.running.get(&client).copied().unwrap_or(0)
    }

    fn stop_running(&mut self, client: IpAddr) {
        if let Some(running) = self.running.get_mut(&client) {
            *running -= 1;
            if *running == 0 {
                self.running.remove(&client);
            }
        }
    }

    /// Puts the waiting generation `id` in `client`'s queue, held as the
    /// client's `own` or by one more of its requests; `None` if it is not
    /// waiting, else whether it was not there yet.
    fn stand_in(&mut self, id: u64, client: IpAddr, own: bool) -> Option<bool> {
        let waiting = self.waiting.get_mut(&id)?;
        let new = !waiting.clients.contains_key(&client);
        let holders = waiting.clients.entry(client).or_default();
        if own {
            holders.own = true;
        } else {
            holders.requests += 1;
        }
        if new {
            let queue = self.queues.entry(client).or_default();
            if queue.is_empty() {
                self.turns.push_back(client);
            }
            queue.push_back(id);
        }
        Some(new)
    }

    /// One of `client`'s requests no longer holds its place for the waiting
    /// generation `id` (`kept`: it is the client's own from now on). With
    /// nothing left holding it, the place leaves `client`'s queue; the
    /// generation stays in the others' (the starter's own is always one).
    fn step_out(&mut self, id: u64, client: IpAddr, kept: bool) {
        let Some(waiting) = self.waiting.get_mut(&id) else {
            return;
        };
        let Some(holders) = waiting.clients.get_mut(&client) else {
            return;
        };
        holders.requests -= 1;
        holders.own |= kept;
        if holders.own || holders.requests > 0 {
            return;
        }
        waiting.clients.remove(&client);
        let Some(queue) = self.queues.get_mut(&client) else {
            return;
        };
        queue.retain(|queued| *queued != id);
        if queue.is_empty() {
            self.queues.remove(&client);
            self.turns.retain(|turn| *turn != client);
        }
    }

    /// The gauge of clients waiting, after a change.
    fn publish(&self) {
        gauge!(m::GENERATIONS_QUEUED_CLIENTS).set(self.turns.len() as f64);
    }

    /// Takes `id` out of the waiting and out of every queue it stands in
    /// (one pass over the turns, however many clients joined it).
    fn leave(&mut self, id: u64) -> Option<Waiting> {
        let waiting = self.waiting.remove(&id)?;
        let mut emptied = HashSet::new();
        for client in waiting.clients.keys() {
            let Some(queue) = self.queues.get_mut(client) else {
                continue;
            };
            queue.retain(|queued| *queued != id);
            if queue.is_empty() {
                self.queues.remove(client);
                emptied.insert(*client);
            }
        }
        if !emptied.is_empty() {
            self.turns.retain(|turn| !emptied.contains(turn));
        }
        Some(waiting)
    }
}

impl Queued {
    /// What [`Slots::also_for`] takes.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the slot.
    pub async fn slot(&mut self) -> Permit {
        // The sender is dropped unsent only by this place's own drop.
        (&mut self.granted)
            .await
            .expect("a waiting place is granted a slot before it is removed")
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Out of the queues first, under the lock; a permit granted but not
        // taken goes back when `granted` drops, after the lock is let go.
        let gone = {
            let mut state = self.slots.lock();
            let gone = state.leave(self.id);
            state.publish();
            gone
        };
        drop(gone);
    }
}

impl Place {
    /// Keeps the place for as long as the generation waits, as the
    /// client's own: a prewarm's, which no request of its client waits for
    /// by design.
    pub fn keep(mut self) {
        if let Some(slots) = self.slots.take() {
            let mut state = slots.lock();
            state.step_out(self.id, self.client, true);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            let mut state = slots.lock();
            state.step_out(self.id, self.client, false);
            state.publish();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release(self.client);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn client(n: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, n])
    }

    /// Waits (on tokio's paused clock) until `queued` has its slot.
    async fn granted(queued: &mut Queued) -> Permit {
        tokio::time::timeout(Duration::from_secs(1), queued.slot())
            .await
            .expect("the slot was granted")
    }

    async fn not_granted(queued: &mut Queued) {
        assert!(
            tokio::time::timeout(Duration::from_millis(10), queued.slot())
                .await
                .is_err(),
            "granted out of turn"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_next_client_in_turn_not_to_the_oldest_waiter() {
        let slots = Slots::new(1);
        let mut running = slots.queue(client(1));
        let permit = granted(&mut running).await;
        // A crawler's burst, then another client's one request.
        let mut burst: Vec<Queued> = (0..3).map(|_| slots.queue(client(1))).collect();
        let mut other = slots.queue(client(2));
        assert_eq!(slots.clients_waiting(), 2);

        drop(permit);
        let permit = granted(&mut other).await;
        not_granted(&mut burst[0]).await;
        drop(permit);
        // Then the crawler's, in the order it asked.
        for queued in &mut burst {
            let permit = granted(queued).await;
            drop(permit);
        }
        assert_eq!(slots.clients_waiting(), 0);
        assert_eq!(slots.lock().free, 1);
        assert!(slots.lock().running.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_with_fewer_generations_running_goes_first() {
        let slots = Slots::new(3);
        // Two clients run one generation each; client 1 runs a second.
        let mut ones = [slots.queue(client(1)), slots.queue(client(1))];
        let one = granted(&mut ones[0]).await;
        let mut two = slots.queue(client(2));
        let two_running = granted(&mut two).await;
        let one_more = granted(&mut ones[1]).await;
        // Both queue one more; client 1 first.
        let mut third = slots.queue(client(1));
        let mut other = slots.queue(client(2));
        drop(one);
        // Client 1 would still run one: client 2 runs none more than it.
        let other_permit = granted(&mut other).await;
        not_granted(&mut third).await;
        drop(two_running);
        drop(granted(&mut third).await);
        drop((other_permit, one_more));
        assert_eq!(slots.lock().free, 3);
        assert!(slots.lock().running.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn one_client_never_holds_every_slot() {
        let slots = Slots::new(3);
        let mut crawler: Vec<Queued> = (0..4).map(|_| slots.queue(client(1))).collect();
        let first = granted(&mut crawler[0]).await;
        let second = granted(&mut crawler[1]).await;
        // A slot is free, but not for the crawler.
        not_granted(&mut crawler[2]).await;
        assert_eq!(slots.lock().free, 1);
        let mut other = slots.queue(client(2));
        let other_permit = granted(&mut other).await;
        // The crawler's next runs when one of its own ends.
        drop(other_permit);
        not_granted(&mut crawler[2]).await;
        drop(first);
        let third = granted(&mut crawler[2]).await;
        not_granted(&mut crawler[3]).await;
        drop((second, third));
        drop(granted(&mut crawler[3]).await);
        assert_eq!(slots.lock().free, 3);
        assert!(slots.lock().running.is_empty());
        assert_eq!(slots.clients_waiting(), 0);

        // One slot: the one client runs one, as before.
        let single = Slots::new(1);
        drop(granted(&mut single.queue(client(1))).await);
    }

    #[tokio::test(start_paused = true)]
    async fn clients_take_turns_one_generation_each() {
        let slots = Slots::new(1);
        let held = granted(&mut slots.queue(client(9))).await;
        let [mut a0, mut a1] = [slots.queue(client(1)), slots.queue(client(1))];
        let [mut b0, mut b1] = [slots.queue(client(2)), slots.queue(client(2))];
        drop(held);
        for queued in [&mut a0, &mut b0, &mut a1, &mut b1] {
            drop(granted(queued).await);
        }
        assert_eq!(slots.lock().free, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_generation_joined_by_another_client_runs_on_the_joiners_turn() {
        let slots = Slots::new(1);
        let held = granted(&mut slots.queue(client(9))).await;
        let mut burst: Vec<Queued> = (0..3).map(|_| slots.queue(client(1))).collect();
        // Client 2 joins the crawler's last generation (two requests).
        let _joined = [
            slots.also_for(burst[2].id(), client(2)),
            slots.also_for(burst[2].id(), client(2)),
        ];
        drop(held);
        // Client 1's turn first (its oldest), then client 2's: the joined one.
        drop(granted(&mut burst[0]).await);
        let joined = granted(&mut burst[2]).await;
        not_granted(&mut burst[1]).await;
        drop(joined);
        drop(granted(&mut burst[1]).await);
        assert_eq!(slots.clients_waiting(), 0);
        // A generation that runs is in no queue: joining it changes nothing.
        let mut running = slots.queue(client(1));
        let permit = granted(&mut running).await;
        drop(slots.also_for(running.id(), client(3)));
        assert_eq!(slots.clients_waiting(), 0);
        drop(permit);
        assert_eq!(slots.lock().free, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_takes_a_free_slot_its_starter_may_not() {
        let slots = Slots::new(2);
        let mut first = slots.queue(client(1));
        let running = granted(&mut first).await;
        // The starter runs its most: its second waits, a slot free.
        let mut second = slots.queue(client(1));
        not_granted(&mut second).await;
        let _place = slots.also_for(second.id(), client(2));
        let joined = granted(&mut second).await;
        assert_eq!(slots.clients_waiting(), 0);
        assert_eq!(slots.lock().running.get(&client(2)), Some(&1));
        drop((running, joined));
        assert_eq!(slots.lock().free, 2);
        assert!(slots.lock().running.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_leaves_no_place_and_no_slot_behind() {
        let slots = Slots::new(1);
        let held = granted(&mut slots.queue(client(9))).await;
        let gone = slots.queue(client(1));
        let mut next = slots.queue(client(2));
        drop(gone);
        assert_eq!(slots.clients_waiting(), 1);
        drop(held);
        drop(granted(&mut next).await);

        // Granted, then dropped before it took the permit: the slot is back.
        let held = granted(&mut slots.queue(client(9))).await;
        let granted_not_taken = slots.queue(client(1));
        drop(held);
        assert_eq!(slots.lock().free, 0, "granted to the waiter");
        drop(granted_not_taken);
        assert_eq!(slots.lock().free, 1);
        assert!(slots.lock().waiting.is_empty());
    }

    /// `docs/archiver.md#queue-and-503`: a client's place for a generation
    /// it joined lasts while one of its requests waits for it. A client
    /// that joined a crawler's queued generation and left is not charged
    /// for it on its turn: its own later generation runs then, and the
    /// crawler's runs on the crawler's turn. (Before, the place outlived
    /// the client's requests: the crawler's generation ran on its turn,
    /// as its running generation, ahead of its own.)
    #[tokio::test(start_paused = true)]
    async fn a_joins_place_leaves_the_clients_queue_with_its_last_request() {
        let slots = Slots::new(1);
        let held = granted(&mut slots.queue(client(9))).await;
        let mut burst: Vec<Queued> = (0..3).map(|_| slots.queue(client(1))).collect();
        // Client 2 joins the crawler's last generation with two requests.
        let first = slots.also_for(burst[2].id(), client(2));
        let second = slots.also_for(burst[2].id(), client(2));
        assert_eq!(slots.queue_of(client(2)), [burst[2].id()]);
        drop(first);
        assert_eq!(slots.queue_of(client(2)), [burst[2].id()], "one waits");
        drop(second);
        assert!(slots.queue_of(client(2)).is_empty(), "the last one left");
        assert_eq!(slots.clients_waiting(), 1);
        // The crawler's own places stay.
        assert_eq!(
            slots.queue_of(client(1)),
            burst.iter().map(Queued::id).collect::<Vec<_>>()
        );
        // Then client 2 asks for a generation of its own.
        let mut own = slots.queue(client(2));
        drop(held);
        drop(granted(&mut burst[0]).await);
        // Client 2's turn: its own generation, not the one it left.
        let permit = granted(&mut own).await;
        not_granted(&mut burst[2]).await;
        drop(permit);
        for queued in &mut burst[1..] {
            drop(granted(queued).await);
        }
        assert_eq!(slots.clients_waiting(), 0);
        assert_eq!(slots.lock().free, 1);
        assert!(slots.lock().running.is_empty());
        assert!(slots.lock().waiting.is_empty());
    }

    /// A prewarm's place ([`Place::keep`]) and the starter's own last as
    /// long as the generation waits; a client joining its own generation
    /// and leaving takes nothing away.
    #[tokio::test(start_paused = true)]
    async fn an_own_place_lasts_as_long_as_the_generation_waits() {
        let slots = Slots::new(1);
        let held = granted(&mut slots.queue(client(9))).await;
        let mut crawler = slots.queue(client(1));
        slots.also_for(crawler.id(), client(2)).keep();
        drop(slots.also_for(crawler.id(), client(1)));
        assert_eq!(slots.queue_of(client(1)), [crawler.id()]);
        assert_eq!(slots.queue_of(client(2)), [crawler.id()]);
        drop(held);
        drop(granted(&mut crawler).await);
        assert_eq!(slots.clients_waiting(), 0);
        assert!(slots.lock().waiting.is_empty());
    }

    /// A slot granted on a joiner's turn and the joiner leaving, in either
    /// order, under the one lock: granted first, the generation has its
    /// slot (the place is gone with it, the permit is the generation's to
    /// take or give back); left first, the turn goes to the next client.
    #[tokio::test(start_paused = true)]
    async fn a_slot_granted_on_a_joiners_turn_as_it_leaves_is_never_lost() {
        for granted_first in [true, false] {
            let slots = Slots::new(1);
            // Client 1 runs: the next turn is client 2's, then client 3's.
            let held = granted(&mut slots.queue(client(1))).await;
            let mut crawler = slots.queue(client(1));
            let joined = slots.also_for(crawler.id(), client(2));
            let mut other = slots.queue(client(3));
            if granted_first {
                drop(held);
                drop(joined);
                // Granted on client 2's turn, counted as its running one.
                assert_eq!(slots.lock().running.get(&client(2)), Some(&1));
                let permit = granted(&mut crawler).await;
                not_granted(&mut other).await;
                drop(permit);
                drop(granted(&mut other).await);
            } else {
                drop(joined);
                drop(held);
                // Client 2 left the turns: client 3's is next.
                let permit = granted(&mut other).await;
                not_granted(&mut crawler).await;
                drop(permit);
                drop(granted(&mut crawler).await);
            }
            assert_eq!(slots.lock().free, 1, "granted first: {granted_first}");
            assert!(slots.lock().running.is_empty());
            assert!(slots.lock().waiting.is_empty());
            assert_eq!(slots.clients_waiting(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_slots_run_at_once() {
        let slots = Slots::new(2);
        let mut queued: Vec<Queued> = (0..6).map(|n| slots.queue(client(n % 3))).collect();
        let first = granted(&mut queued[0]).await;
        let second = granted(&mut queued[1]).await;
        for waiting in &mut queued[2..] {
            not_granted(waiting).await;
        }
        drop((first, second));
        assert_eq!(slots.lock().free, 0);
        assert_eq!(slots.lock().waiting.len(), 2);
    }
}
