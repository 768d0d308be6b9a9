package dev.fraudstream.peer.input;

import com.fasterxml.jackson.databind.ObjectReader;
import com.fasterxml.jackson.databind.ObjectWriter;
import java.io.IOException;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serializer;

/**
 * The repartition topic's values: a tag byte ({@code t} or {@code n}) and the event as JSON
 * (event time as epoch milliseconds). The events were validated before the hop.
 */
public final class EventSerde implements Serde<Event> {
    private static final byte TX = 't';
    private static final byte NAV = 'n';

    private final ObjectWriter writer = InputCodec.MAPPER.writer();
    private final ObjectReader transactions = InputCodec.MAPPER.readerFor(Transaction.class);
    private final ObjectReader navigation = InputCodec.MAPPER.readerFor(NavigationEvent.class);

    @Override
    public Serializer<Event> serializer() {
        return (topic, event) -> {
            try {
                byte[] json = writer.writeValueAsBytes(event);
                byte[] out = new byte[json.length + 1];
                out[0] = event instanceof Transaction ? TX : NAV;
                System.arraycopy(json, 0, out, 1, json.length);
                return out;
            } catch (IOException e) {
                throw new SerializationException("cannot encode an event", e);
            }
        };
    }

    @Override
    public Deserializer<Event> deserializer() {
        return (topic, bytes) -> {
            ObjectReader reader = bytes[0] == TX ? transactions : navigation;
            try {
                return reader.readValue(bytes, 1, bytes.length - 1);
            } catch (IOException e) {
                throw new SerializationException("not an event of the repartition topic", e);
            }
        };
    }
}
