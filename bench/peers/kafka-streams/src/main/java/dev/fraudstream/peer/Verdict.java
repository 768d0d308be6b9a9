package dev.fraudstream.peer;

import com.fasterxml.jackson.annotation.JsonInclude;
import com.fasterxml.jackson.annotation.JsonProperty;
import java.time.Instant;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.Map;

/**
 * The output record, keyed by transaction id: the fields of fraudstream's verdict that do not
 * need rules or explanations (no {@code degraded}, no {@code reasons}), with the same names and
 * time format (RFC 3339, milliseconds, UTC). {@code features} (every feature value) only with
 * {@code --emit-features}, for the parity check.
 */
@JsonInclude(JsonInclude.Include.NON_NULL)
record Verdict(
        @JsonProperty("transaction_id") String transactionId,
        @JsonProperty("customer_id") String customerId,
        @JsonProperty("score") float score,
        @JsonProperty("decision") String decision,
        @JsonProperty("model_version") String modelVersion,
        @JsonProperty("event_time") String eventTime,
        /* When the peer decided: as in fraudstream, the only field a replay changes. */
        @JsonProperty("scored_at") String scoredAt,
        @JsonProperty("features") Map<String, Double> features) {

    private static final DateTimeFormatter RFC3339_MS =
            DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss.SSS'Z'").withZone(ZoneOffset.UTC);

    /** fraudstream's rfc3339_ms: {@code 2026-11-01T00:00:00.000Z}. */
    static String rfc3339(long epochMs) {
        return RFC3339_MS.format(Instant.ofEpochMilli(epochMs));
    }
}
