package dev.fraudstream.peer.input;

import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.core.exc.StreamReadException;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.MapperFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.ObjectReader;
import com.fasterxml.jackson.databind.cfg.CoercionAction;
import com.fasterxml.jackson.databind.cfg.CoercionInputShape;
import com.fasterxml.jackson.databind.exc.MismatchedInputException;
import com.fasterxml.jackson.databind.json.JsonMapper;
import com.fasterxml.jackson.databind.type.LogicalType;
import java.io.IOException;

/**
 * JSON bytes → a validated {@link Transaction} or {@link NavigationEvent}, with fraudstream's
 * rules (src/decode): required fields present and of the right type, identifiers non-empty,
 * a finite amount in [0, 1e12], a three-letter currency, an event time in 1970..9999 and at
 * most a day ahead of the clock.
 */
public final class InputCodec {
    static final int MAX_MESSAGE_BYTES = 65_536;
    static final double MAX_AMOUNT = 1e12;
    static final long MAX_EVENT_TIME_MS = 253_402_300_799_999L; // 9999-12-31T23:59:59.999Z
    static final long MAX_FUTURE_SKEW_MS = 86_400_000L;

    /** Strict where fraudstream's serde is: no "12.5" for a number, no 3.7 for an integer. */
    static final ObjectMapper MAPPER = strictMapper();

    private final ObjectReader transactions = MAPPER.readerFor(Transaction.class);
    private final ObjectReader navigation = MAPPER.readerFor(NavigationEvent.class);

    private static ObjectMapper strictMapper() {
        ObjectMapper m = JsonMapper.builder()
                .disable(MapperFeature.ALLOW_COERCION_OF_SCALARS)
                .disable(DeserializationFeature.ACCEPT_FLOAT_AS_INT)
                .enable(DeserializationFeature.FAIL_ON_NULL_FOR_PRIMITIVES)
                .build();
        for (CoercionInputShape shape :
                new CoercionInputShape[] {CoercionInputShape.Integer, CoercionInputShape.Float, CoercionInputShape.Boolean}) {
            m.coercionConfigFor(LogicalType.Textual).setCoercion(shape, CoercionAction.Fail);
        }
        return m;
    }

    public Transaction transaction(byte[] bytes) throws InvalidInput {
        Transaction tx = read(transactions, bytes);
        nonEmpty("transaction_id", tx.transactionId());
        nonEmpty("customer_id", tx.customerId());
        nonEmpty("merchant_id", tx.merchantId());
        if (!Double.isFinite(tx.amount()) || tx.amount() < 0) {
            throw new InvalidInput("invalid-amount", "`amount` must be a finite number >= 0, got " + tx.amount());
        }
        if (tx.amount() > MAX_AMOUNT) {
            throw new InvalidInput("invalid-amount", "`amount` " + tx.amount() + " is over " + MAX_AMOUNT);
        }
        if (tx.currency() == null || !tx.currency().matches("[A-Za-z]{3}")) {
            throw new InvalidInput("invalid-value", "`currency` must be a three-letter ISO 4217 code");
        }
        for (Double coordinate : new Double[] {tx.customerLat(), tx.customerLon(), tx.merchantLat(), tx.merchantLon()}) {
            if (coordinate != null && !Double.isFinite(coordinate)) {
                throw new InvalidInput("invalid-value", "a coordinate is not a finite number");
            }
        }
        eventTime(tx.eventTimeMs());
        return tx;
    }

    public NavigationEvent navigation(byte[] bytes) throws InvalidInput {
        NavigationEvent n = read(navigation, bytes);
        nonEmpty("event_id", n.eventId());
        nonEmpty("customer_id", n.customerId());
        nonEmpty("session_id", n.sessionId());
        if (n.kind() == null) {
            throw new InvalidInput("missing-field", "missing field `kind`");
        }
        eventTime(n.eventTimeMs());
        return n;
    }

    private static <T> T read(ObjectReader reader, byte[] bytes) throws InvalidInput {
        if (bytes == null || bytes.length == 0) {
            throw new InvalidInput("empty", "message has no value");
        }
        if (bytes.length > MAX_MESSAGE_BYTES) {
            throw new InvalidInput("oversized", "message is " + bytes.length + " bytes, more than " + MAX_MESSAGE_BYTES);
        }
        try {
            return reader.readValue(bytes);
        } catch (MismatchedInputException e) {
            String kind = e.getOriginalMessage().startsWith("Missing required") ? "missing-field" : "wrong-type";
            throw new InvalidInput(kind, e.getOriginalMessage());
        } catch (StreamReadException e) {
            throw new InvalidInput("malformed-json", e.getOriginalMessage());
        } catch (JsonProcessingException e) {
            throw new InvalidInput("wrong-type", e.getOriginalMessage());
        } catch (IOException e) {
            throw new InvalidInput("malformed-json", String.valueOf(e.getMessage()));
        }
    }

    private static void nonEmpty(String name, String value) throws InvalidInput {
        if (value == null || value.isBlank()) {
            throw new InvalidInput("invalid-value", "`" + name + "` is empty");
        }
    }

    /**
     * fraudstream refuses an event further ahead than a day of both its partition's stream
     * time and the clock; here, of the clock (decoding happens before the repartition, where
     * the partition's stream time is not known).
     */
    private static void eventTime(long t) throws InvalidInput {
        if (t < 0 || t > MAX_EVENT_TIME_MS) {
            throw new InvalidInput("invalid-value", "`event_time` " + t + " ms is outside 1970-01-01 .. 9999-12-31");
        }
        if (t > System.currentTimeMillis() + MAX_FUTURE_SKEW_MS) {
            throw new InvalidInput("event-time-skew", "event time " + t + " ms is more than a day ahead of the clock");
        }
    }
}
