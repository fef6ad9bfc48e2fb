//! A fixed number of places, taken and given back without a lock: how many
//! of a costly thing a process holds at once (spliced downloads in the
//! proxy, widened git pipes in the archiver).

use std::sync::atomic::{AtomicUsize, Ordering};

/// `max` places, for a `static`.
pub struct Slots {
    held: AtomicUsize,
    max: usize,
}

impl Slots {
    pub const fn new(max: usize) -> Slots {
        Slots {
            held: AtomicUsize::new(0),
            max,
        }
    }

    /// A place, or `None` when all `max` are held.
    pub fn take(&'static self) -> Option<Slot> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.max).then_some(held + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }

    /// Places held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// A place among [`Slots`], given back when dropped.
pub struct Slot(&'static Slots);

impl Slot {
    /// The places this one is among: where to take one again after
    /// giving this one back.
    pub fn slots(&self) -> &'static Slots {
        self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_places_are_held_at_once() {
        static TWO: Slots = Slots::new(2);
        let first = TWO.take().expect("a first place");
        let second = TWO.take().expect("a second place");
        assert!(TWO.take().is_none(), "a third place out of two");
        drop(first);
        let third = TWO.take().expect("a place given back is taken again");
        drop((second, third));
        assert_eq!(TWO.held(), 0);
    }
}
