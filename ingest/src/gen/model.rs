//! The chain model and the event-time simulator.
//!
//! Size: ~1,050 lines of code and ~210 of tests: the chain (stores,
//! products, formats, policies) and the simulator stepping it minute by
//! minute are one model; the dataset writer is in `gen/dataset.rs`.

use std::{collections::HashSet, fmt::Write as _};

use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Poisson, Zipf};

use crate::schema::StreamKind;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
const STEP_MS: i64 = 60_000;
const IOT_EVERY_MS: i64 = 5 * 60_000;

/// Parameters of the synthetic chain.
#[derive(Debug, Clone)]
pub struct ChainConfig {
    /// Number of stores.
    pub stores: usize,
    /// Number of SKUs in the chain's catalogue.
    pub skus: usize,
    /// Number of chain-wide members.
    pub members: usize,
    /// Seed of every random draw.
    pub seed: u64,
    /// Event time the simulation starts at (epoch ms).
    pub start_ms: i64,
    /// Multiplier on every store's receipt rate (1.0 = realistic).
    pub intensity: f64,
    /// Probability that a store has an offline episode on a given day.
    pub offline_per_store_day: f64,
    /// Restock the way a chain following its `replenishment_policy` does:
    /// at every delivery, up to the demand over the policy's lead time plus
    /// two delivery periods plus safety stock, so the shelves stay above
    /// the reorder point the engine computes (the live demo). Off (the
    /// datasets): a fixed two-to-three days of stock, which runs low often
    /// enough to exercise the replenishment alerts.
    pub restock_to_policy: bool,
    /// The shape of the data (see [`Profile`]).
    pub profile: Profile,
    /// Send stock counts (the opening stock-take and the counts after).
    /// Off: a chain whose stock is known only from its movements.
    pub stock_counts: bool,
    /// Share of SKUs whose chain price head office changes on a given day
    /// (at 06:00 UTC, by up to ±15 %); about one store in ten keeps
    /// charging the old price for 6 to 72 hours after a change.
    pub price_changes_per_sku_day: f64,
    /// The stores' time zone (`stores.csv` `timezone`): the hour-of-day
    /// and day-of-week curves run on its wall clock. `None`: UTC, and the
    /// column is left empty.
    pub timezone: Option<chrono_tz::Tz>,
}

impl ChainConfig {
    /// The default chain of `profile`'s size: the default 50 stores, 400
    /// SKUs and 20,000 members; a grocery chain 450 stores, 90,000 SKUs and
    /// 200,000 members.
    pub fn for_profile(profile: Profile) -> Self {
        let base = Self {
            profile,
            ..Self::default()
        };
        match profile {
            Profile::GroceryChain => Self {
                stores: 450,
                skus: 90_000,
                members: 200_000,
                ..base
            },
            _ => base,
        }
    }

    /// Multiplier on every store's receipt rate: `intensity` times the
    /// profile's scale.
    fn receipt_rate(&self) -> f64 {
        self.intensity * self.profile.rate_scale()
    }
}

/// Shapes of generated data beyond the default chain, for testing with
/// data shaped like a real chain's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Piece goods, 2-decimal prices, every stream.
    #[default]
    Default,
    /// A grocer: produce is weighed (quantities in grams, prices per gram
    /// with six decimals, the till's rounded line `amount`), and a long
    /// tail (most SKUs sell a few times a period).
    Grocery,
    /// A chain before its first stock-take: sales only, no stock counts or
    /// movements (the stock is unknown).
    ColdStart,
    /// A grocery chain at real size: the grocery profile's weighed produce,
    /// each store carrying a slice of a large catalogue (supermarkets a
    /// third of their categories, small formats a few hundred SKUs), so
    /// most (store, SKU) pairs sell a few times a year; about 1.5 M receipt
    /// lines a year over 450 stores in baskets of 1 to 40 lines; no IoT
    /// readings; stock events only for what moves (deliveries of, and
    /// cycle counts among, the SKUs sold since the last delivery).
    GroceryChain,
}

impl Profile {
    /// Zipf exponent of SKU popularity within a store.
    fn zipf_s(self) -> f64 {
        match self {
            Profile::Grocery => 1.3,
            Profile::GroceryChain => 1.0,
            _ => ZIPF_S,
        }
    }

    /// Produce is sold by weight.
    fn weighs_produce(self) -> bool {
        matches!(self, Profile::Grocery | Profile::GroceryChain)
    }

    /// Multiplier on every store's receipt rate (a real chain's data set
    /// is thinner than the default chain's busy stores).
    fn rate_scale(self) -> f64 {
        match self {
            Profile::GroceryChain => GROCERY_CHAIN_RATE,
            _ => 1.0,
        }
    }

    /// Share of the SKUs of its categories a store of `format` carries.
    fn assortment_share(self, format: Format) -> f64 {
        match (self, format) {
            (Profile::GroceryChain, Format::Supermarket) => 0.35,
            (Profile::GroceryChain, Format::Convenience) => 0.06,
            (Profile::GroceryChain, Format::TeaShop) => 0.02,
            (Profile::GroceryChain, Format::Bakery) => 0.03,
            _ => 1.0,
        }
    }

    /// Mean number of extra lines on a receipt.
    fn extra_lines(self, format: Format) -> f64 {
        match (self, format) {
            (Profile::GroceryChain, Format::Supermarket) => 11.0,
            (Profile::GroceryChain, Format::Convenience) => 3.0,
            (Profile::GroceryChain, _) => 1.5,
            _ => format.extra_lines(),
        }
    }

    /// Restock and count only the pairs that sold (a catalogue of tens of
    /// thousands of SKUs per store is not walked every day).
    fn sparse_stock(self) -> bool {
        self == Profile::GroceryChain
    }

    /// Stores send fridge temperatures.
    fn iot(self) -> bool {
        self != Profile::GroceryChain
    }
}

/// Receipt-rate multiplier of the grocery-chain profile: about 1.5 M
/// receipt lines a year over its default 450 stores.
const GROCERY_CHAIN_RATE: f64 = 0.0018;
/// Most lines on one receipt.
const MAX_BASKET_LINES: usize = 40;

/// Mean grams of one weighed-goods sale (the grocery profile).
const GRAMS_PER_SALE: i64 = 350;

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            stores: 50,
            skus: 400,
            members: 20_000,
            seed: 7,
            // Monday 2026-01-05 00:00:00 UTC.
            start_ms: 1_767_571_200_000,
            intensity: 1.0,
            offline_per_store_day: 0.08,
            restock_to_policy: false,
            profile: Profile::Default,
            stock_counts: true,
            price_changes_per_sku_day: 0.003,
            timezone: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    TeaShop,
    Convenience,
    Supermarket,
    Bakery,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::TeaShop => "tea_shop",
            Format::Convenience => "convenience",
            Format::Supermarket => "supermarket",
            Format::Bakery => "bakery",
        }
    }
    const ALL: [Format; 4] = [
        Format::TeaShop,
        Format::Convenience,
        Format::Supermarket,
        Format::Bakery,
    ];
    fn categories(self) -> &'static [&'static str] {
        match self {
            Format::TeaShop => &["tea", "snacks"],
            Format::Convenience => &["drinks", "snacks", "dairy", "household", "frozen"],
            Format::Supermarket => &[
                "drinks",
                "snacks",
                "dairy",
                "household",
                "frozen",
                "produce",
                "bakery",
            ],
            Format::Bakery => &["bakery", "drinks"],
        }
    }
    /// Receipts per hour at the daily peak for a store of size 1.
    fn peak_receipts_per_hour(self) -> f64 {
        match self {
            Format::TeaShop => 45.0,
            Format::Convenience => 55.0,
            Format::Supermarket => 140.0,
            Format::Bakery => 35.0,
        }
    }
    /// Mean number of extra lines on a receipt.
    fn extra_lines(self) -> f64 {
        match self {
            Format::TeaShop => 0.4,
            Format::Convenience => 1.2,
            Format::Supermarket => 4.5,
            Format::Bakery => 1.0,
        }
    }
    /// Opening hours (`stores.csv` `opens`, `closes`): the hours
    /// [`Format::hour_curve`] treats as open; `None` around the clock.
    fn hours(self) -> Option<(&'static str, &'static str)> {
        match self {
            Format::Convenience => None,
            Format::Bakery => Some(("06:00", "20:00")),
            _ => Some(("08:00", "22:00")),
        }
    }
    /// Share of the daily peak by hour of day (0..1).
    fn hour_curve(self, hour: i64) -> f64 {
        let peaks: &[(f64, f64)] = match self {
            Format::TeaShop => &[(15.0, 3.0), (20.0, 2.0)],
            Format::Convenience => &[(8.0, 1.5), (18.5, 2.5)],
            Format::Supermarket => &[(11.0, 2.0), (18.0, 2.0)],
            Format::Bakery => &[(7.5, 1.5), (12.0, 1.5)],
        };
        let open = match self {
            Format::Convenience => (0.0, 24.0),
            Format::Bakery => (6.0, 20.0),
            _ => (8.0, 22.0),
        };
        let h = hour as f64 + 0.5;
        if h < open.0 || h > open.1 {
            return 0.02;
        }
        let v: f64 = peaks
            .iter()
            .map(|(c, w)| (-(h - c) * (h - c) / (2.0 * w * w)).exp())
            .sum();
        (0.15 + v).min(1.0)
    }
    fn fridges(self) -> usize {
        match self {
            Format::TeaShop | Format::Bakery => 1,
            Format::Convenience => 2,
            Format::Supermarket => 4,
        }
    }
}

/// Weekly factor, Monday first.
fn weekday_factor(day: i64) -> f64 {
    [0.9, 0.85, 0.9, 0.95, 1.15, 1.3, 1.1][day.rem_euclid(7) as usize]
}

const CITIES: &[&str] = &[
    "Shanghai",
    "Hangzhou",
    "Suzhou",
    "Nanjing",
    "Ningbo",
    "Wuxi",
    "Hefei",
    "Changzhou",
];
const CATEGORIES: &[(&str, i64, i64, f64)] = &[
    // name, min cost (cents), max cost, markup
    ("tea", 150, 600, 3.0),
    ("snacks", 80, 900, 1.8),
    ("drinks", 60, 700, 1.9),
    ("dairy", 90, 1200, 1.4),
    ("household", 150, 3000, 1.5),
    ("frozen", 200, 2500, 1.5),
    ("produce", 50, 800, 1.6),
    ("bakery", 40, 600, 2.4),
];

#[derive(Debug, Clone)]
struct Store {
    id: String,
    name: String,
    city: &'static str,
    format: Format,
    size: f64,
    epoch_ts: bool,
    /// Indexes into `products`, most popular first.
    assortment: Vec<usize>,
    /// Expected units per day for each assortment entry.
    daily_units: Vec<f64>,
}

#[derive(Debug, Clone)]
struct Product {
    sku: String,
    name: String,
    category: &'static str,
    unit_cost_cents: i64,
    price_cents: i64,
    case_pack: i64,
    /// Sold by weight: quantities in grams, `price_cents` per kilogram.
    weighed: bool,
}

/// The chain: stores, catalogue, members, replenishment policies.
#[derive(Debug, Clone)]
pub struct Chain {
    cfg: ChainConfig,
    stores: Vec<Store>,
    products: Vec<Product>,
    /// Members by home store.
    home_members: Vec<Vec<u32>>,
    /// Home store of each member.
    member_home: Vec<u32>,
}

impl Chain {
    /// Draws the chain from the configuration's seed.
    pub fn new(cfg: ChainConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_c4a1);
        let products: Vec<Product> = (0..cfg.skus)
            .map(|i| {
                let (cat, lo, hi, markup) = CATEGORIES[rng.random_range(0..CATEGORIES.len())];
                let cost = rng.random_range(lo..=hi);
                let price = ((cost as f64 * markup / 10.0).round() as i64 * 10).max(cost + 10) - 1;
                let case_pack = [1, 4, 6, 6, 12, 12, 24][rng.random_range(0..7)];
                let weighed = cfg.profile.weighs_produce() && cat == "produce";
                Product {
                    sku: format!("P{:05}", i + 1),
                    name: format!("{cat} item {}", i + 1),
                    category: cat,
                    // Weighed: cost and price per kilogram, cases of 5 kg.
                    unit_cost_cents: if weighed { cost * 4 } else { cost },
                    price_cents: if weighed { price * 4 } else { price },
                    case_pack: if weighed { 5_000 } else { case_pack },
                    weighed,
                }
            })
            .collect();
        let size_dist = LogNormal::new(0.0, 0.35).expect("valid lognormal");
        let stores: Vec<Store> = (0..cfg.stores)
            .map(|i| {
                let format = match rng.random_range(0..100) {
                    0..=24 => Format::TeaShop,
                    25..=64 => Format::Convenience,
                    65..=84 => Format::Supermarket,
                    _ => Format::Bakery,
                };
                let mut assortment: Vec<usize> = (0..products.len())
                    .filter(|p| format.categories().contains(&products[*p].category))
                    .collect();
                // Popularity differs a little per store: shuffle, then keep a
                // chain-wide bias by moving low SKU numbers forward. A store
                // of a large catalogue carries a random slice of it.
                assortment.shuffle(&mut rng);
                let share = cfg.profile.assortment_share(format);
                if share < 1.0 {
                    assortment.truncate((assortment.len() as f64 * share).ceil() as usize);
                }
                let mut keyed: Vec<(usize, u32, usize)> = assortment
                    .iter()
                    .map(|p| (*p / 40, rng.random_range(0..3u32), *p))
                    .collect();
                keyed.sort_unstable();
                let assortment: Vec<usize> = keyed.into_iter().map(|(_, _, p)| p).collect();
                Store {
                    id: format!("S{:03}", i + 1),
                    name: format!("{} #{}", format.name(), i + 1),
                    city: CITIES[rng.random_range(0..CITIES.len())],
                    format,
                    size: f64::clamp(size_dist.sample(&mut rng), 0.4, 3.0),
                    epoch_ts: i % 5 == 4,
                    assortment,
                    daily_units: Vec::new(),
                }
            })
            .collect();
        let mut home_members = vec![Vec::new(); stores.len().max(1)];
        let mut member_home = Vec::with_capacity(cfg.members);
        for m in 0..cfg.members {
            let home = rng.random_range(0..stores.len().max(1));
            home_members[home].push(m as u32);
            member_home.push(home as u32);
        }
        let mut chain = Chain {
            cfg,
            stores,
            products,
            home_members,
            member_home,
        };
        chain.estimate_daily_units();
        chain
    }

    fn estimate_daily_units(&mut self) {
        let intensity = self.cfg.receipt_rate();
        let profile = self.cfg.profile;
        for s in &mut self.stores {
            let receipts_per_day: f64 = (0..24)
                .map(|h| s.format.peak_receipts_per_hour() * s.format.hour_curve(h))
                .sum::<f64>()
                * s.size
                * intensity;
            let lines = receipts_per_day * (1.0 + profile.extra_lines(s.format)) * 1.4;
            let n = s.assortment.len();
            let zs = self.cfg.profile.zipf_s();
            let norm: f64 = (1..=n).map(|k| (k as f64).powf(-zs)).sum();
            let products = &self.products;
            let assortment = &s.assortment;
            s.daily_units = (1..=n)
                .map(|k| {
                    // Weighed goods are stocked and sold in grams.
                    let grams = if products[assortment[k - 1]].weighed {
                        GRAMS_PER_SALE as f64
                    } else {
                        1.0
                    };
                    lines * (k as f64).powf(-zs) / norm * grams
                })
                .collect();
        }
    }

    /// Receipts per second the chain produces at event time `ts_ms` with
    /// intensity 1 (hour of day and day of week included).
    pub fn receipts_per_sec_at(&self, ts_ms: i64) -> f64 {
        let local = self.local_ms(ts_ms);
        let hour = local.rem_euclid(DAY_MS) / HOUR_MS;
        let day = local.div_euclid(DAY_MS) - 4;
        self.stores
            .iter()
            .map(|s| s.format.peak_receipts_per_hour() * s.format.hour_curve(hour) * s.size)
            .sum::<f64>()
            * self.cfg.profile.rate_scale()
            * weekday_factor(day)
            / 3600.0
    }

    /// `stores.csv`: `store_id,name,city,format,fridges,timezone,opens,
    /// closes` (a convenience store has no hours: open around the clock).
    pub fn stores_csv(&self) -> String {
        let mut out = String::from("store_id,name,city,format,fridges,timezone,opens,closes\n");
        let tz = self.cfg.timezone.map(|z| z.name()).unwrap_or("");
        for s in &self.stores {
            let (opens, closes) = s.format.hours().unwrap_or(("", ""));
            let _ = writeln!(
                out,
                "{},{},{},{},{},{tz},{opens},{closes}",
                s.id,
                s.name,
                s.city,
                s.format.name(),
                s.format.fridges()
            );
        }
        out
    }

    /// `ts_ms` on the stores' wall clock (`timezone`; UTC without one).
    fn local_ms(&self, ts_ms: i64) -> i64 {
        use chrono::{Offset, TimeZone};
        match (
            self.cfg.timezone,
            chrono::DateTime::from_timestamp_millis(ts_ms),
        ) {
            (Some(tz), Some(at)) => {
                let o = tz.offset_from_utc_datetime(&at.naive_utc());
                ts_ms + i64::from(o.fix().local_minus_utc()) * 1000
            }
            _ => ts_ms,
        }
    }

    /// `products.csv`: `sku,name,category,unit_cost,unit_price,case_pack`.
    pub fn products_csv(&self) -> String {
        let mut out = String::from("sku,name,category,unit_cost,unit_price,case_pack\n");
        for p in &self.products {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{}",
                p.sku,
                p.name,
                p.category,
                money(p.unit_cost_cents),
                money(p.price_cents),
                p.case_pack
            );
        }
        out
    }

    /// The new chain price of product `p` (now `cents`) if head office
    /// changes it on day `day` (days since the epoch), at 06:00 UTC.
    fn price_change(&self, day: i64, p: usize, cents: i64) -> Option<i64> {
        let h = mix(self.cfg.seed ^ mix(day as u64 ^ mix(p as u64 ^ 0x9f1c_e5d0)));
        if unit(h) >= self.cfg.price_changes_per_sku_day {
            return None;
        }
        let factor = 0.85 + 0.30 * unit(mix(h));
        let new = ((cents as f64 * factor / 10.0).round() as i64 * 10 - 1).max(9);
        (new != cents).then_some(new)
    }

    /// Hours store `s` keeps charging the old price after the change of
    /// product `p` on `day` (0 for most stores).
    fn price_lag_ms(&self, day: i64, p: usize, s: usize) -> i64 {
        let h = mix(self.cfg.seed ^ mix(day as u64 ^ mix((p as u64) << 20 ^ s as u64 ^ 0x1a6)));
        if unit(h) < 0.1 {
            (6 + (mix(h) % 67) as i64) * HOUR_MS
        } else {
            0
        }
    }

    /// Whether store `s` sells product `p` at its city's price (every
    /// 40th SKU in the chain's first city: 5 % above the chain's base).
    fn city_priced(&self, s: usize, p: usize) -> bool {
        p % CITY_PRICED_EVERY == 7 && self.stores[s].city == CITIES[0]
    }

    fn city_price(&self, p: usize) -> i64 {
        (self.products[p].price_cents * 21 + 10) / 20
    }

    /// `prices.csv`: `sku,store_id,city,format,price,valid_from`: every
    /// SKU's chain price from 30 days before the start, the city prices,
    /// and head office's changes up to `until_ms`.
    pub fn prices_csv(&self, until_ms: i64) -> String {
        let mut out = String::from("sku,store_id,city,format,price,valid_from\n");
        let since = ts_text(self.cfg.start_ms - 30 * DAY_MS);
        let mut cents: Vec<i64> = self.products.iter().map(|p| p.price_cents).collect();
        for (i, p) in self.products.iter().enumerate() {
            let _ = writeln!(
                out,
                "{},,,,{},{since}",
                p.sku,
                unit_price_text(cents[i], p.weighed)
            );
            if i % CITY_PRICED_EVERY == 7 && self.stores.iter().any(|s| s.city == CITIES[0]) {
                let _ = writeln!(
                    out,
                    "{},,{},,{},{since}",
                    p.sku,
                    CITIES[0],
                    unit_price_text(self.city_price(i), p.weighed)
                );
            }
        }
        // The first change comes at the first 06:00 after the start (as in
        // the simulator).
        let mut day = self.cfg.start_ms.div_euclid(DAY_MS);
        if day * DAY_MS + PRICE_CHANGE_AT_MS <= self.cfg.start_ms {
            day += 1;
        }
        while day * DAY_MS + PRICE_CHANGE_AT_MS < until_ms {
            let at = ts_text(day * DAY_MS + PRICE_CHANGE_AT_MS);
            for (i, p) in self.products.iter().enumerate() {
                if let Some(new) = self.price_change(day, i, cents[i]) {
                    cents[i] = new;
                    let _ = writeln!(out, "{},,,,{},{at}", p.sku, unit_price_text(new, p.weighed));
                }
            }
            day += 1;
        }
        out
    }

    /// `replenishment_policy.csv`: thresholds per store format and category.
    pub fn policy_csv(&self) -> String {
        let mut out =
            String::from("format,category,lead_time_hours,service_level,review_hours,min_stock\n");
        for f in Format::ALL {
            for c in f.categories() {
                let (lead, sl, review, min) = policy(f, c);
                let _ = writeln!(out, "{},{c},{lead},{sl},{review},{min}", f.name());
            }
        }
        out
    }
}

/// `replenishment_policy` of (format, category): lead time (h), service
/// level, review period (h), minimum stock.
fn policy(f: Format, category: &str) -> (i64, f64, i64, i64) {
    match (f, category) {
        (Format::Bakery, "bakery") => (12, 0.9, 24, 5),
        (_, "produce") | (_, "dairy") => (24, 0.95, 24, 6),
        (Format::Supermarket, _) => (48, 0.98, 72, 12),
        (Format::TeaShop, _) => (24, 0.95, 48, 4),
        (Format::Convenience, _) => (36, 0.97, 48, 6),
        (Format::Bakery, _) => (48, 0.9, 72, 4),
    }
}

const ZIPF_S: f64 = 1.07;

/// `n / d` rounded to the nearest integer, ties to even.
fn round_half_even(n: i64, d: i64) -> i64 {
    let (q, r) = (n.div_euclid(d), n.rem_euclid(d));
    match (2 * r).cmp(&d) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

/// A unit price as the till prints it: per piece in cents, or (weighed
/// goods, `cents` per kilogram) per gram with six decimals.
fn unit_price_text(cents: i64, weighed: bool) -> String {
    if weighed {
        let micros = cents * 10;
        format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
    } else {
        money(cents)
    }
}

/// SplitMix64: a well-mixed hash of one word (price changes are a pure
/// function of seed, day and SKU, so `prices.csv` and the simulator agree
/// without sharing state).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// An instant as RFC 3339 text (UTC, seconds).
fn ts_text(ms: i64) -> String {
    let dt = chrono::DateTime::from_timestamp_millis(ms).expect("valid ts");
    dt.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What a stock movement may name besides its SKU and quantity.
#[derive(Debug, Default)]
struct Links<'a> {
    /// The purchase order a receipt fills.
    order: Option<&'a str>,
    /// The lot of a perishable delivery and when it expires.
    lot: Option<(String, i64)>,
}

/// Days a delivery of a perishable category keeps (its lot's
/// `expires_at`); `None`: not tracked by lot.
fn shelf_life_days(category: &str) -> Option<i64> {
    match category {
        "dairy" => Some(10),
        "produce" => Some(5),
        "bakery" => Some(2),
        _ => None,
    }
}

/// Head-office price changes take effect at this time of day (UTC).
const PRICE_CHANGE_AT_MS: i64 = 6 * HOUR_MS;
/// Every this many SKUs one is priced per city in the chain's first city.
const CITY_PRICED_EVERY: usize = 40;

/// One generated event: its stream, event time and JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenEvent {
    /// The stream it belongs to.
    pub stream: StreamKind,
    /// Event time (epoch ms).
    pub ts_ms: i64,
    /// The event as one JSON object (no trailing newline).
    pub json: String,
}

#[derive(Debug, Clone, Default)]
struct StoreRuntime {
    seq: u64,
    on_hand: Vec<i64>,
    zipf: Option<Zipf<f64>>,
    /// Today's outage, `[start, end)` in event time.
    offline: Option<(i64, i64)>,
    buffer: Vec<GenEvent>,
    /// A fridge that is warming up: (fridge, from, to).
    failing_fridge: Option<(usize, i64, i64)>,
    /// Sparse stock ([`Profile::sparse_stock`]): assortment entries sold
    /// since the last delivery, and a mark per entry for membership.
    sold: Vec<u32>,
    sold_mark: Vec<bool>,
}

/// Walks event time forward and emits the chain's events in arrival order.
#[derive(Debug)]
pub struct Simulator {
    chain: Chain,
    rng: ChaCha8Rng,
    now_ms: i64,
    stores: Vec<StoreRuntime>,
    linked: HashSet<(u32, u32)>,
    step: Vec<GenEvent>,
    /// Part of every event id: the start in base-36 seconds.
    run_tag: String,
    /// Per product: chain price now and before its last change, and the
    /// day (since the epoch) of that change.
    prices: Vec<PriceNow>,
}

/// A product's chain price in the simulation.
#[derive(Debug, Clone, Copy)]
struct PriceNow {
    cents: i64,
    before: i64,
    /// Day of the last change (`i64::MIN`: none yet).
    day: i64,
}

/// `n` in base 36 (lower case).
fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

impl Simulator {
    /// A simulator starting at the chain configuration's `start_ms`.
    pub fn new(chain: Chain) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(chain.cfg.seed);
        let stores = chain
            .stores
            .iter()
            .map(|s| StoreRuntime {
                // A chain holds at least its policy's min_stock of a SKU.
                on_hand: s
                    .daily_units
                    .iter()
                    .zip(&s.assortment)
                    .map(|(u, &p)| {
                        let min = policy(s.format, chain.products[p].category).3;
                        (u * 3.0).ceil() as i64 + rng.random_range(0..6) + min
                    })
                    .collect(),
                zipf: (!s.assortment.is_empty()).then(|| {
                    Zipf::new(s.assortment.len() as f64, chain.cfg.profile.zipf_s())
                        .expect("valid zipf")
                }),
                sold_mark: if chain.cfg.profile.sparse_stock() {
                    vec![false; s.assortment.len()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            })
            .collect();
        let prices = chain
            .products
            .iter()
            .map(|p| PriceNow {
                cents: p.price_cents,
                before: p.price_cents,
                day: i64::MIN,
            })
            .collect();
        Self {
            now_ms: chain.cfg.start_ms,
            run_tag: base36(chain.cfg.start_ms.max(0) as u64 / 1000),
            prices,
            chain,
            rng,
            stores,
            linked: HashSet::new(),
            step: Vec::new(),
        }
    }

    /// Changes the receipt-rate multiplier from now on (the live generator
    /// keeps a target event rate across the hours of the day).
    pub fn set_intensity(&mut self, intensity: f64) {
        self.chain.cfg.intensity = intensity;
    }

    /// The chain being simulated.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Current simulated event time (epoch ms).
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Simulates up to `until_ms`, calling `emit` for each event in arrival
    /// order. Offline stores' events are held back until they reconnect.
    pub fn advance(&mut self, until_ms: i64, emit: &mut dyn FnMut(GenEvent)) {
        while self.now_ms < until_ms {
            let next_minute = (self.now_ms.div_euclid(STEP_MS) + 1) * STEP_MS;
            let end = next_minute.min(until_ms);
            self.simulate(self.now_ms, end);
            self.now_ms = end;
            // Events of one step arrive in event-time order.
            let mut step = std::mem::take(&mut self.step);
            step.sort_by_key(|e| e.ts_ms);
            for e in step.drain(..) {
                emit(e);
            }
            self.step = step;
            for s in 0..self.stores.len() {
                if matches!(self.stores[s].offline, Some((_, end)) if end <= self.now_ms) {
                    self.upload(s, emit);
                }
            }
        }
    }

    /// Uploads every offline buffer now (end of a bounded run).
    pub fn flush_offline(&mut self, emit: &mut dyn FnMut(GenEvent)) {
        for s in 0..self.stores.len() {
            self.upload(s, emit);
        }
    }

    fn upload(&mut self, s: usize, emit: &mut dyn FnMut(GenEvent)) {
        let rt = &mut self.stores[s];
        rt.offline = None;
        let mut buf = std::mem::take(&mut rt.buffer);
        buf.shuffle(&mut self.rng);
        let n = buf.len();
        for (i, e) in buf.into_iter().enumerate() {
            // A flaky uplink retransmits about 2% of the buffer.
            if i < n / 50 {
                emit(e.clone());
            }
            emit(e);
        }
    }

    fn simulate(&mut self, from: i64, to: i64) {
        let dt_hours = (to - from) as f64 / HOUR_MS as f64;
        let local = self.chain.local_ms(from);
        let hour = local.rem_euclid(DAY_MS) / HOUR_MS;
        let day = (local.div_euclid(DAY_MS)) - 4; // 1970-01-01 was a Thursday
        if from == self.chain.cfg.start_ms {
            for s in 0..self.chain.stores.len() {
                self.opening_stocktake(s, from);
            }
        }
        // Head office's price changes (steps start at every minute).
        if from > self.chain.cfg.start_ms && from.rem_euclid(DAY_MS) == PRICE_CHANGE_AT_MS {
            let day = from.div_euclid(DAY_MS);
            for (p, now) in self.prices.iter_mut().enumerate() {
                if let Some(new) = self.chain.price_change(day, p, now.cents) {
                    *now = PriceNow {
                        cents: new,
                        before: now.cents,
                        day,
                    };
                }
            }
        }
        for s in 0..self.chain.stores.len() {
            self.plan_day(s, from, to);
            self.daily_routines(s, from, to);
            if self.chain.cfg.profile.iot() {
                self.fridges(s, from, to);
            }
            let store = &self.chain.stores[s];
            let lambda = store.format.peak_receipts_per_hour()
                * store.format.hour_curve(hour)
                * weekday_factor(day)
                * store.size
                * self.chain.cfg.receipt_rate()
                * dt_hours;
            if lambda <= 0.0 {
                continue;
            }
            let n = Poisson::new(lambda)
                .expect("positive")
                .sample(&mut self.rng) as u64;
            for _ in 0..n {
                let ts = self.rng.random_range(from..to);
                self.receipt(s, ts);
            }
        }
    }

    /// At 07:00 each day: maybe schedule an outage and a fridge failure.
    fn plan_day(&mut self, s: usize, from: i64, to: i64) {
        let at = from.div_euclid(DAY_MS) * DAY_MS + 7 * HOUR_MS;
        if !(from <= at && at < to) {
            return;
        }
        if self.stores[s].offline.is_none()
            && self
                .rng
                .random_bool(self.chain.cfg.offline_per_store_day.clamp(0.0, 1.0))
        {
            let start = at + self.rng.random_range(0..10 * HOUR_MS);
            let hours = self.rng.random_range(2..=6);
            self.stores[s].offline = Some((start, start + hours * HOUR_MS));
        }
        if self.rng.random_bool(0.05) {
            let fridge = self
                .rng
                .random_range(0..self.chain.stores[s].format.fridges());
            let start = at + self.rng.random_range(0..12 * HOUR_MS);
            let hours = self.rng.random_range(1..=5);
            self.stores[s].failing_fridge = Some((fridge, start, start + hours * HOUR_MS));
        }
    }

    /// Morning deliveries, nightly waste and stock-takes.
    ///
    /// Deliveries come at 06:00 every day at intensity 1. A live generator
    /// sped up to a target event rate sells a day's stock in a fraction of
    /// a day, so its deliveries come that much more often (every
    /// `DAY / intensity`, at least a minute apart): the shelves, and the
    /// event rate, hold instead of emptying in the first minute.
    fn daily_routines(&mut self, s: usize, from: i64, to: i64) {
        let day_start = from.div_euclid(DAY_MS) * DAY_MS;
        let night = day_start + 22 * HOUR_MS;
        let period = ((DAY_MS as f64 / self.chain.cfg.intensity.max(1.0)) as i64).max(60_000);
        let delivery = (from - 6 * HOUR_MS).div_euclid(period) * period + 6 * HOUR_MS;
        let delivery = if delivery < from {
            delivery + period
        } else {
            delivery
        };
        let sparse = self.chain.cfg.profile.sparse_stock();
        if from <= delivery && delivery < to {
            for a in self.stock_walk(s, true) {
                let p = self.chain.stores[s].assortment[a];
                let daily = self.chain.stores[s].daily_units[a];
                // Either way the chain keeps at least the policy's min_stock.
                let (lead_h, _, _, min) =
                    policy(self.chain.stores[s].format, self.chain.products[p].category);
                let (reorder_level, order_up_to) = if self.chain.cfg.restock_to_policy {
                    // Demand per ms of event time at the current intensity.
                    let per_ms = daily * self.chain.cfg.intensity.max(1.0) / DAY_MS as f64;
                    let cover = per_ms * (lead_h * HOUR_MS + 2 * period) as f64;
                    let lead = per_ms * (lead_h * HOUR_MS) as f64;
                    let safety = 3.0 * lead.sqrt() + 2.0;
                    let level = (cover + safety).ceil() as i64 + min;
                    (level, level)
                } else {
                    // Two to three days of demand on top of min_stock.
                    (
                        (daily * 2.0).ceil() as i64 + 2 + min,
                        (daily * 3.0).ceil() as i64 + 2 + min,
                    )
                };
                let on_hand = self.stores[s].on_hand[a];
                if on_hand < reorder_level {
                    let pack = self.chain.products[p].case_pack;
                    let want = order_up_to - on_hand;
                    let qty = (want + pack - 1) / pack * pack;
                    self.stores[s].on_hand[a] += qty;
                    let ts = delivery + self.rng.random_range(0..(30 * 60_000).min(period / 2));
                    let sku = self.chain.products[p].sku.clone();
                    // The order is placed at the delivery slot, expected within
                    // the hour; the receipt that fills it names it.
                    let order_id = self.next_id(s, 'o');
                    let id = self.next_id(s, 'p');
                    let mut j = self.head(&id, delivery, s);
                    let _ = write!(
                        j,
                        r#","order_id":"{order_id}","sku":"{sku}","status":"placed","qty":{qty},"expected_at":{}}}"#,
                        delivery + HOUR_MS
                    );
                    self.push(s, StreamKind::PurchaseOrders, delivery, j);
                    // Perishables arrive as a lot with its expiry.
                    let lot = shelf_life_days(self.chain.products[p].category).map(|days| {
                        let day = chrono::DateTime::from_timestamp_millis(ts).expect("valid ts");
                        (
                            format!("{sku}-{}", day.format("%Y%m%d")),
                            ts + days * DAY_MS,
                        )
                    });
                    let links = Links {
                        order: Some(&order_id),
                        lot,
                    };
                    self.movement(s, ts, &sku, "receipt", qty, links);
                }
            }
        }
        if from <= night && night < to {
            let count_every = 20usize;
            let offset = (from.div_euclid(DAY_MS) as usize) % count_every;
            // Sparse: the SKUs sold since the morning's delivery; a quarter
            // of them are cycle-counted.
            for a in self.stock_walk(s, false) {
                let p = self.chain.stores[s].assortment[a];
                let sku = self.chain.products[p].sku.clone();
                let is_bakery = self.chain.products[p].category == "bakery";
                let count = if sparse {
                    self.rng.random_bool(0.25)
                } else {
                    a % count_every == offset
                };
                if is_bakery && self.stores[s].on_hand[a] > 0 {
                    let waste = self.stores[s].on_hand[a];
                    self.stores[s].on_hand[a] = 0;
                    let ts = night + self.rng.random_range(0..20 * 60_000);
                    self.movement(s, ts, &sku, "waste", -waste, Links::default());
                } else if count {
                    // Shrinkage: the count is sometimes a unit or two below the book.
                    let shrink = if self.rng.random_bool(0.15) {
                        self.rng.random_range(1..=2)
                    } else {
                        0
                    };
                    let on_hand = (self.stores[s].on_hand[a] - shrink).max(0);
                    self.stores[s].on_hand[a] = on_hand;
                    let ts = night + 30 * 60_000 + self.rng.random_range(0..60 * 60_000);
                    let source = if self.chain.stores[s].format == Format::Supermarket {
                        "shelf_sensor"
                    } else {
                        "stocktake"
                    };
                    let id = self.next_id(s, 'c');
                    let mut j = self.head(&id, ts, s);
                    let _ = write!(
                        j,
                        r#","sku":"{sku}","on_hand":{on_hand},"source":"{source}"}}"#
                    );
                    self.push(s, StreamKind::StockCounts, ts, j);
                }
            }
        }
    }

    fn fridges(&mut self, s: usize, from: i64, to: i64) {
        let n = self.chain.stores[s].format.fridges();
        for f in 0..n {
            // Each fridge reports every 5 minutes at its own phase.
            let phase = ((s * 7 + f * 13) as i64 * 11_000) % IOT_EVERY_MS;
            let mut t = (from - phase).div_euclid(IOT_EVERY_MS) * IOT_EVERY_MS + phase;
            if t < from {
                t += IOT_EVERY_MS;
            }
            while t < to {
                let mut temp = 3.6 + self.rng.random_range(-0.6..0.6);
                if let Some((ff, a, b)) = self.stores[s].failing_fridge {
                    if ff == f && t >= a && t < b {
                        temp += ((t - a) as f64 / HOUR_MS as f64 * 2.5).min(8.0);
                    }
                }
                let id = self.next_id(s, 'i');
                let mut j = self.head(&id, t, s);
                let _ = write!(
                    j,
                    r#","device_id":"{}-fridge-{}","metric":"fridge_temp_c","value":{:.2}}}"#,
                    self.chain.stores[s].id,
                    f + 1,
                    temp
                );
                self.push(s, StreamKind::IotReadings, t, j);
                t += IOT_EVERY_MS;
            }
        }
    }

    /// The assortment entries of store `s` that a delivery (`restock`) or
    /// the night's waste and counts look at: all of them, or with sparse
    /// stock ([`Profile::sparse_stock`]) those sold since the last delivery
    /// (a delivery then starts the list anew).
    fn stock_walk(&mut self, s: usize, restock: bool) -> Vec<usize> {
        if !self.chain.cfg.profile.sparse_stock() {
            return (0..self.chain.stores[s].assortment.len()).collect();
        }
        let rt = &mut self.stores[s];
        let items: Vec<usize> = rt.sold.iter().map(|&a| a as usize).collect();
        if restock {
            rt.sold.clear();
            for &a in &items {
                rt.sold_mark[a] = false;
            }
        }
        items
    }

    /// Lines on the next receipt of store `s`: 1 + Poisson(extra) by
    /// default; a grocery chain's baskets have a long tail (log-normal,
    /// 1 to [`MAX_BASKET_LINES`]).
    fn basket_lines(&mut self, s: usize) -> usize {
        let profile = self.chain.cfg.profile;
        let extra = profile.extra_lines(self.chain.stores[s].format);
        if profile == Profile::GroceryChain {
            // Mean exp(mu + sigma^2 / 2) = extra.
            let sigma = 0.9;
            let mu = extra.ln() - sigma * sigma / 2.0;
            let n = LogNormal::new(mu, sigma).map_or(0.0, |d| d.sample(&mut self.rng));
            return (1 + n as usize).min(MAX_BASKET_LINES);
        }
        1 + Poisson::new(extra).map_or(0, |p| p.sample(&mut self.rng) as usize)
    }

    fn receipt(&mut self, s: usize, ts: i64) {
        let n_lines = self.basket_lines(s);
        let Some(zipf) = self.stores[s].zipf else {
            return;
        };
        let mut lines = String::new();
        let mut written = 0;
        for _ in 0..n_lines {
            let a = (zipf.sample(&mut self.rng) as usize).saturating_sub(1);
            let p = self.chain.stores[s].assortment[a];
            let weighed = self.chain.products[p].weighed;
            let mut qty: i64 = if weighed {
                self.rng.random_range(80..=2 * GRAMS_PER_SALE - 80)
            } else if self.rng.random_bool(0.8) {
                1
            } else {
                self.rng.random_range(2..=4)
            };
            if self.rng.random_bool(0.004) {
                qty = -1; // a refund
            }
            let on_hand = &mut self.stores[s].on_hand[a];
            if qty > 0 {
                if *on_hand <= 0 {
                    continue; // empty shelf: the sale is lost
                }
                qty = qty.min(*on_hand);
            }
            *on_hand -= qty;
            let rt = &mut self.stores[s];
            if !rt.sold_mark.is_empty() && !rt.sold_mark[a] {
                rt.sold_mark[a] = true;
                rt.sold.push(a as u32);
            }
            let cents = self.charged_cents(s, p, ts);
            let prod = &self.chain.products[p];
            if written > 0 {
                lines.push(',');
            }
            if prod.weighed {
                // Per gram, six decimals; the till prints the line rounded
                // to the cent (half to even).
                let amount = round_half_even(qty * cents, 1000);
                let _ = write!(
                    lines,
                    r#"{{"sku":"{}","qty":{qty},"unit_price":{},"amount":{}}}"#,
                    prod.sku,
                    unit_price_text(cents, true),
                    money(amount)
                );
                written += 1;
                continue;
            }
            let _ = write!(
                lines,
                r#"{{"sku":"{}","qty":{qty},"unit_price":{}"#,
                prod.sku,
                money(cents)
            );
            if qty > 0 && self.rng.random_bool(0.08) {
                let _ = write!(lines, r#","discount":{}"#, money(cents * qty / 10));
            }
            lines.push('}');
            written += 1;
        }
        if written == 0 {
            return;
        }
        let member = self.pick_member(s);
        let id = self.next_id(s, 'r');
        let store_id = &self.chain.stores[s].id;
        let receipt_id = format!("{store_id}-{}-{}", self.run_tag, self.stores[s].seq);
        let mut j = self.head(&id, ts, s);
        let _ = write!(j, r#","receipt_id":"{receipt_id}""#);
        // At their home store members show the chain-wide card; elsewhere a
        // store-local card, linked to the chain-wide id on first use.
        let local = member.is_some_and(|m| self.chain.member_home[m as usize] as usize != s);
        match member {
            Some(m) if local => {
                let _ = write!(j, r#","member_id":"{store_id}-L{:06}""#, m + 1);
            }
            Some(m) => {
                let _ = write!(j, r#","member_id":"M{:06}""#, m + 1);
            }
            None => {}
        }
        let channel = match self.rng.random_range(0..100) {
            0..=84 => "pos",
            85..=94 => "app",
            _ => "delivery",
        };
        let _ = write!(j, r#","channel":"{channel}","lines":[{lines}]}}"#);
        self.push(s, StreamKind::Sales, ts, j);
        if let Some(m) = member.filter(|_| local) {
            if self.linked.insert((s as u32, m)) {
                let id = self.next_id(s, 'm');
                let mut j = self.head(&id, ts, s);
                let _ = write!(
                    j,
                    r#","local_member_id":"{}-L{:06}","member_id":"M{:06}"}}"#,
                    self.chain.stores[s].id,
                    m + 1,
                    m + 1
                );
                self.push(s, StreamKind::MemberLinks, ts, j);
            }
        }
    }

    fn pick_member(&mut self, s: usize) -> Option<u32> {
        if self.chain.cfg.members == 0 || !self.rng.random_bool(0.4) {
            return None;
        }
        let home = &self.chain.home_members[s];
        if !home.is_empty() && self.rng.random_bool(0.75) {
            Some(home[self.rng.random_range(0..home.len())])
        } else {
            Some(self.rng.random_range(0..self.chain.cfg.members as u32))
        }
    }

    fn movement(&mut self, s: usize, ts: i64, sku: &str, kind: &str, qty: i64, links: Links<'_>) {
        let id = self.next_id(s, 'k');
        let mut j = self.head(&id, ts, s);
        let _ = write!(j, r#","sku":"{sku}","kind":"{kind}","qty":{qty}"#);
        if let Some(order) = links.order {
            let _ = write!(j, r#","order_id":"{order}""#);
        }
        if let Some((lot, expires)) = links.lot {
            let _ = write!(j, r#","lot":"{lot}","expires_at":"{}""#, ts_text(expires));
        }
        j.push('}');
        self.push(s, StreamKind::StockMovements, ts, j);
    }

    /// The stock every shelf starts with, announced as a stock count at the
    /// start of the simulation (so on-hand is known from the first sale).
    fn opening_stocktake(&mut self, s: usize, ts: i64) {
        for a in 0..self.chain.stores[s].assortment.len() {
            let p = self.chain.stores[s].assortment[a];
            let sku = self.chain.products[p].sku.clone();
            let on_hand = self.stores[s].on_hand[a];
            let id = self.next_id(s, 'c');
            let mut j = self.head(&id, ts, s);
            let _ = write!(
                j,
                r#","sku":"{sku}","on_hand":{on_hand},"source":"opening_stocktake"}}"#
            );
            self.push(s, StreamKind::StockCounts, ts, j);
        }
    }

    /// `{store}-{run}{tag}{seq}`: the run is the simulation's start (base
    /// 36 seconds), so a restarted live generator (which starts at "now")
    /// mints new ids instead of repeating the last run's, while a dataset
    /// (fixed start) stays reproducible.
    fn next_id(&mut self, s: usize, tag: char) -> String {
        let rt = &mut self.stores[s];
        rt.seq += 1;
        format!(
            "{}-{}{tag}{:08}",
            self.chain.stores[s].id, self.run_tag, rt.seq
        )
    }

    /// `{"event_id":..,"ts":..,"store_id":..` (object left open).
    /// The price store `s`'s till charges for product `p` at `ts`: its
    /// city's price, or the chain's, or (a store lagging behind the last
    /// change) the chain's price before it.
    fn charged_cents(&self, s: usize, p: usize, ts: i64) -> i64 {
        if self.chain.city_priced(s, p) {
            return self.chain.city_price(p);
        }
        let now = self.prices[p];
        if now.day == i64::MIN {
            return now.cents;
        }
        let changed = now.day * DAY_MS + PRICE_CHANGE_AT_MS;
        if ts < changed + self.chain.price_lag_ms(now.day, p, s) {
            now.before
        } else {
            now.cents
        }
    }

    fn head(&self, id: &str, ts: i64, s: usize) -> String {
        let store = &self.chain.stores[s];
        let mut j = String::with_capacity(256);
        let _ = write!(j, r#"{{"event_id":"{id}","ts":"#);
        if store.epoch_ts {
            let _ = write!(j, "{ts}");
        } else {
            let dt = chrono::DateTime::from_timestamp_millis(ts).expect("valid ts");
            let _ = write!(j, "\"{}\"", dt.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
        }
        let _ = write!(j, r#","store_id":"{}""#, store.id);
        j
    }

    fn push(&mut self, s: usize, stream: StreamKind, ts_ms: i64, json: String) {
        if self.chain.cfg.profile == Profile::ColdStart
            && matches!(
                stream,
                StreamKind::StockCounts | StreamKind::StockMovements | StreamKind::PurchaseOrders
            )
        {
            return; // before the first stock-take: nothing about stock is sent
        }
        if !self.chain.cfg.stock_counts && stream == StreamKind::StockCounts {
            return;
        }
        let e = GenEvent {
            stream,
            ts_ms,
            json,
        };
        match self.stores[s].offline {
            Some((start, end)) if ts_ms >= start && ts_ms < end => self.stores[s].buffer.push(e),
            _ => self.step.push(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cfg: ChainConfig, hours: i64) -> Vec<GenEvent> {
        let start = cfg.start_ms;
        let mut sim = Simulator::new(Chain::new(cfg));
        let mut out = Vec::new();
        sim.advance(start + hours * HOUR_MS, &mut |e| out.push(e));
        sim.flush_offline(&mut |e| out.push(e));
        out
    }

    #[test]
    fn same_seed_same_events_other_seed_other_events() {
        let cfg = ChainConfig {
            stores: 6,
            skus: 50,
            members: 100,
            ..Default::default()
        };
        let a = run(cfg.clone(), 30);
        let b = run(cfg.clone(), 30);
        assert_eq!(a, b);
        let c = run(ChainConfig { seed: 8, ..cfg }, 30);
        assert_ne!(a, c);
    }

    #[test]
    fn tills_charge_the_prices_file_and_a_few_stores_lag_behind_a_change() {
        let cfg = ChainConfig {
            stores: 30,
            skus: 40,
            members: 100,
            price_changes_per_sku_day: 0.5,
            ..Default::default()
        };
        let chain = Chain::new(cfg.clone());
        let city: std::collections::HashMap<String, String> = chain
            .stores_csv()
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0].to_string(), f[2].to_string())
            })
            .collect();
        let ms = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .timestamp_millis()
        };
        // (sku, city or "") → [(valid_from, price)], oldest first.
        let mut rows: std::collections::HashMap<(String, String), Vec<(i64, String)>> =
            Default::default();
        for l in chain
            .prices_csv(cfg.start_ms + 28 * HOUR_MS)
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = l.split(',').collect();
            assert!(f[1].is_empty() && f[3].is_empty(), "{l}");
            rows.entry((f[0].into(), f[2].into()))
                .or_default()
                .push((ms(f[5]), f[4].into()));
        }
        let change = cfg.start_ms + PRICE_CHANGE_AT_MS;
        let changed = rows.values().filter(|r| r.len() == 2).count();
        assert!(changed >= 10, "{changed} of 40 SKUs changed");
        assert!(rows.values().all(|r| r.len() == 1 || r[1].0 == change));
        let (mut new, mut old, mut city_lines) = (0, 0, 0);
        for e in run(cfg, 28) {
            if e.stream != StreamKind::Sales {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&e.json).unwrap();
            let store = v["store_id"].as_str().unwrap();
            for line in v["lines"].as_array().unwrap() {
                let sku = line["sku"].as_str().unwrap().to_string();
                let price = line["unit_price"].to_string();
                if let Some(r) = rows.get(&(sku.clone(), city[store].clone())) {
                    assert_eq!(price, r[0].1, "{store} {sku}: the city's price");
                    city_lines += 1;
                    continue;
                }
                let r = &rows[&(sku.clone(), String::new())];
                if r.len() == 1 || e.ts_ms < change {
                    assert_eq!(price, r[0].1, "{store} {sku} at {}", e.ts_ms);
                } else if price == r[1].1 {
                    new += 1;
                } else {
                    assert_eq!(price, r[0].1, "{store} {sku}: the new or the old price");
                    assert!(
                        e.ts_ms < change + 72 * HOUR_MS,
                        "lagging for more than 72 h"
                    );
                    old += 1;
                }
            }
        }
        assert!(
            new > 0 && old > 0,
            "new price {new} lines, old price after the change {old}"
        );
        assert!(
            old * 3 < new,
            "most stores follow the change: {old} old vs {new} new"
        );
        assert!(city_lines > 0, "no line in the city with its own prices");
    }

    #[test]
    fn a_run_started_later_mints_new_event_ids() {
        let cfg = ChainConfig {
            stores: 2,
            skus: 20,
            members: 10,
            ..Default::default()
        };
        let ids = |cfg: ChainConfig| -> std::collections::HashSet<String> {
            run(cfg, 4)
                .iter()
                .map(|e| {
                    serde_json::from_str::<serde_json::Value>(&e.json).unwrap()["event_id"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        let first = ids(cfg.clone());
        let again = ids(cfg.clone());
        assert_eq!(first, again, "a dataset is reproducible");
        // A restarted demo starts at a later "now": none of its ids repeat.
        let later = ids(ChainConfig {
            start_ms: cfg.start_ms + 3_600_000,
            ..cfg
        });
        assert!(first.is_disjoint(&later));
    }

    #[test]
    fn a_grocery_chain_has_slices_of_a_large_catalogue_a_long_tail_and_sparse_stock() {
        use std::collections::HashMap;
        let cfg = ChainConfig {
            stores: 24,
            skus: 9_000,
            members: 2_000,
            profile: Profile::GroceryChain,
            ..Default::default()
        };
        let chain = Chain::new(cfg.clone());
        for st in &chain.stores {
            let eligible = chain
                .products
                .iter()
                .filter(|p| st.format.categories().contains(&p.category))
                .count();
            let share = Profile::GroceryChain.assortment_share(st.format);
            assert_eq!(
                st.assortment.len(),
                (eligible as f64 * share).ceil() as usize
            );
        }
        let events = run(cfg.clone(), 20 * 24);
        assert!(!events.iter().any(|e| e.stream == StreamKind::IotReadings));
        let json = |e: &GenEvent| serde_json::from_str::<serde_json::Value>(&e.json).unwrap();
        let pair = |v: &serde_json::Value, sku: &serde_json::Value| {
            (
                v["store_id"].as_str().unwrap().to_string(),
                sku.as_str().unwrap().to_string(),
            )
        };
        let mut sales: HashMap<(String, String), u32> = HashMap::new();
        let mut baskets = Vec::new();
        for e in events.iter().filter(|e| e.stream == StreamKind::Sales) {
            let v = json(e);
            let lines = v["lines"].as_array().unwrap();
            baskets.push(lines.len());
            for l in lines {
                *sales.entry(pair(&v, &l["sku"])).or_default() += 1;
            }
        }
        assert!(baskets.iter().all(|&n| (1..=MAX_BASKET_LINES).contains(&n)));
        assert!(
            baskets.iter().any(|&n| n >= 15),
            "a long tail of big baskets"
        );
        // Most pairs that sold at all sold once or twice in 20 days.
        let mut per_pair: Vec<u32> = sales.values().copied().collect();
        per_pair.sort_unstable();
        assert!(per_pair.len() > 1_000, "{} pairs", per_pair.len());
        assert!(
            per_pair[per_pair.len() / 2] <= 2,
            "median {}",
            per_pair[per_pair.len() / 2]
        );
        // Stock moves only where something sold; the counts after the
        // opening stock-take are of sold pairs.
        let mut moved = 0;
        for e in &events {
            let v = json(e);
            let cycle = e.stream == StreamKind::StockCounts && v["source"] != "opening_stocktake";
            if e.stream == StreamKind::StockMovements || cycle {
                moved += 1;
                assert!(sales.contains_key(&pair(&v, &v["sku"])), "{}", e.json);
            }
        }
        assert!(moved > 100, "{moved} stock events");

        let no_counts = run(
            ChainConfig {
                stock_counts: false,
                ..cfg
            },
            48,
        );
        assert!(!no_counts
            .iter()
            .any(|e| e.stream == StreamKind::StockCounts));
        assert!(no_counts
            .iter()
            .any(|e| e.stream == StreamKind::StockMovements));
    }

    #[test]
    fn every_stream_appears_and_offline_stores_arrive_late_with_duplicates() {
        let cfg = ChainConfig {
            stores: 20,
            skus: 120,
            members: 500,
            offline_per_store_day: 0.5,
            ..Default::default()
        };
        let events = run(cfg, 48);
        for k in StreamKind::ALL {
            assert!(events.iter().any(|e| e.stream == k), "no {k} events");
        }
        // Arrival order is not event-time order: some events arrive hours late.
        let mut max_ts = i64::MIN;
        let mut late = 0;
        for e in &events {
            if e.ts_ms < max_ts.saturating_sub(HOUR_MS) {
                late += 1;
            }
            max_ts = max_ts.max(e.ts_ms);
        }
        assert!(late > 10, "expected late arrivals, got {late}");
        let mut ids: Vec<_> = events
            .iter()
            .map(|e| {
                serde_json::from_str::<serde_json::Value>(&e.json).unwrap()["event_id"].clone()
            })
            .collect();
        let n = ids.len();
        ids.sort_by_key(|v| v.to_string());
        ids.dedup();
        assert!(ids.len() < n, "expected retransmitted duplicates");
    }

    /// A generator sped up 200 times after it was built (the live
    /// generator's target rate) keeps selling: deliveries come 200 times as
    /// often, so the shelves do not stay empty once the opening stock, a
    /// few days' worth at the natural rate, is sold.
    #[test]
    fn a_sped_up_chain_is_restocked_and_keeps_selling() {
        let cfg = ChainConfig {
            stores: 5,
            skus: 60,
            members: 100,
            start_ms: 1_767_600_000_000 + 4 * HOUR_MS, // a Monday, 12:00 UTC
            ..Default::default()
        };
        let start = cfg.start_ms;
        let mut sim = Simulator::new(Chain::new(cfg));
        sim.set_intensity(200.0);
        let (mut first, mut last, mut deliveries) = (0usize, 0usize, 0usize);
        sim.advance(start + 40 * 60_000, &mut |e| {
            let t = e.ts_ms - start;
            if e.stream == StreamKind::Sales && t < 10 * 60_000 {
                first += 1;
            } else if e.stream == StreamKind::Sales && t >= 30 * 60_000 {
                last += 1;
            } else if e.stream == StreamKind::StockMovements
                && e.json.contains(r#""kind":"receipt""#)
            {
                deliveries += 1;
            }
        });
        assert!(deliveries > 0, "no delivery in 40 minutes at 200x");
        assert!(
            last * 2 > first,
            "sales fell from {first} in the first 10 minutes to {last} in the last 10"
        );
    }
}
