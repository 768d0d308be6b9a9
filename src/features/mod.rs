//! The feature registry: named features, each a pure function of the transaction and the
//! state of its customer and merchant *before* the transaction, and [`apply`], the one place
//! where a transaction changes that state.
//!
//! A model's manifest names its features; [`FeatureSet::resolve`] turns those names into
//! extractors once at start, so an unknown name is a startup error, never a silent zero.
//! Every window runs on event time. "None" values (no history, no coordinates) are -1, a
//! value trees split on cleanly. The same code serves online scoring and offline replay.

pub mod engine;

use crate::decode::{NavKind, NavigationEvent, Requirements, Transaction};
use crate::state::store::ENTITY_TTL_MS;
use crate::state::window::WINDOWS;
use crate::state::{CustomerState, MerchantState, SessionState};

pub use crate::state::global::{Entity, GlobalHits};

/// Bumped whenever a feature's definition changes meaning; manifests record it.
/// 3: navigation sessions, global tables, idle entities expire after 7 days.
pub const REGISTRY_VERSION: u32 = 3;

/// One feature the registry knows how to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `features[i]`: element `i` of the transaction's precomputed vector.
    Passthrough(usize),
    Amount,
    LogAmount,
    HourOfDay,
    DayOfWeek,
    CustomerAgeYears,
    LogCityPop,
    HomeMerchantDistanceKm,
    /// Transactions of this customer in window `i` of [`WINDOWS`] before this one.
    CustomerCount(usize),
    /// Their amount sum.
    CustomerAmountSum(usize),
    CustomerTxTotal,
    SecondsSinceLastTx,
    AmountVsCustomerMean,
    AmountCustomerZscore,
    NewCard,
    NewDevice,
    NewIp,
    CustomerHourShare,
    MerchantAmountZscore,
    MerchantTxTotal,
    SessionEvents,
    SessionPageViews,
    SessionProductViews,
    SessionCartAdds,
    SessionFailedLogins,
    SessionAgeSeconds,
    SessionDeviceSwitches,
    SessionIpSwitches,
    /// 1 if the transaction's device is the session's last one, 0 if not, -1 if unknown.
    SessionSameDevice,
    /// Fraud labels (with `label_time` at or before the transaction) naming this entity.
    FraudLabels(Entity),
    /// 1 if the entity is on the blocklist.
    Blocklisted(Entity),
}

/// Every named feature, in the registry's stable order.
pub fn named() -> Vec<(String, Feature)> {
    let mut v: Vec<(String, Feature)> = vec![
        ("amount".into(), Feature::Amount),
        ("log_amount".into(), Feature::LogAmount),
        ("hour_of_day".into(), Feature::HourOfDay),
        ("day_of_week".into(), Feature::DayOfWeek),
        ("customer_age_years".into(), Feature::CustomerAgeYears),
        ("log_city_pop".into(), Feature::LogCityPop),
        (
            "home_merchant_distance_km".into(),
            Feature::HomeMerchantDistanceKm,
        ),
    ];
    for (i, w) in WINDOWS.iter().enumerate() {
        v.push((
            format!("customer_tx_count_{}", w.name),
            Feature::CustomerCount(i),
        ));
        v.push((
            format!("customer_amount_sum_{}", w.name),
            Feature::CustomerAmountSum(i),
        ));
    }
    v.extend([
        ("customer_tx_total".into(), Feature::CustomerTxTotal),
        ("seconds_since_last_tx".into(), Feature::SecondsSinceLastTx),
        (
            "amount_vs_customer_mean".into(),
            Feature::AmountVsCustomerMean,
        ),
        (
            "amount_customer_zscore".into(),
            Feature::AmountCustomerZscore,
        ),
        ("new_card".into(), Feature::NewCard),
        ("new_device".into(), Feature::NewDevice),
        ("new_ip".into(), Feature::NewIp),
        ("customer_hour_share".into(), Feature::CustomerHourShare),
        (
            "merchant_amount_zscore".into(),
            Feature::MerchantAmountZscore,
        ),
        ("merchant_tx_total".into(), Feature::MerchantTxTotal),
        ("session_events".into(), Feature::SessionEvents),
        ("session_page_views".into(), Feature::SessionPageViews),
        ("session_product_views".into(), Feature::SessionProductViews),
        ("session_cart_adds".into(), Feature::SessionCartAdds),
        ("session_failed_logins".into(), Feature::SessionFailedLogins),
        ("session_age_seconds".into(), Feature::SessionAgeSeconds),
        (
            "session_device_switches".into(),
            Feature::SessionDeviceSwitches,
        ),
        ("session_ip_switches".into(), Feature::SessionIpSwitches),
        ("session_same_device".into(), Feature::SessionSameDevice),
    ]);
    for e in Entity::ALL {
        if e != Entity::EmailDomain {
            v.push((
                format!("{}_fraud_labels", e.name()),
                Feature::FraudLabels(e),
            ));
        }
    }
    for e in Entity::ALL {
        v.push((format!("{}_blocklisted", e.name()), Feature::Blocklisted(e)));
    }
    v
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "unknown feature `{name}` (position {position} in the manifest); known: features[N], {known}"
)]
pub struct UnknownFeature {
    pub name: String,
    pub position: usize,
    pub known: String,
}

/// The keyed hashes of the transaction's card, device and IP (see [`crate::state::Hasher`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ids {
    pub card: Option<u64>,
    pub device: Option<u64>,
    pub ip: Option<u64>,
}

/// The state a transaction's features are computed from: as it was before the transaction.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub customer: &'a CustomerState,
    pub merchant: &'a MerchantState,
    /// The transaction's session (`session_id`), if it has one.
    pub session: Option<&'a SessionState>,
    pub ids: Ids,
    pub global: GlobalHits,
}

impl Context<'static> {
    /// No history: what a first transaction sees, and all a stateless model needs.
    pub fn empty() -> Context<'static> {
        static C: std::sync::OnceLock<(CustomerState, MerchantState)> = std::sync::OnceLock::new();
        let (c, m) = C.get_or_init(Default::default);
        Context {
            customer: c,
            merchant: m,
            session: None,
            ids: Ids::default(),
            global: GlobalHits::default(),
        }
    }
}

/// A model's input row layout (or the registry's full list, for audit).
#[derive(Debug, Clone)]
pub struct FeatureSet {
    names: Vec<String>,
    features: Vec<Feature>,
    /// Derived from `features` once: the pipeline checks it per transaction.
    requirements: Requirements,
}

impl FeatureSet {
    /// Resolves manifest names; the first unknown name is the error.
    pub fn resolve<S: AsRef<str>>(names: &[S]) -> Result<FeatureSet, UnknownFeature> {
        let registry = named();
        let mut features = Vec::with_capacity(names.len());
        for (position, name) in names.iter().enumerate() {
            let name = name.as_ref();
            let f = parse_passthrough(name)
                .map(Feature::Passthrough)
                .or_else(|| registry.iter().find(|(n, _)| n == name).map(|(_, f)| *f))
                .ok_or_else(|| UnknownFeature {
                    name: name.to_string(),
                    position,
                    known: registry
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            features.push(f);
        }
        Ok(FeatureSet::new(
            names.iter().map(|n| n.as_ref().to_string()).collect(),
            features,
        ))
    }

    fn new(names: Vec<String>, features: Vec<Feature>) -> FeatureSet {
        let passthrough_len = features
            .iter()
            .filter_map(|f| match f {
                Feature::Passthrough(i) => Some(i + 1),
                _ => None,
            })
            .max();
        FeatureSet {
            names,
            features,
            requirements: Requirements { passthrough_len },
        }
    }

    /// Every named feature of the registry (no passthrough), in registry order.
    pub fn all_named() -> FeatureSet {
        let (names, features) = named().into_iter().unzip();
        FeatureSet::new(names, features)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// What every transaction must carry for these features to be computed.
    pub fn requirements(&self) -> Requirements {
        self.requirements
    }

    /// Appends this transaction's row to `out`. The transaction has passed
    /// [`crate::decode::validate`] with [`Self::requirements`], so every passthrough index
    /// exists.
    pub fn extend_row(&self, tx: &Transaction, ctx: &Context<'_>, out: &mut Vec<f32>) {
        for f in &self.features {
            out.push(value(*f, tx, ctx) as f32);
        }
    }
}

/// A feature's name for people, as in a verdict's reasons.
pub fn describe(name: &str) -> String {
    let entity = |e: &str| {
        e.replace("email_domain", "e-mail domain")
            .replace("email", "e-mail")
            .replace("ip", "IP address")
    };
    for (prefix, what) in [
        ("customer_tx_count_", "Customer's transactions in the last "),
        ("customer_amount_sum_", "Customer's spend in the last "),
    ] {
        if let Some(w) = name.strip_prefix(prefix) {
            return format!("{what}{w}");
        }
    }
    if let Some(e) = name.strip_suffix("_fraud_labels") {
        return format!("Confirmed frauds on this {}", entity(e));
    }
    if let Some(e) = name.strip_suffix("_blocklisted") {
        return format!("This {} is on the blocklist", entity(e));
    }
    let known = match name {
        "amount" => "Amount",
        "log_amount" => "Amount (log)",
        "hour_of_day" => "Hour of day (UTC)",
        "day_of_week" => "Day of week",
        "customer_age_years" => "Customer's age (years)",
        "log_city_pop" => "Population of the customer's city (log)",
        "home_merchant_distance_km" => "Distance from the customer's home to the merchant (km)",
        "customer_tx_total" => "Customer's transactions so far",
        "seconds_since_last_tx" => "Seconds since the customer's previous transaction",
        "amount_vs_customer_mean" => "Amount relative to the customer's mean",
        "amount_customer_zscore" => "Amount against the customer's usual (standard deviations)",
        "new_card" => "Card new for this customer",
        "new_device" => "Device new for this customer",
        "new_ip" => "IP address new for this customer",
        "customer_hour_share" => "Share of the customer's transactions at this hour",
        "merchant_amount_zscore" => "Amount against the merchant's usual (standard deviations)",
        "merchant_tx_total" => "Merchant's transactions so far",
        "session_events" => "Events in the session",
        "session_page_views" => "Page views in the session",
        "session_product_views" => "Product views in the session",
        "session_cart_adds" => "Cart additions in the session",
        "session_failed_logins" => "Failed logins in the session",
        "session_age_seconds" => "Session age (seconds)",
        "session_device_switches" => "Device changes in the session",
        "session_ip_switches" => "IP address changes in the session",
        "session_same_device" => "Payment from the session's device",
        other => return other.to_string(),
    };
    known.to_string()
}

const NONE: f64 = -1.0;

fn value(f: Feature, tx: &Transaction, ctx: &Context<'_>) -> f64 {
    let c = ctx.customer;
    let t = tx.event_time_ms;
    match f {
        Feature::Passthrough(i) => tx
            .features
            .as_ref()
            .and_then(|v| v.get(i))
            .copied()
            .unwrap_or(f64::NAN),
        Feature::Amount => tx.amount,
        Feature::LogAmount => tx.amount.ln_1p(),
        Feature::HourOfDay => hour_of_day(t) as f64,
        // 1970-01-01 was a Thursday (3 when Monday is 0).
        Feature::DayOfWeek => ((t.div_euclid(86_400_000) + 3) % 7) as f64,
        Feature::CustomerAgeYears => tx
            .customer_birth_date
            .as_deref()
            .and_then(|d| age_years(d, t))
            .unwrap_or(NONE),
        Feature::LogCityPop => tx
            .customer_city_pop
            .map_or(NONE, |p| (p.max(0) as f64).ln_1p()),
        Feature::HomeMerchantDistanceKm => {
            match (
                tx.customer_lat,
                tx.customer_lon,
                tx.merchant_lat,
                tx.merchant_lon,
            ) {
                (Some(a), Some(b), Some(x), Some(y)) => haversine_km(a, b, x, y),
                _ => NONE,
            }
        }
        Feature::CustomerCount(i) => c.windows[i].query(&WINDOWS[i], t).0 as f64,
        Feature::CustomerAmountSum(i) => c.windows[i].query(&WINDOWS[i], t).1,
        Feature::CustomerTxTotal => c.amounts.n as f64,
        Feature::SecondsSinceLastTx => c
            .last_event_ms
            .map_or(NONE, |last| ((t - last).max(0)) as f64 / 1000.0),
        Feature::AmountVsCustomerMean => {
            if c.amounts.n == 0 {
                NONE
            } else {
                tx.amount / (c.amounts.mean + 1.0)
            }
        }
        Feature::AmountCustomerZscore => zscore(tx.amount, &c.amounts),
        Feature::NewCard => novelty(ctx.ids.card, &c.cards),
        Feature::NewDevice => novelty(ctx.ids.device, &c.devices),
        Feature::NewIp => novelty(ctx.ids.ip, &c.ips),
        Feature::CustomerHourShare => {
            let total: u32 = c.hours.iter().sum();
            if total == 0 {
                NONE
            } else {
                c.hours[hour_of_day(t)] as f64 / total as f64
            }
        }
        Feature::MerchantAmountZscore => zscore(tx.amount, &ctx.merchant.amounts),
        Feature::MerchantTxTotal => ctx.merchant.amounts.n as f64,
        Feature::SessionEvents => session_count(ctx, |s| s.events),
        Feature::SessionPageViews => session_count(ctx, |s| s.page_views),
        Feature::SessionProductViews => session_count(ctx, |s| s.product_views),
        Feature::SessionCartAdds => session_count(ctx, |s| s.cart_adds),
        Feature::SessionFailedLogins => session_count(ctx, |s| s.failed_logins),
        Feature::SessionDeviceSwitches => session_count(ctx, |s| s.device_switches),
        Feature::SessionIpSwitches => session_count(ctx, |s| s.ip_switches),
        Feature::SessionAgeSeconds => ctx
            .session
            .filter(|s| s.events > 0)
            .map_or(NONE, |s| (t - s.started_ms).max(0) as f64 / 1000.0),
        Feature::SessionSameDevice => {
            match (ctx.session.and_then(|s| s.last_device), ctx.ids.device) {
                (Some(a), Some(b)) => (a == b) as u8 as f64,
                _ => NONE,
            }
        }
        Feature::FraudLabels(e) => ctx.global.labels[e.index()] as f64,
        Feature::Blocklisted(e) => ctx.global.blocked[e.index()] as u8 as f64,
    }
}

/// A session counter: 0 when the transaction's session has no events (it did not browse),
/// -1 when the transaction names no session.
fn session_count(ctx: &Context<'_>, f: impl Fn(&SessionState) -> u32) -> f64 {
    match ctx.session {
        None => NONE,
        Some(s) => f(s) as f64,
    }
}

/// Forgets an entity idle for longer than [`ENTITY_TTL_MS`] before event time `t`: it then
/// counts as new. A pure function of the stream, so replay, restarts and restores agree,
/// whenever expiry (by the partition's stream time, a day later) physically removes it.
pub fn expire_idle<S: Default>(state: &mut S, last_event_ms: Option<i64>, t: i64) {
    if last_event_ms.is_some_and(|last| expired(last, t)) {
        *state = S::default();
    }
}

/// Whether an entity last seen at `last_event_ms` is forgotten at event time `t`.
pub fn expired(last_event_ms: i64, t: i64) -> bool {
    last_event_ms < t.saturating_sub(ENTITY_TTL_MS)
}

/// Applies a navigation event to its session (device and IP as keyed hashes).
pub fn apply_navigation(
    ev: &NavigationEvent,
    device: Option<u64>,
    ip: Option<u64>,
    session: &mut SessionState,
) {
    let t = ev.event_time_ms;
    if session.events == 0 {
        session.started_ms = t;
        session.last_event_ms = t;
    } else {
        session.started_ms = session.started_ms.min(t);
        session.last_event_ms = session.last_event_ms.max(t);
    }
    session.events = session.events.saturating_add(1);
    let counter = match ev.kind {
        NavKind::PageView => Some(&mut session.page_views),
        NavKind::ProductView => Some(&mut session.product_views),
        NavKind::CartAdd => Some(&mut session.cart_adds),
        NavKind::LoginFailed => Some(&mut session.failed_logins),
        NavKind::LoginOk | NavKind::Checkout | NavKind::Other => None,
    };
    if let Some(c) = counter {
        *c = c.saturating_add(1);
    }
    for (id, last, switches) in [
        (
            device,
            &mut session.last_device,
            &mut session.device_switches,
        ),
        (ip, &mut session.last_ip, &mut session.ip_switches),
    ] {
        if let Some(h) = id {
            if last.is_some_and(|l| l != h) {
                *switches = switches.saturating_add(1);
            }
            *last = Some(h);
        }
    }
}

/// Applies a transaction to its customer's and merchant's state (after its features were
/// computed from the state before it).
pub fn apply(
    tx: &Transaction,
    ids: &Ids,
    customer: &mut CustomerState,
    merchant: &mut MerchantState,
) {
    let t = tx.event_time_ms;
    for (w, spec) in WINDOWS.iter().enumerate() {
        customer.windows[w].add(spec, t, tx.amount);
    }
    customer.last_event_ms = Some(customer.last_event_ms.map_or(t, |l| l.max(t)));
    customer.amounts.add(tx.amount);
    for (id, known) in [
        (ids.card, &mut customer.cards),
        (ids.device, &mut customer.devices),
        (ids.ip, &mut customer.ips),
    ] {
        if let Some(h) = id {
            known.note(h);
        }
    }
    customer.hours[hour_of_day(t)] = customer.hours[hour_of_day(t)].saturating_add(1);
    merchant.amounts.add(tx.amount);
    merchant.last_event_ms = Some(merchant.last_event_ms.map_or(t, |l| l.max(t)));
}

fn hour_of_day(t_ms: i64) -> usize {
    (t_ms.div_euclid(3_600_000) % 24) as usize
}

fn zscore(x: f64, m: &crate::state::entities::Moments) -> f64 {
    let sd = m.sd();
    if m.n < 2 || sd == 0.0 {
        0.0
    } else {
        (x - m.mean) / sd
    }
}

/// 1 when the transaction names an id this customer has not used before, 0 when it is known,
/// -1 when the transaction has no such id.
fn novelty(id: Option<u64>, known: &crate::state::entities::Known) -> f64 {
    match id {
        None => NONE,
        Some(h) if known.contains(h) => 0.0,
        Some(_) => 1.0,
    }
}

fn age_years(birth_date: &str, t_ms: i64) -> Option<f64> {
    let f = time::macros::format_description!("[year]-[month]-[day]");
    let born = time::Date::parse(birth_date, &f).ok()?;
    let days = t_ms.div_euclid(86_400_000) - (born.to_julian_day() as i64 - 2_440_588);
    (days >= 0).then(|| days as f64 / 365.25)
}

fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0088 * a.sqrt().min(1.0).asin()
}

fn parse_passthrough(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("features[")?.strip_suffix(']')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(fs: &FeatureSet, tx: &Transaction, ctx: &Context<'_>) -> Vec<f32> {
        let mut out = Vec::new();
        fs.extend_row(tx, ctx, &mut out);
        out
    }

    #[test]
    fn resolves_names_and_requirements() {
        let fs = FeatureSet::resolve(&["features[2]", "amount", "features[0]"]).unwrap();
        assert_eq!(fs.len(), 3);
        assert_eq!(fs.requirements().passthrough_len, Some(3));
        let fs = FeatureSet::resolve(&["amount", "hour_of_day", "customer_tx_count_7d"]).unwrap();
        assert_eq!(fs.requirements().passthrough_len, None);
        let all = FeatureSet::all_named();
        let mut names = all.names().to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "registry names are unique");
    }

    #[test]
    fn unknown_feature_names_the_first_offender() {
        let err = FeatureSet::resolve(&["amount", "velocity_1h", "also_bad"]).unwrap_err();
        assert_eq!(err.name, "velocity_1h");
        assert_eq!(err.position, 1);
        assert!(err.to_string().contains("velocity_1h"));
        for bad in ["features[]", "features[-1]", "features[1", "features[x]"] {
            assert!(FeatureSet::resolve(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn stateless_values_use_event_time() {
        let fs = FeatureSet::resolve(&[
            "features[1]",
            "amount",
            "log_amount",
            "hour_of_day",
            "day_of_week",
            "customer_age_years",
            "home_merchant_distance_km",
        ])
        .unwrap();
        let tx = Transaction {
            amount: 100.0,
            // 2026-11-22T10:00:00.250Z, a Sunday.
            event_time_ms: 1_795_341_600_250,
            features: Some(vec![7.0, 8.5]),
            customer_birth_date: Some("2000-11-22".into()),
            customer_lat: Some(48.8566),
            customer_lon: Some(2.3522),
            merchant_lat: Some(51.5074),
            merchant_lon: Some(-0.1278),
            ..Transaction::default()
        };
        let r = row(&fs, &tx, &Context::empty());
        assert_eq!(&r[..5], &[8.5, 100.0, 101f64.ln() as f32, 10.0, 6.0]);
        assert!((r[5] - 26.0).abs() < 0.01, "age {}", r[5]);
        assert!((r[6] - 343.5).abs() < 1.0, "Paris-London {}", r[6]);
    }

    #[test]
    fn history_features_see_the_state_before_the_transaction() {
        let fs = FeatureSet::resolve(&[
            "customer_tx_count_1m",
            "customer_amount_sum_1h",
            "customer_tx_total",
            "seconds_since_last_tx",
            "new_card",
            "new_device",
            "amount_vs_customer_mean",
            "merchant_tx_total",
            "customer_hour_share",
        ])
        .unwrap();
        let (mut c, mut m) = (CustomerState::default(), MerchantState::default());
        let ids = Ids {
            card: Some(1),
            device: None,
            ip: Some(9),
        };
        let t0 = 1_795_341_600_000;
        let tx = |dt: i64, amount: f64| Transaction {
            amount,
            event_time_ms: t0 + dt,
            ..Transaction::default()
        };
        fn ctx<'a>(c: &'a CustomerState, m: &'a MerchantState, ids: Ids) -> Context<'a> {
            Context {
                customer: c,
                merchant: m,
                session: None,
                ids,
                global: GlobalHits::default(),
            }
        }
        // First transaction: no history.
        assert_eq!(
            row(&fs, &tx(0, 10.0), &ctx(&c, &m, ids)),
            vec![0.0, 0.0, 0.0, -1.0, 1.0, -1.0, -1.0, 0.0, -1.0]
        );
        apply(&tx(0, 10.0), &ids, &mut c, &mut m);
        apply(&tx(20_000, 30.0), &ids, &mut c, &mut m);
        // At 50 s: two in the last minute, 40 in the last hour, 30 s since the last, card
        // now known.
        let r = row(&fs, &tx(50_000, 100.0), &ctx(&c, &m, ids));
        assert_eq!(
            r,
            vec![2.0, 40.0, 2.0, 30.0, 0.0, -1.0, 100.0 / 21.0, 2.0, 1.0]
        );
        // At 60 s the first transaction's 5-second bucket has left the minute window.
        let r = row(&fs, &tx(60_000, 100.0), &ctx(&c, &m, ids));
        assert_eq!(r[0], 1.0);
        // Two hours later the minute window is empty, the hour window too.
        let r = row(&fs, &tx(7_200_000, 5.0), &ctx(&c, &m, ids));
        assert_eq!(&r[..2], &[0.0, 0.0]);
    }

    #[test]
    fn session_features_follow_navigation_and_idle_entities_expire() {
        let fs = FeatureSet::resolve(&[
            "session_events",
            "session_page_views",
            "session_cart_adds",
            "session_failed_logins",
            "session_age_seconds",
            "session_device_switches",
            "session_same_device",
            "email_fraud_labels",
            "email_domain_blocklisted",
        ])
        .unwrap();
        let tx = Transaction {
            event_time_ms: 100_000,
            ..Transaction::default()
        };
        let ev = |t: i64, kind: NavKind| NavigationEvent {
            event_id: "e".into(),
            event_time_ms: t,
            customer_id: "c".into(),
            session_id: "s".into(),
            kind,
            device_id: None,
            ip: None,
        };
        let mut s = SessionState::default();
        let (c, m) = (CustomerState::default(), MerchantState::default());
        let mut ctx = Context {
            session: Some(&s),
            ..Context::empty()
        };
        // A session with no events yet: it did not browse.
        assert_eq!(
            row(&fs, &tx, &ctx),
            vec![0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0, 0.0]
        );
        apply_navigation(&ev(40_000, NavKind::PageView), Some(1), None, &mut s);
        apply_navigation(&ev(10_000, NavKind::LoginFailed), Some(2), None, &mut s);
        apply_navigation(&ev(70_000, NavKind::CartAdd), Some(1), None, &mut s);
        ctx = Context {
            customer: &c,
            merchant: &m,
            session: Some(&s),
            ids: Ids {
                device: Some(1),
                ..Ids::default()
            },
            global: GlobalHits {
                labels: [0, 0, 2, 0, 0, 0],
                blocked: [false, false, false, true, false, false],
            },
        };
        // Age from the earliest event (10 s, applied out of order) to the purchase (100 s).
        assert_eq!(
            row(&fs, &tx, &ctx),
            vec![3.0, 1.0, 1.0, 1.0, 90.0, 2.0, 1.0, 2.0, 1.0]
        );
        // No session id: -1, not 0.
        let r = row(&fs, &tx, &Context::empty());
        assert_eq!(&r[..2], &[-1.0, -1.0]);

        let mut cs = CustomerState::default();
        cs.amounts.add(5.0);
        cs.last_event_ms = Some(0);
        let last = cs.last_event_ms;
        expire_idle(&mut cs, last, ENTITY_TTL_MS);
        assert_eq!(cs.amounts.n, 1, "exactly the TTL: kept");
        expire_idle(&mut cs, last, ENTITY_TTL_MS + 1);
        assert_eq!(cs, CustomerState::default());
    }
}
