//! The state kept per entity, and its binary codec.
//!
//! Values are small fixed layouts (little-endian, a leading format version) rather than a
//! general serializer: they are read and written for every transaction, and the layout is
//! the changelog's wire format too, so it must not drift with a library upgrade.

use super::window::{Counter, Slot, BUCKETS, WINDOWS};

/// Bumped when a layout changes; decoding another version is an error, not a guess.
const FORMAT: u8 = 1;

/// How many distinct cards, devices and IPs a customer remembers (most recent first).
pub const KNOWN_CAP: usize = 16;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("corrupt state value: {0}")]
pub struct CodecError(pub String);

/// Running mean and variance (Welford).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// Adds `x`, unless that would make the statistics infinite or NaN (a value near the
    /// largest double): such a value is left out, so no one value can blind the z-scores
    /// computed from these for good.
    pub fn add(&mut self, x: f64) {
        let n = self.n + 1;
        let d = x - self.mean;
        let mean = self.mean + d / n as f64;
        let m2 = self.m2 + d * (x - mean);
        if mean.is_finite() && m2.is_finite() {
            (self.n, self.mean, self.m2) = (n, mean, m2);
        }
    }

    /// Sample standard deviation; 0 with fewer than two values.
    pub fn sd(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            (self.m2 / (self.n - 1) as f64).sqrt()
        }
    }
}

/// Keyed hashes of identifiers seen, most recent first, at most [`KNOWN_CAP`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Known(pub Vec<u64>);

impl Known {
    pub fn contains(&self, h: u64) -> bool {
        self.0.contains(&h)
    }

    pub fn note(&mut self, h: u64) {
        self.0.retain(|&x| x != h);
        self.0.insert(0, h);
        self.0.truncate(KNOWN_CAP);
    }
}

/// What fraudstream remembers about a customer (within one input partition).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CustomerState {
    /// Counts and amount sums per window of [`WINDOWS`].
    pub windows: [Counter; 4],
    /// The latest event time applied, if any.
    pub last_event_ms: Option<i64>,
    pub amounts: Moments,
    pub cards: Known,
    pub devices: Known,
    pub ips: Known,
    /// Transactions per UTC hour of day.
    pub hours: [u32; 24],
}

/// What fraudstream remembers about a merchant, from the customers this partition sees.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MerchantState {
    pub amounts: Moments,
    pub last_event_ms: Option<i64>,
}

/// One browsing session of a customer, from its navigation events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionState {
    /// Event time of the session's earliest event applied.
    pub started_ms: i64,
    /// Event time of its latest event applied.
    pub last_event_ms: i64,
    pub events: u32,
    pub page_views: u32,
    pub product_views: u32,
    pub cart_adds: u32,
    pub failed_logins: u32,
    /// Times the device (or IP) differed from the previous event's that named one.
    pub device_switches: u32,
    pub ip_switches: u32,
    /// Keyed hashes of the last device and IP seen in the session.
    pub last_device: Option<u64>,
    pub last_ip: Option<u64>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        if self.0.len() < N {
            return Err(CodecError(format!("{} bytes short", N - self.0.len())));
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("split at N"))
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64, CodecError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
    fn version(&mut self) -> Result<(), CodecError> {
        match self.u8()? {
            FORMAT => Ok(()),
            v => Err(CodecError(format!("format {v}, expected {FORMAT}"))),
        }
    }
    fn end(&self) -> Result<(), CodecError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(CodecError(format!("{} trailing bytes", self.0.len())))
        }
    }
    fn moments(&mut self) -> Result<Moments, CodecError> {
        Ok(Moments {
            n: self.u64()?,
            mean: self.f64()?,
            m2: self.f64()?,
        })
    }
    fn option_i64(&mut self) -> Result<Option<i64>, CodecError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.i64()?),
        })
    }
    fn known(&mut self) -> Result<Known, CodecError> {
        let n = self.u8()? as usize;
        if n > KNOWN_CAP {
            return Err(CodecError(format!("{n} known ids, at most {KNOWN_CAP}")));
        }
        (0..n)
            .map(|_| self.u64())
            .collect::<Result<_, _>>()
            .map(Known)
    }
}

fn put_moments(out: &mut Vec<u8>, m: &Moments) {
    out.extend_from_slice(&m.n.to_le_bytes());
    out.extend_from_slice(&m.mean.to_le_bytes());
    out.extend_from_slice(&m.m2.to_le_bytes());
}

fn put_option_i64(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => out.push(0),
        Some(x) => {
            out.push(1);
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
}

fn put_known(out: &mut Vec<u8>, k: &Known) {
    out.push(k.0.len() as u8);
    for h in &k.0 {
        out.extend_from_slice(&h.to_le_bytes());
    }
}

impl CustomerState {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FORMAT);
        for w in &self.windows {
            // Only filled slots, to keep idle customers small.
            let filled: Vec<(usize, &Slot)> = w
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.index != super::window::EMPTY)
                .collect();
            out.push(filled.len() as u8);
            for (i, s) in filled {
                out.push(i as u8);
                out.extend_from_slice(&s.index.to_le_bytes());
                out.extend_from_slice(&s.count.to_le_bytes());
                out.extend_from_slice(&s.sum.to_le_bytes());
            }
        }
        put_option_i64(out, self.last_event_ms);
        put_moments(out, &self.amounts);
        put_known(out, &self.cards);
        put_known(out, &self.devices);
        put_known(out, &self.ips);
        for h in &self.hours {
            out.extend_from_slice(&h.to_le_bytes());
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<CustomerState, CodecError> {
        let mut r = Reader(bytes);
        r.version()?;
        let mut s = CustomerState::default();
        for w in 0..WINDOWS.len() {
            let n = r.u8()? as usize;
            for _ in 0..n {
                let i = r.u8()? as usize;
                if i >= BUCKETS {
                    return Err(CodecError(format!("slot {i} out of range")));
                }
                s.windows[w].slots[i] = Slot {
                    index: r.i64()?,
                    count: r.u32()?,
                    sum: r.f64()?,
                };
            }
        }
        s.last_event_ms = r.option_i64()?;
        s.amounts = r.moments()?;
        s.cards = r.known()?;
        s.devices = r.known()?;
        s.ips = r.known()?;
        for h in s.hours.iter_mut() {
            *h = r.u32()?;
        }
        r.end()?;
        Ok(s)
    }
}

impl MerchantState {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FORMAT);
        put_moments(out, &self.amounts);
        put_option_i64(out, self.last_event_ms);
    }

    pub fn decode(bytes: &[u8]) -> Result<MerchantState, CodecError> {
        let mut r = Reader(bytes);
        r.version()?;
        let s = MerchantState {
            amounts: r.moments()?,
            last_event_ms: r.option_i64()?,
        };
        r.end()?;
        Ok(s)
    }
}

fn put_option_u64(out: &mut Vec<u8>, v: Option<u64>) {
    put_option_i64(out, v.map(|x| x as i64));
}

impl SessionState {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FORMAT);
        out.extend_from_slice(&self.started_ms.to_le_bytes());
        out.extend_from_slice(&self.last_event_ms.to_le_bytes());
        for n in [
            self.events,
            self.page_views,
            self.product_views,
            self.cart_adds,
            self.failed_logins,
            self.device_switches,
            self.ip_switches,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        put_option_u64(out, self.last_device);
        put_option_u64(out, self.last_ip);
    }

    pub fn decode(bytes: &[u8]) -> Result<SessionState, CodecError> {
        let mut r = Reader(bytes);
        r.version()?;
        let s = SessionState {
            started_ms: r.i64()?,
            last_event_ms: r.i64()?,
            events: r.u32()?,
            page_views: r.u32()?,
            product_views: r.u32()?,
            cart_adds: r.u32()?,
            failed_logins: r.u32()?,
            device_switches: r.u32()?,
            ip_switches: r.u32()?,
            last_device: r.option_i64()?.map(|x| x as u64),
            last_ip: r.option_i64()?.map(|x| x as u64),
        };
        r.end()?;
        Ok(s)
    }
}

/// The latest event time an encoded customer, merchant or session value holds, read without
/// decoding the rest: for the expiry scan of the store. `None` if the value is not one.
pub fn last_event_ms(kind: EntityKind, bytes: &[u8]) -> Option<i64> {
    match kind {
        EntityKind::Customer => CustomerState::decode(bytes).ok()?.last_event_ms,
        EntityKind::Merchant => MerchantState::decode(bytes).ok()?.last_event_ms,
        EntityKind::Session => Some(SessionState::decode(bytes).ok()?.last_event_ms),
    }
}

/// The kinds of per-partition state; the byte tags them in the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKind {
    Customer,
    Merchant,
    Session,
}

impl EntityKind {
    pub const ALL: [EntityKind; 3] = [
        EntityKind::Customer,
        EntityKind::Merchant,
        EntityKind::Session,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EntityKind::Customer => "customer",
            EntityKind::Merchant => "merchant",
            EntityKind::Session => "session",
        }
    }

    pub fn tag(self) -> u8 {
        match self {
            EntityKind::Customer => b'c',
            EntityKind::Merchant => b'm',
            EntityKind::Session => b's',
        }
    }

    pub fn from_tag(tag: u8) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|k| k.tag() == tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn customer() -> impl Strategy<Value = CustomerState> {
        (
            proptest::collection::vec((0i64..2_000_000_000_000, 0.0f64..10_000.0), 0..40),
            proptest::collection::vec(any::<u64>(), 0..40),
        )
            .prop_map(|(events, ids)| {
                let mut s = CustomerState::default();
                for (t, a) in events {
                    for (w, spec) in WINDOWS.iter().enumerate() {
                        s.windows[w].add(spec, t, a);
                    }
                    s.last_event_ms = Some(s.last_event_ms.map_or(t, |l| l.max(t)));
                    s.amounts.add(a);
                    s.hours[(t / 3_600_000 % 24) as usize] += 1;
                }
                for (i, id) in ids.into_iter().enumerate() {
                    [&mut s.cards, &mut s.devices, &mut s.ips][i % 3].note(id);
                }
                s
            })
    }

    proptest! {
        #[test]
        fn customer_round_trips(s in customer()) {
            let mut buf = Vec::new();
            s.encode(&mut buf);
            prop_assert_eq!(CustomerState::decode(&buf).unwrap(), s);
            // Every strict prefix is an error, never a wrong value.
            for cut in 0..buf.len() {
                prop_assert!(CustomerState::decode(&buf[..cut]).is_err());
            }
        }

        #[test]
        fn merchant_round_trips(xs in proptest::collection::vec(0.0f64..1e6, 0..30), t in proptest::option::of(any::<i64>())) {
            let mut m = MerchantState { last_event_ms: t, ..Default::default() };
            for x in xs { m.amounts.add(x); }
            let mut buf = Vec::new();
            m.encode(&mut buf);
            prop_assert_eq!(MerchantState::decode(&buf).unwrap(), m);
        }
    }

    #[test]
    fn session_round_trips() {
        let s = SessionState {
            started_ms: 1,
            last_event_ms: 99,
            events: 7,
            page_views: 3,
            product_views: 2,
            cart_adds: 1,
            failed_logins: 4,
            device_switches: 1,
            ip_switches: 2,
            last_device: Some(u64::MAX),
            last_ip: None,
        };
        let mut buf = Vec::new();
        s.encode(&mut buf);
        assert_eq!(SessionState::decode(&buf).unwrap(), s);
        assert_eq!(last_event_ms(EntityKind::Session, &buf), Some(99));
        for cut in 0..buf.len() {
            assert!(SessionState::decode(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn moments_match_direct_computation() {
        let xs = [10.0, 12.0, 23.0, 23.0, 16.0, 23.0, 21.0, 16.0];
        let mut m = Moments::default();
        xs.iter().for_each(|&x| m.add(x));
        let mean = xs.iter().sum::<f64>() / 8.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 7.0;
        assert!((m.mean - mean).abs() < 1e-12);
        assert!((m.sd() - var.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn no_value_makes_the_statistics_infinite() {
        let mut m = Moments::default();
        for x in [10.0, 12.0, f64::MAX, 11.0, f64::MAX / 3.0, 1e300] {
            m.add(x);
            assert!(
                m.mean.is_finite() && m.m2.is_finite() && m.sd().is_finite(),
                "{m:?}"
            );
        }
        assert_eq!(m.n, 3, "the absurd values were left out");
        assert!((m.mean - 11.0).abs() < 1e-9);
    }

    #[test]
    fn known_keeps_the_most_recent() {
        let mut k = Known::default();
        for i in 0..20 {
            k.note(i);
        }
        k.note(10);
        assert_eq!(k.0.len(), KNOWN_CAP);
        assert_eq!(k.0[0], 10);
        assert!(!k.contains(3));
        assert!(k.contains(19));
    }

    #[test]
    fn wrong_version_is_an_error() {
        let mut buf = Vec::new();
        MerchantState::default().encode(&mut buf);
        buf[0] = 9;
        assert!(MerchantState::decode(&buf)
            .unwrap_err()
            .0
            .contains("format 9"));
    }
}
