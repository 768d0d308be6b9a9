package dev.fraudstream.peer;

import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.streams.StreamsConfig;

/** The command line (see {@link #USAGE}) and the Kafka Streams configuration it makes. */
final class Options {
    static final String USAGE = """
            usage: run build   (build only)
                   run --bootstrap HOST:PORT --guarantee at_least_once|exactly_once_v2
                       --transactions TOPIC --navigation TOPIC --verdicts TOPIC
                       --application-id ID --state-dir DIR
                       [--threads N] [--commit-interval-ms N] [--dead-letter TOPIC]
                       [--manifest PATH] [--max-task-idle-ms N] [--emit-features]
                       [--set KEY=VALUE]...
              --threads             stream threads (default 2)
              --commit-interval-ms  default 100 (bench/compare passes fraudstream's default for the guarantee: 100 / 1000)
              --dead-letter         default <application-id>-dlq, created when missing
              --manifest            default models/sparkov-xgb.manifest.json
              --max-task-idle-ms    Kafka Streams' max.task.idle.ms (default: its own, 0)
              --emit-features       every feature value in each verdict (parity checks)
              --set                 any Kafka Streams, consumer or producer property, last
            The HMAC key of the state comes from FRAUDSTREAM__STATE__HMAC_SECRET, as fraudstream's.""";

    String transactions;
    String navigation;
    String verdicts;
    String deadLetter;
    Path manifest = Path.of("models/sparkov-xgb.manifest.json");
    boolean emitFeatures;
    private final Map<String, String> values = new HashMap<>();
    private final Properties overrides = new Properties();

    static Options parse(String[] args) {
        Options o = new Options();
        for (int i = 0; i < args.length; i++) {
            String flag = args[i];
            if (flag.equals("--emit-features")) {
                o.emitFeatures = true;
                continue;
            }
            if (i + 1 >= args.length || !flag.startsWith("--")) {
                throw new IllegalArgumentException("unexpected argument " + flag);
            }
            String value = args[++i];
            switch (flag) {
                case "--transactions" -> o.transactions = value;
                case "--navigation" -> o.navigation = value;
                case "--verdicts" -> o.verdicts = value;
                case "--dead-letter" -> o.deadLetter = value;
                case "--manifest" -> o.manifest = Path.of(value);
                case "--set" -> {
                    int eq = value.indexOf('=');
                    if (eq < 1) {
                        throw new IllegalArgumentException("--set takes KEY=VALUE, got " + value);
                    }
                    o.overrides.setProperty(value.substring(0, eq), value.substring(eq + 1));
                }
                case "--bootstrap", "--guarantee", "--application-id", "--state-dir", "--threads",
                        "--commit-interval-ms", "--max-task-idle-ms" -> o.values.put(flag, value);
                default -> throw new IllegalArgumentException("unknown option " + flag);
            }
        }
        for (String required : new String[] {"--bootstrap", "--guarantee", "--application-id", "--state-dir"}) {
            if (!o.values.containsKey(required)) {
                throw new IllegalArgumentException(required + " is required");
            }
        }
        if (o.transactions == null || o.navigation == null || o.verdicts == null) {
            throw new IllegalArgumentException("--transactions, --navigation and --verdicts are required");
        }
        String guarantee = o.values.get("--guarantee");
        if (!guarantee.equals(StreamsConfig.AT_LEAST_ONCE) && !guarantee.equals(StreamsConfig.EXACTLY_ONCE_V2)) {
            throw new IllegalArgumentException("--guarantee is at_least_once or exactly_once_v2, got " + guarantee);
        }
        if (o.deadLetter == null) {
            o.deadLetter = o.values.get("--application-id") + "-dlq";
        }
        return o;
    }

    String bootstrap() {
        return values.get("--bootstrap");
    }

    Properties streamsProperties() {
        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, values.get("--application-id"));
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap());
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, values.get("--guarantee"));
        p.put(StreamsConfig.STATE_DIR_CONFIG, values.get("--state-dir"));
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, values.getOrDefault("--threads", "2"));
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, values.getOrDefault("--commit-interval-ms", "100"));
        if (values.containsKey("--max-task-idle-ms")) {
            p.put(StreamsConfig.MAX_TASK_IDLE_MS_CONFIG, values.get("--max-task-idle-ms"));
        }
        // fraudstream's producer lingers 2 ms; Kafka Streams' default (100 ms) would add up to
        // 100 ms to every verdict under at-least-once, where nothing waits for a commit.
        p.put(StreamsConfig.producerPrefix(ProducerConfig.LINGER_MS_CONFIG), "2");
        p.putAll(overrides);
        return p;
    }
}
