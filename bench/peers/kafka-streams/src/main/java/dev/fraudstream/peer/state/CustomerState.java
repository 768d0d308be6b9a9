package dev.fraudstream.peer.state;

/** What the job remembers about a customer. */
public final class CustomerState {
    /** Counts and amount sums per window of {@link WindowSpec}, in its order. */
    public final WindowCounter[] windows = new WindowCounter[WindowSpec.values().length];
    /** The latest event time applied; null before the first transaction. */
    public Long lastEventMs;
    public final Moments amounts = new Moments();
    public final KnownIds cards = new KnownIds();
    public final KnownIds devices = new KnownIds();
    public final KnownIds ips = new KnownIds();
    /** Transactions per UTC hour of day. */
    public final int[] hours = new int[24];

    public CustomerState() {
        for (int i = 0; i < windows.length; i++) {
            windows[i] = new WindowCounter();
        }
    }
}
