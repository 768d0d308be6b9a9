package dev.fraudstream.peer.state;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.function.Function;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;

/**
 * The stores' value formats: fraudstream's layouts (src/state/entities.rs: little-endian, a
 * leading format version, only filled window slots), so the stores and their changelogs hold
 * as many bytes per entity as fraudstream's.
 */
public final class StateSerdes {
    private static final byte FORMAT = 1;

    private StateSerdes() {}

    public static Serde<CustomerState> customer() {
        return serde(StateSerdes::encode, StateSerdes::decodeCustomer);
    }

    public static Serde<MerchantState> merchant() {
        return serde(StateSerdes::encode, StateSerdes::decodeMerchant);
    }

    public static Serde<SessionState> session() {
        return serde(StateSerdes::encode, StateSerdes::decodeSession);
    }

    private static <T> Serde<T> serde(Function<T, byte[]> encode, Function<ByteBuffer, T> decode) {
        return Serdes.serdeFrom(
                (topic, value) -> value == null ? null : encode.apply(value),
                (topic, bytes) -> {
                    if (bytes == null) {
                        return null;
                    }
                    ByteBuffer in = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN);
                    if (in.get() != FORMAT) {
                        throw new SerializationException("state value of another format");
                    }
                    T value = decode.apply(in);
                    if (in.hasRemaining()) {
                        throw new SerializationException(in.remaining() + " trailing bytes in a state value");
                    }
                    return value;
                });
    }

    private static ByteBuffer out(int capacity) {
        return ByteBuffer.allocate(capacity).order(ByteOrder.LITTLE_ENDIAN).put(FORMAT);
    }

    private static byte[] bytes(ByteBuffer b) {
        byte[] out = new byte[b.position()];
        b.flip().get(out);
        return out;
    }

    static byte[] encode(CustomerState c) {
        ByteBuffer b = out(1 + 4 * (1 + WindowCounter.BUCKETS * 21) + 9 + 24 + 3 * (1 + 8 * KnownIds.CAP) + 24 * 4);
        for (WindowCounter w : c.windows) {
            int at = b.position();
            b.put((byte) 0);
            byte filled = 0;
            for (int i = 0; i < WindowCounter.BUCKETS; i++) {
                if (w.index[i] != WindowCounter.EMPTY) {
                    b.put((byte) i).putLong(w.index[i]).putInt(w.count[i]).putDouble(w.sum[i]);
                    filled++;
                }
            }
            b.put(at, filled);
        }
        putOptional(b, c.lastEventMs);
        putMoments(b, c.amounts);
        putKnown(b, c.cards);
        putKnown(b, c.devices);
        putKnown(b, c.ips);
        for (int h : c.hours) {
            b.putInt(h);
        }
        return bytes(b);
    }

    static CustomerState decodeCustomer(ByteBuffer in) {
        CustomerState c = new CustomerState();
        for (WindowCounter w : c.windows) {
            int filled = in.get();
            for (int k = 0; k < filled; k++) {
                int i = in.get();
                w.index[i] = in.getLong();
                w.count[i] = in.getInt();
                w.sum[i] = in.getDouble();
            }
        }
        c.lastEventMs = getOptional(in);
        getMoments(in, c.amounts);
        getKnown(in, c.cards);
        getKnown(in, c.devices);
        getKnown(in, c.ips);
        for (int h = 0; h < 24; h++) {
            c.hours[h] = in.getInt();
        }
        return c;
    }

    static byte[] encode(MerchantState m) {
        ByteBuffer b = out(1 + 24 + 9);
        putMoments(b, m.amounts);
        putOptional(b, m.lastEventMs);
        return bytes(b);
    }

    static MerchantState decodeMerchant(ByteBuffer in) {
        MerchantState m = new MerchantState();
        getMoments(in, m.amounts);
        m.lastEventMs = getOptional(in);
        return m;
    }

    static byte[] encode(SessionState s) {
        ByteBuffer b = out(1 + 16 + 7 * 4 + 2 * 9);
        b.putLong(s.startedMs).putLong(s.lastEventMs);
        b.putInt(s.events).putInt(s.pageViews).putInt(s.productViews).putInt(s.cartAdds);
        b.putInt(s.failedLogins).putInt(s.deviceSwitches).putInt(s.ipSwitches);
        putOptional(b, s.lastDevice);
        putOptional(b, s.lastIp);
        return bytes(b);
    }

    static SessionState decodeSession(ByteBuffer in) {
        SessionState s = new SessionState();
        s.startedMs = in.getLong();
        s.lastEventMs = in.getLong();
        s.events = in.getInt();
        s.pageViews = in.getInt();
        s.productViews = in.getInt();
        s.cartAdds = in.getInt();
        s.failedLogins = in.getInt();
        s.deviceSwitches = in.getInt();
        s.ipSwitches = in.getInt();
        s.lastDevice = getOptional(in);
        s.lastIp = getOptional(in);
        return s;
    }

    private static void putOptional(ByteBuffer b, Long v) {
        if (v == null) {
            b.put((byte) 0);
        } else {
            b.put((byte) 1).putLong(v);
        }
    }

    private static Long getOptional(ByteBuffer in) {
        return in.get() == 0 ? null : in.getLong();
    }

    private static void putMoments(ByteBuffer b, Moments m) {
        b.putLong(m.n).putDouble(m.mean).putDouble(m.m2);
    }

    private static void getMoments(ByteBuffer in, Moments m) {
        m.n = in.getLong();
        m.mean = in.getDouble();
        m.m2 = in.getDouble();
    }

    private static void putKnown(ByteBuffer b, KnownIds k) {
        b.put((byte) k.size);
        for (int i = 0; i < k.size; i++) {
            b.putLong(k.ids[i]);
        }
    }

    private static void getKnown(ByteBuffer in, KnownIds k) {
        k.size = in.get();
        for (int i = 0; i < k.size; i++) {
            k.ids[i] = in.getLong();
        }
    }
}
