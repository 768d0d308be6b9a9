package dev.fraudstream.peer.state;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.util.Arrays;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import org.apache.kafka.common.utils.Bytes;

/**
 * Keyed hashing of identifiers, fraudstream's (src/state/keys.rs): the stores and their
 * changelogs hold HMAC-SHA256(secret, kind ‖ 0 ‖ id), never a raw customer, merchant, card,
 * device or IP identifier. One per task: a {@link Mac} is not thread-safe.
 */
public final class Hasher {
    private final Mac mac;

    public Hasher(byte[] secret) {
        try {
            mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(secret, "HmacSHA256"));
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("HmacSHA256 is not available", e);
        }
    }

    /** 16 bytes of HMAC(kind ‖ 0 ‖ id): a store key. */
    public Bytes entity(String kind, String id) {
        mac.update(kind.getBytes(StandardCharsets.UTF_8));
        mac.update((byte) 0);
        mac.update(id.getBytes(StandardCharsets.UTF_8));
        return Bytes.wrap(Arrays.copyOf(mac.doFinal(), 16));
    }

    /** 16 bytes of HMAC(kind ‖ 0 ‖ a ‖ 0 ‖ b): an entity named by two ids (a customer's session). */
    public Bytes entity(String kind, String a, String b) {
        mac.update(kind.getBytes(StandardCharsets.UTF_8));
        mac.update((byte) 0);
        mac.update(a.getBytes(StandardCharsets.UTF_8));
        mac.update((byte) 0);
        mac.update(b.getBytes(StandardCharsets.UTF_8));
        return Bytes.wrap(Arrays.copyOf(mac.doFinal(), 16));
    }

    /** The first 8 bytes of {@link #entity(String, String)}, for the sets of known ids; null for none. */
    public Long shortHash(String kind, String id) {
        if (id == null) {
            return null;
        }
        return ByteBuffer.wrap(entity(kind, id).get()).order(ByteOrder.LITTLE_ENDIAN).getLong();
    }
}
