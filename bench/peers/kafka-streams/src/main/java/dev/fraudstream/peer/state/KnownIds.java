package dev.fraudstream.peer.state;

/** Keyed hashes of the cards (or devices, or IPs) a customer used, most recent first. */
public final class KnownIds {
    public static final int CAP = 16;

    final long[] ids = new long[CAP];
    int size;

    public boolean contains(long h) {
        for (int i = 0; i < size; i++) {
            if (ids[i] == h) {
                return true;
            }
        }
        return false;
    }

    /** Moves {@code h} to the front, forgetting the oldest beyond {@link #CAP}. */
    public void note(long h) {
        int at = size;
        for (int i = 0; i < size; i++) {
            if (ids[i] == h) {
                at = i;
                break;
            }
        }
        if (at == size && size < CAP) {
            size++;
        }
        System.arraycopy(ids, 0, ids, 1, Math.min(at, CAP - 1));
        ids[0] = h;
    }
}
