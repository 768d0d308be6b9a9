package dev.fraudstream.peer.input;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonInclude;
import com.fasterxml.jackson.annotation.JsonProperty;
import com.fasterxml.jackson.databind.annotation.JsonDeserialize;

/** A website or app event of a customer's browsing session. */
@JsonIgnoreProperties(ignoreUnknown = true)
@JsonInclude(JsonInclude.Include.NON_NULL)
public record NavigationEvent(
        @JsonProperty(value = "event_id", required = true) String eventId,
        @JsonProperty(value = "event_time", required = true) @JsonDeserialize(using = EventTime.class)
                long eventTimeMs,
        @JsonProperty(value = "customer_id", required = true) String customerId,
        @JsonProperty(value = "session_id", required = true) String sessionId,
        /* page_view, product_view, cart_add, login_ok, login_failed, checkout or anything else */
        @JsonProperty(value = "kind", required = true) String kind,
        @JsonProperty("device_id") String deviceId,
        @JsonProperty("ip") String ip)
        implements Event {}
