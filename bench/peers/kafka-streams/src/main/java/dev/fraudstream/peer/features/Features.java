package dev.fraudstream.peer.features;

import dev.fraudstream.peer.state.KnownIds;
import dev.fraudstream.peer.state.Moments;
import dev.fraudstream.peer.state.SessionState;
import dev.fraudstream.peer.state.WindowSpec;
import java.time.LocalDate;
import java.time.format.DateTimeParseException;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.function.ToDoubleFunction;
import java.util.function.ToIntFunction;

/**
 * The feature registry: each named feature is a pure function of a {@link Context}, defined
 * as fraudstream defines it (src/features/mod.rs). Values that do not exist (no history, no
 * coordinates, no session) are -1. Only the families this job keeps state for are here:
 * transaction, customer velocity and habits, merchant profile, navigation session; not the
 * global tables (labels, blocklist) nor passthrough vectors.
 */
public final class Features {
    static final double NONE = -1.0;

    /** Every feature, in fraudstream's registry order. */
    static final Map<String, ToDoubleFunction<Context>> REGISTRY = registry();

    private Features() {}

    private static Map<String, ToDoubleFunction<Context>> registry() {
        Map<String, ToDoubleFunction<Context>> r = new LinkedHashMap<>();
        r.put("amount", c -> c.tx().amount());
        r.put("log_amount", c -> Math.log1p(c.tx().amount()));
        r.put("hour_of_day", c -> hourOfDay(c.tx().eventTimeMs()));
        // 1970-01-01 was a Thursday (3 when Monday is 0).
        r.put("day_of_week", c -> (Math.floorDiv(c.tx().eventTimeMs(), 86_400_000L) + 3) % 7);
        r.put("customer_age_years", c -> ageYears(c.tx().customerBirthDate(), c.tx().eventTimeMs()));
        r.put("log_city_pop", c -> c.tx().customerCityPop() == null
                ? NONE
                : Math.log1p(Math.max(c.tx().customerCityPop(), 0L)));
        r.put("home_merchant_distance_km", Features::homeMerchantDistanceKm);
        for (WindowSpec w : WindowSpec.values()) {
            int i = w.ordinal();
            r.put("customer_tx_count_" + w.label, c -> c.customer().windows[i].count(w, c.tx().eventTimeMs()));
            r.put("customer_amount_sum_" + w.label, c -> c.customer().windows[i].sum(w, c.tx().eventTimeMs()));
        }
        r.put("customer_tx_total", c -> c.customer().amounts.n);
        r.put("seconds_since_last_tx", c -> c.customer().lastEventMs == null
                ? NONE
                : Math.max(c.tx().eventTimeMs() - c.customer().lastEventMs, 0L) / 1000.0);
        r.put("amount_vs_customer_mean", c -> c.customer().amounts.n == 0
                ? NONE
                : c.tx().amount() / (c.customer().amounts.mean + 1.0));
        r.put("amount_customer_zscore", c -> zscore(c.tx().amount(), c.customer().amounts));
        r.put("new_card", c -> novelty(c.card(), c.customer().cards));
        r.put("new_device", c -> novelty(c.device(), c.customer().devices));
        r.put("new_ip", c -> novelty(c.ip(), c.customer().ips));
        r.put("customer_hour_share", Features::customerHourShare);
        r.put("merchant_amount_zscore", c -> zscore(c.tx().amount(), c.merchant().amounts));
        r.put("merchant_tx_total", c -> c.merchant().amounts.n);
        session(r, "session_events", s -> s.events);
        session(r, "session_page_views", s -> s.pageViews);
        session(r, "session_product_views", s -> s.productViews);
        session(r, "session_cart_adds", s -> s.cartAdds);
        session(r, "session_failed_logins", s -> s.failedLogins);
        r.put("session_age_seconds", c -> c.session() == null || c.session().events == 0
                ? NONE
                : Math.max(c.tx().eventTimeMs() - c.session().startedMs, 0L) / 1000.0);
        session(r, "session_device_switches", s -> s.deviceSwitches);
        session(r, "session_ip_switches", s -> s.ipSwitches);
        // 1 if the payment's device is the session's last one, 0 if not, -1 if unknown.
        r.put("session_same_device", c -> c.session() == null || c.session().lastDevice == null || c.device() == null
                ? NONE
                : c.session().lastDevice.equals(c.device()) ? 1.0 : 0.0);
        return Collections.unmodifiableMap(r);
    }

    /** A session counter: 0 for a session without navigation events (it did not browse), -1 without a session. */
    private static void session(Map<String, ToDoubleFunction<Context>> r, String name, ToIntFunction<SessionState> counter) {
        r.put(name, c -> c.session() == null ? NONE : counter.applyAsInt(c.session()));
    }

    static int hourOfDay(long tMs) {
        return (int) (Math.floorDiv(tMs, 3_600_000L) % 24);
    }

    private static double ageYears(String birthDate, long tMs) {
        if (birthDate == null) {
            return NONE;
        }
        try {
            long days = Math.floorDiv(tMs, 86_400_000L) - LocalDate.parse(birthDate).toEpochDay();
            return days >= 0 ? days / 365.25 : NONE;
        } catch (DateTimeParseException e) {
            return NONE;
        }
    }

    private static double homeMerchantDistanceKm(Context c) {
        var tx = c.tx();
        if (tx.customerLat() == null || tx.customerLon() == null || tx.merchantLat() == null || tx.merchantLon() == null) {
            return NONE;
        }
        double p1 = Math.toRadians(tx.customerLat());
        double p2 = Math.toRadians(tx.merchantLat());
        double dp = Math.toRadians(tx.merchantLat() - tx.customerLat());
        double dl = Math.toRadians(tx.merchantLon() - tx.customerLon());
        double sinDp = Math.sin(dp / 2.0);
        double sinDl = Math.sin(dl / 2.0);
        // Grouped as fraudstream groups it, so the doubles are equal.
        double a = sinDp * sinDp + Math.cos(p1) * Math.cos(p2) * (sinDl * sinDl);
        return 2.0 * 6371.0088 * Math.asin(Math.min(Math.sqrt(a), 1.0));
    }

    private static double customerHourShare(Context c) {
        int total = 0;
        for (int h : c.customer().hours) {
            total += h;
        }
        return total == 0 ? NONE : (double) c.customer().hours[hourOfDay(c.tx().eventTimeMs())] / total;
    }

    private static double zscore(double x, Moments m) {
        double sd = m.sd();
        return m.n < 2 || sd == 0.0 ? 0.0 : (x - m.mean) / sd;
    }

    /** 1 for an id this customer has not used before, 0 for a known one, -1 for none. */
    private static double novelty(Long id, KnownIds known) {
        if (id == null) {
            return NONE;
        }
        return known.contains(id) ? 0.0 : 1.0;
    }
}
