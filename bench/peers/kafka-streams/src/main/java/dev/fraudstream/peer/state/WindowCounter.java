package dev.fraudstream.peer.state;

import java.util.Arrays;

/**
 * Count and amount sum over one event-time window, as a ring of buckets. An event older than
 * the window of the newest bucket is ignored; events out of order inside it land in their own
 * bucket. Sums are added in slot order, as fraudstream adds them, so the doubles are equal.
 */
public final class WindowCounter {
    public static final int BUCKETS = 12;
    static final long EMPTY = Long.MIN_VALUE;

    final long[] index = new long[BUCKETS];
    final int[] count = new int[BUCKETS];
    final double[] sum = new double[BUCKETS];

    public WindowCounter() {
        Arrays.fill(index, EMPTY);
    }

    /** Counts an event of {@code amount} at {@code tMs}. */
    public void add(WindowSpec spec, long tMs, double amount) {
        long b = spec.bucket(tMs);
        long newest = EMPTY;
        for (long i : index) {
            newest = Math.max(newest, i);
        }
        if (newest != EMPTY && b <= newest - BUCKETS) {
            return; // older than any window that can still be asked about
        }
        int slot = (int) Math.floorMod(b, (long) BUCKETS);
        if (index[slot] != b) {
            if (index[slot] > b) {
                return; // the slot holds a newer bucket: this one has left the ring
            }
            index[slot] = b;
            count[slot] = 0;
            sum[slot] = 0.0;
        }
        count[slot]++;
        sum[slot] += amount;
    }

    /** Events in the window ending in the bucket of {@code tMs}. */
    public int count(WindowSpec spec, long tMs) {
        long cur = spec.bucket(tMs);
        int n = 0;
        for (int i = 0; i < BUCKETS; i++) {
            if (inWindow(index[i], cur)) {
                n += count[i];
            }
        }
        return n;
    }

    /** Their amount sum. */
    public double sum(WindowSpec spec, long tMs) {
        long cur = spec.bucket(tMs);
        double s = 0.0;
        for (int i = 0; i < BUCKETS; i++) {
            if (inWindow(index[i], cur)) {
                s += sum[i];
            }
        }
        return s;
    }

    private static boolean inWindow(long bucket, long current) {
        return bucket != EMPTY && bucket >= current - (BUCKETS - 1) && bucket <= current;
    }
}
