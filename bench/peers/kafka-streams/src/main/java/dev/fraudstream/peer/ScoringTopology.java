package dev.fraudstream.peer;

import dev.fraudstream.peer.features.FeatureSet;
import dev.fraudstream.peer.input.DecodeProcessor;
import dev.fraudstream.peer.input.Decoded;
import dev.fraudstream.peer.input.Event;
import dev.fraudstream.peer.input.EventSerde;
import dev.fraudstream.peer.input.InputCodec;
import dev.fraudstream.peer.input.Rejected;
import dev.fraudstream.peer.state.StateSerdes;
import java.util.Map;
import java.util.Set;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.kstream.Branched;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.Named;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.Repartitioned;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorSupplier;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;

/**
 * The job as a Kafka Streams topology:
 *
 * <pre>
 * transactions ─ decode ─┐                       ┌─ rejected ─> dead-letter topic
 * navigation   ─ decode ─┴─ merge ─ split ───────┴─ valid ─ key by customer ─ repartition ("events")
 *     ─ score (customers, merchants, sessions: RocksDB stores with changelogs) ─> verdicts
 * </pre>
 *
 * The inputs arrive unkeyed, so every event is re-keyed by customer id and sent through one
 * repartition topic (Kafka's default murmur2 partitioner, the partition fraudstream's
 * repartition stage computes): a task then holds all of its customers' events, transactions
 * and navigation alike, in the order they were repartitioned.
 */
final class ScoringTopology {
    private ScoringTopology() {}

    static Topology build(Options o, Model model, byte[] hmacSecret) {
        InputCodec codec = new InputCodec();
        Consumed<byte[], byte[]> raw = Consumed.with(Serdes.ByteArray(), Serdes.ByteArray());
        StreamsBuilder b = new StreamsBuilder();
        KStream<byte[], Decoded> transactions = b.stream(o.transactions, raw.withName("transactions"))
                .processValues(() -> new DecodeProcessor(codec::transaction), Named.as("decode-transactions"));
        KStream<byte[], Decoded> navigation = b.stream(o.navigation, raw.withName("navigation"))
                .processValues(() -> new DecodeProcessor(codec::navigation), Named.as("decode-navigation"));
        Map<String, KStream<byte[], Decoded>> inputs = transactions
                .merge(navigation, Named.as("inputs"))
                .split(Named.as("input-"))
                .branch((k, v) -> v instanceof Rejected, Branched.as("rejected"))
                .defaultBranch(Branched.as("valid"));
        inputs.get("input-rejected")
                .mapValues(v -> ((Rejected) v).raw(), Named.as("original-bytes"))
                .to(o.deadLetter, Produced.with(Serdes.ByteArray(), Serdes.ByteArray()));
        inputs.get("input-valid")
                .map((k, v) -> KeyValue.pair(((Event) v).customerId(), (Event) v), Named.as("key-by-customer"))
                .repartition(Repartitioned.with(Serdes.String(), new EventSerde()).withName("events"))
                .process(new Scoring(model, hmacSecret, o.emitFeatures ? FeatureSet.all() : null), Named.as("score"))
                .to(o.verdicts, Produced.with(Serdes.String(), Serdes.ByteArray()));
        return b.build();
    }

    /** The scoring processor with the stores it owns. */
    private record Scoring(Model model, byte[] hmacSecret, FeatureSet audit)
            implements ProcessorSupplier<String, Event, String, byte[]> {
        @Override
        public Processor<String, Event, String, byte[]> get() {
            return new ScoringProcessor(model, hmacSecret, audit);
        }

        @Override
        public Set<StoreBuilder<?>> stores() {
            return Set.of(
                    store(ScoringProcessor.CUSTOMERS, StateSerdes.customer()),
                    store(ScoringProcessor.MERCHANTS, StateSerdes.merchant()),
                    store(ScoringProcessor.SESSIONS, StateSerdes.session()));
        }

        /**
         * A RocksDB store (Kafka Streams' default persistent store) with its changelog, and
         * the record cache in front, which keeps the latest value of each entity changed
         * since the last commit and writes it once, as fraudstream's commit does.
         */
        private static <V> StoreBuilder<?> store(String name, Serde<V> serde) {
            return Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(name), Serdes.Bytes(), serde)
                    .withCachingEnabled();
        }
    }
}
