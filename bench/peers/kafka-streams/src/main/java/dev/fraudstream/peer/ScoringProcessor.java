package dev.fraudstream.peer;

import ai.onnxruntime.OrtException;
import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.ObjectWriter;
import com.fasterxml.jackson.databind.json.JsonMapper;
import dev.fraudstream.peer.features.Context;
import dev.fraudstream.peer.features.FeatureSet;
import dev.fraudstream.peer.features.StateUpdates;
import dev.fraudstream.peer.input.Event;
import dev.fraudstream.peer.input.NavigationEvent;
import dev.fraudstream.peer.input.Transaction;
import dev.fraudstream.peer.state.CustomerState;
import dev.fraudstream.peer.state.Hasher;
import dev.fraudstream.peer.state.MerchantState;
import dev.fraudstream.peer.state.SessionState;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.errors.StreamsException;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * The stateful step, one instance per task (a partition of the repartition topic, so one
 * set of customers): a navigation event updates its session; a transaction reads its
 * customer, merchant and session, computes the model's features from that state as it was
 * before the transaction, applies the transaction, and is scored into a verdict. The verdict
 * is forwarded from the transaction's record, so it keeps that record's timestamp.
 */
final class ScoringProcessor implements Processor<String, Event, String, byte[]> {
    static final String CUSTOMERS = "customers";
    static final String MERCHANTS = "merchants";
    static final String SESSIONS = "sessions";

    private static final ObjectWriter VERDICTS = JsonMapper.builder().build().writerFor(Verdict.class);

    private final Model model;
    private final byte[] hmacSecret;
    /** Every feature of the registry, into each verdict; null unless --emit-features. */
    private final FeatureSet audit;

    private ProcessorContext<String, byte[]> context;
    private KeyValueStore<Bytes, CustomerState> customers;
    private KeyValueStore<Bytes, MerchantState> merchants;
    private KeyValueStore<Bytes, SessionState> sessions;
    private Hasher hasher;
    private IdleExpiry expiry;

    ScoringProcessor(Model model, byte[] hmacSecret, FeatureSet audit) {
        this.model = model;
        this.hmacSecret = hmacSecret;
        this.audit = audit;
    }

    @Override
    public void init(ProcessorContext<String, byte[]> context) {
        this.context = context;
        customers = context.getStateStore(CUSTOMERS);
        merchants = context.getStateStore(MERCHANTS);
        sessions = context.getStateStore(SESSIONS);
        hasher = new Hasher(hmacSecret);
        expiry = new IdleExpiry(customers, merchants, sessions);
    }

    @Override
    public void process(Record<String, Event> record) {
        Event event = record.value();
        if (event instanceof Transaction tx) {
            score(record, tx);
        } else {
            navigation((NavigationEvent) event);
        }
        expiry.advance(event.eventTimeMs());
    }

    private void navigation(NavigationEvent ev) {
        Bytes key = hasher.entity("session", ev.customerId(), ev.sessionId());
        SessionState s = StateUpdates.live(sessions.get(key), ev.eventTimeMs());
        StateUpdates.apply(ev, hasher.shortHash("device", ev.deviceId()), hasher.shortHash("ip", ev.ip()), s);
        sessions.put(key, s);
    }

    private void score(Record<String, Event> record, Transaction tx) {
        long t = tx.eventTimeMs();
        Bytes customerKey = hasher.entity("customer", tx.customerId());
        Bytes merchantKey = hasher.entity("merchant", tx.merchantId());
        // A transaction reads its session and does not change it.
        SessionState session = tx.sessionId() == null
                ? null
                : StateUpdates.live(sessions.get(hasher.entity("session", tx.customerId(), tx.sessionId())), t);
        CustomerState customer = StateUpdates.live(customers.get(customerKey), t);
        MerchantState merchant = StateUpdates.live(merchants.get(merchantKey), t);
        Context ctx = new Context(tx, customer, merchant, session,
                hasher.shortHash("card", tx.cardId()),
                hasher.shortHash("device", tx.deviceId()),
                hasher.shortHash("ip", tx.ip()));
        double[] row = model.features().values(ctx);
        Map<String, Double> features = audit == null ? null : named(audit, ctx);
        StateUpdates.apply(tx, ctx.card(), ctx.device(), ctx.ip(), customer, merchant);
        customers.put(customerKey, customer);
        merchants.put(merchantKey, merchant);
        try {
            float score = model.score(row);
            Verdict v = new Verdict(tx.transactionId(), tx.customerId(), score, model.decide(score), model.version(),
                    Verdict.rfc3339(t), Verdict.rfc3339(System.currentTimeMillis()), features);
            context.forward(record.withKey(tx.transactionId()).withValue(VERDICTS.writeValueAsBytes(v)));
        } catch (OrtException | JsonProcessingException e) {
            throw new StreamsException("cannot score transaction " + tx.transactionId(), e);
        }
    }

    private static Map<String, Double> named(FeatureSet set, Context ctx) {
        List<String> names = set.names();
        double[] values = set.values(ctx);
        Map<String, Double> out = new LinkedHashMap<>();
        for (int i = 0; i < values.length; i++) {
            out.put(names.get(i), values[i]);
        }
        return out;
    }
}
