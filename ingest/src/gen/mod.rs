//! The deterministic synthetic chain behind `storepulse gen` and `demo`.
//!
//! A [`Chain`] (stores, products, replenishment policies, members) is drawn
//! from a seed; a [`Simulator`] then walks event time forward and emits
//! events of every stream of the contract as JSON lines, in *arrival* order:
//!
//! * receipts per store follow the store's format and size, an hour-of-day
//!   curve per format and a day-of-week factor; SKUs are drawn from the
//!   store's assortment with Zipf (long-tail) popularity;
//! * members have a home store and sometimes shop elsewhere; the first visit
//!   of a member to a store emits a `member_links` event;
//! * on-hand stock is simulated per (store, SKU): sales draw it down (an
//!   empty shelf loses the sale), a morning delivery (`receipt` movement)
//!   tops up SKUs below their reorder level in case packs, bakeries waste
//!   their leftovers at night, and a nightly partial stock-take emits
//!   `stock_counts`;
//! * every fridge reports its temperature every five minutes; now and then a
//!   fridge fails and warms up for a few hours;
//! * some stores go offline for a few hours a day: their events are buffered
//!   and uploaded when they reconnect, shuffled, with a few retransmitted
//!   twice (so downstream must handle lateness and duplicates).
//!
//! Same configuration and seed, same events, byte for byte.

mod dataset;
mod model;

pub use dataset::{write_dataset, DatasetSummary};
pub use model::{Chain, ChainConfig, GenEvent, Profile, Simulator};
