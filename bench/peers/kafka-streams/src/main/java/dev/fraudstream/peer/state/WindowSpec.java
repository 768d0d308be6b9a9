package dev.fraudstream.peer.state;

/**
 * The customer velocity windows. A window of length W is {@link WindowCounter#BUCKETS}
 * buckets of W/12: at event time t it holds t's bucket and the 11 before it (fraudstream's
 * src/state/window.rs).
 */
public enum WindowSpec {
    M1("1m", 60_000L),
    H1("1h", 3_600_000L),
    H24("24h", 86_400_000L),
    D7("7d", 604_800_000L);

    public final String label;
    public final long widthMs;

    WindowSpec(String label, long lengthMs) {
        this.label = label;
        this.widthMs = lengthMs / WindowCounter.BUCKETS;
    }

    long bucket(long tMs) {
        return Math.floorDiv(tMs, widthMs);
    }
}
