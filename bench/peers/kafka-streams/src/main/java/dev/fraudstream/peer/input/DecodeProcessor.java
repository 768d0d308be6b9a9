package dev.fraudstream.peer.input;

import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.header.Headers;
import org.apache.kafka.streams.processor.api.FixedKeyProcessor;
import org.apache.kafka.streams.processor.api.FixedKeyProcessorContext;
import org.apache.kafka.streams.processor.api.FixedKeyRecord;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Decodes one input topic's messages. A bad message is not an exception (which would stop
 * the stream thread, or be dropped by a log-and-continue handler): it becomes a
 * {@link Rejected} carrying its original bytes, with fraudstream's dead-letter headers.
 */
public final class DecodeProcessor implements FixedKeyProcessor<byte[], byte[], Decoded> {
    /** A topic's decoding function: {@link InputCodec#transaction} or {@link InputCodec#navigation}. */
    @FunctionalInterface
    public interface Decoder {
        Event decode(byte[] bytes) throws InvalidInput;
    }

    private static final Logger LOG = LoggerFactory.getLogger(DecodeProcessor.class);

    private final Decoder decoder;
    private FixedKeyProcessorContext<byte[], Decoded> context;

    public DecodeProcessor(Decoder decoder) {
        this.decoder = decoder;
    }

    @Override
    public void init(FixedKeyProcessorContext<byte[], Decoded> context) {
        this.context = context;
    }

    @Override
    public void process(FixedKeyRecord<byte[], byte[]> record) {
        try {
            context.forward(record.withValue(decoder.decode(record.value())));
        } catch (InvalidInput e) {
            Headers h = record.headers();
            put(h, "fraudstream.error.kind", e.kind());
            put(h, "fraudstream.error.message", e.getMessage());
            context.recordMetadata().ifPresent(m -> {
                put(h, "fraudstream.source.topic", m.topic());
                put(h, "fraudstream.source.partition", Integer.toString(m.partition()));
                put(h, "fraudstream.source.offset", Long.toString(m.offset()));
            });
            LOG.warn("Message dead-lettered ({}): {}", e.kind(), e.getMessage());
            context.forward(record.withValue(new Rejected(record.value())));
        }
    }

    private static void put(Headers headers, String name, String value) {
        headers.add(name, value.getBytes(StandardCharsets.UTF_8));
    }
}
