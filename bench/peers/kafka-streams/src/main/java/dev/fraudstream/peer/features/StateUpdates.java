package dev.fraudstream.peer.features;

import dev.fraudstream.peer.input.NavigationEvent;
import dev.fraudstream.peer.input.Transaction;
import dev.fraudstream.peer.state.CustomerState;
import dev.fraudstream.peer.state.KnownIds;
import dev.fraudstream.peer.state.MerchantState;
import dev.fraudstream.peer.state.SessionState;
import dev.fraudstream.peer.state.WindowSpec;

/**
 * The one place where an event changes state (fraudstream's {@code apply} and
 * {@code apply_navigation}), and the idle rule: an entity idle for more than 7 days of event
 * time counts as new, decided when it is read, so replays and restores agree.
 */
public final class StateUpdates {
    /** Entities idle longer than this (event time) are forgotten: the longest window. */
    public static final long TTL_MS = 7 * 86_400_000L;

    private StateUpdates() {}

    /** Whether an entity last seen at {@code lastEventMs} is forgotten at event time {@code t}. */
    public static boolean expired(long lastEventMs, long t) {
        return lastEventMs < t - TTL_MS;
    }

    /** The customer as a transaction at {@code t} sees it: new if idle too long. */
    public static CustomerState live(CustomerState c, long t) {
        return c == null || (c.lastEventMs != null && expired(c.lastEventMs, t)) ? new CustomerState() : c;
    }

    public static MerchantState live(MerchantState m, long t) {
        return m == null || (m.lastEventMs != null && expired(m.lastEventMs, t)) ? new MerchantState() : m;
    }

    public static SessionState live(SessionState s, long t) {
        return s == null || (s.events > 0 && expired(s.lastEventMs, t)) ? new SessionState() : s;
    }

    /**
     * Applies a transaction to its customer and merchant, after its features were computed
     * from them. {@code card}, {@code device}, {@code ip}: keyed hashes, null when absent.
     */
    public static void apply(Transaction tx, Long card, Long device, Long ip, CustomerState c, MerchantState m) {
        long t = tx.eventTimeMs();
        for (WindowSpec w : WindowSpec.values()) {
            c.windows[w.ordinal()].add(w, t, tx.amount());
        }
        c.lastEventMs = c.lastEventMs == null ? t : Math.max(c.lastEventMs, t);
        c.amounts.add(tx.amount());
        note(card, c.cards);
        note(device, c.devices);
        note(ip, c.ips);
        c.hours[Features.hourOfDay(t)]++;
        m.amounts.add(tx.amount());
        m.lastEventMs = m.lastEventMs == null ? t : Math.max(m.lastEventMs, t);
    }

    /** Applies a navigation event to its session (device and IP as keyed hashes, null when absent). */
    public static void apply(NavigationEvent ev, Long device, Long ip, SessionState s) {
        long t = ev.eventTimeMs();
        if (s.events == 0) {
            s.startedMs = t;
            s.lastEventMs = t;
        } else {
            s.startedMs = Math.min(s.startedMs, t);
            s.lastEventMs = Math.max(s.lastEventMs, t);
        }
        s.events++;
        switch (ev.kind()) {
            case "page_view" -> s.pageViews++;
            case "product_view" -> s.productViews++;
            case "cart_add" -> s.cartAdds++;
            case "login_failed" -> s.failedLogins++;
            default -> { } // login_ok, checkout and unknown kinds only count as events
        }
        if (device != null) {
            if (s.lastDevice != null && !s.lastDevice.equals(device)) {
                s.deviceSwitches++;
            }
            s.lastDevice = device;
        }
        if (ip != null) {
            if (s.lastIp != null && !s.lastIp.equals(ip)) {
                s.ipSwitches++;
            }
            s.lastIp = ip;
        }
    }

    private static void note(Long id, KnownIds known) {
        if (id != null) {
            known.note(id);
        }
    }
}
