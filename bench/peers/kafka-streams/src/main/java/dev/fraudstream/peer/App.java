package dev.fraudstream.peer;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Runs the job until SIGTERM (or SIGINT): then Kafka Streams closes cleanly (processing
 * stops, the last commit, stores flushed and checkpointed, the group left) and the JVM exits
 * (status 143, the JVM's for SIGTERM). A failed stream thread stops the application with
 * status 1.
 */
public final class App {
    private static final Logger LOG = LoggerFactory.getLogger(App.class);
    private static final Duration CLOSE_TIMEOUT = Duration.ofSeconds(60);

    private App() {}

    public static void main(String[] args) throws Exception {
        if (List.of(args).contains("--help")) {
            System.out.println(Options.USAGE);
            return;
        }
        Options o;
        try {
            o = Options.parse(args);
        } catch (IllegalArgumentException e) {
            System.err.println("error: " + e.getMessage() + "\n" + Options.USAGE);
            System.exit(2);
            return;
        }
        String secret = System.getenv("FRAUDSTREAM__STATE__HMAC_SECRET");
        if (secret == null || secret.isEmpty()) {
            System.err.println("error: set FRAUDSTREAM__STATE__HMAC_SECRET (the state's HMAC key, as for fraudstream)");
            System.exit(2);
            return;
        }
        Model model = Model.load(o.manifest);
        LOG.info("Model {} loaded: {} features.", model.version(), model.features().size());
        createDeadLetterTopic(o);

        KafkaStreams streams = new KafkaStreams(
                ScoringTopology.build(o, model, secret.getBytes(StandardCharsets.UTF_8)), o.streamsProperties());
        CountDownLatch stopped = new CountDownLatch(1);
        AtomicBoolean terminating = new AtomicBoolean();
        streams.setStateListener((now, before) -> {
            LOG.info("Kafka Streams {} -> {}", before, now);
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
                stopped.countDown();
            }
        });
        streams.setUncaughtExceptionHandler(e -> {
            LOG.error("A stream thread failed; stopping.", e);
            return StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            terminating.set(true);
            close(streams);
        }, "shutdown"));
        streams.start();
        stopped.await();
        if (!terminating.get()) {
            close(streams);
            System.exit(1);
        }
    }

    private static void close(KafkaStreams streams) {
        if (streams.close(new KafkaStreams.CloseOptions().timeout(CLOSE_TIMEOUT).leaveGroup(true))) {
            LOG.info("Closed.");
        } else {
            LOG.warn("Not closed within {}.", CLOSE_TIMEOUT);
        }
    }

    /** Kafka Streams creates its internal topics, not its sinks: the dead-letter topic is ours. */
    private static void createDeadLetterTopic(Options o) throws InterruptedException, ExecutionException {
        try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, o.bootstrap()))) {
            admin.createTopics(List.of(new NewTopic(o.deadLetter, Optional.empty(), Optional.empty())))
                    .all().get();
            LOG.info("Dead-letter topic {} created.", o.deadLetter);
        } catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw e;
            }
        }
    }
}
