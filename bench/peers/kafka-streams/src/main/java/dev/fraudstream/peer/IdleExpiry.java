package dev.fraudstream.peer;

import dev.fraudstream.peer.features.StateUpdates;
import dev.fraudstream.peer.state.CustomerState;
import dev.fraudstream.peer.state.MerchantState;
import dev.fraudstream.peer.state.SessionState;
import java.util.ArrayList;
import java.util.List;
import java.util.function.Function;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * Physical expiry, fraudstream's: once the task's stream time (the newest event time it
 * applied) is 8 days past an entity's last event (the 7-day idle rule plus a day's grace for
 * late events), the entity is deleted, which writes a tombstone to its changelog. A task
 * scans its stores at its first event and then each time its stream time moved an hour,
 * at most 10,000 deletions a scan. Idle entities already read as new
 * ({@link StateUpdates#live}); this only bounds the stores and changelogs.
 *
 * <p>The stream time is kept in memory: after a restart it starts again from the first
 * event, which only makes the first scans more conservative.
 */
final class IdleExpiry {
    private static final long GRACE_MS = 86_400_000L;
    private static final long EVERY_MS = 3_600_000L;
    private static final int LIMIT = 10_000;

    private final KeyValueStore<Bytes, CustomerState> customers;
    private final KeyValueStore<Bytes, MerchantState> merchants;
    private final KeyValueStore<Bytes, SessionState> sessions;
    private long streamTime = Long.MIN_VALUE;
    private long scannedAt = Long.MIN_VALUE;

    IdleExpiry(
            KeyValueStore<Bytes, CustomerState> customers,
            KeyValueStore<Bytes, MerchantState> merchants,
            KeyValueStore<Bytes, SessionState> sessions) {
        this.customers = customers;
        this.merchants = merchants;
        this.sessions = sessions;
    }

    /** Called after each event of the task. */
    void advance(long eventTimeMs) {
        streamTime = Math.max(streamTime, eventTimeMs);
        if (scannedAt != Long.MIN_VALUE && streamTime - scannedAt < EVERY_MS) {
            return;
        }
        long cutoff = streamTime - StateUpdates.TTL_MS - GRACE_MS;
        int deleted = sweep(customers, c -> c.lastEventMs, cutoff, LIMIT);
        deleted += sweep(merchants, m -> m.lastEventMs, cutoff, LIMIT - deleted);
        deleted += sweep(sessions, s -> s.lastEventMs, cutoff, LIMIT - deleted);
        if (deleted < LIMIT) {
            scannedAt = streamTime; // else the next event scans again
        }
    }

    private static <V> int sweep(KeyValueStore<Bytes, V> store, Function<V, Long> lastEvent, long cutoff, int limit) {
        List<Bytes> idle = new ArrayList<>();
        try (KeyValueIterator<Bytes, V> it = store.all()) {
            while (it.hasNext() && idle.size() < limit) {
                KeyValue<Bytes, V> kv = it.next();
                Long last = lastEvent.apply(kv.value);
                if (last != null && last < cutoff) {
                    idle.add(kv.key);
                }
            }
        }
        idle.forEach(store::delete);
        return idle.size();
    }
}
