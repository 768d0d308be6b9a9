package dev.fraudstream.peer.input;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonInclude;
import com.fasterxml.jackson.annotation.JsonProperty;
import com.fasterxml.jackson.databind.annotation.JsonDeserialize;

/**
 * A payment, with the fields of fraudstream's JSON transaction that the features read
 * (docs/features.md "Messages"). Unknown fields are ignored, as fraudstream ignores them; the
 * fields only its rules and global tables read (e-mail, channel, category) are left out.
 */
@JsonIgnoreProperties(ignoreUnknown = true)
@JsonInclude(JsonInclude.Include.NON_NULL)
public record Transaction(
        @JsonProperty(value = "transaction_id", required = true) String transactionId,
        @JsonProperty(value = "event_time", required = true) @JsonDeserialize(using = EventTime.class)
                long eventTimeMs,
        @JsonProperty(value = "customer_id", required = true) String customerId,
        @JsonProperty(value = "merchant_id", required = true) String merchantId,
        @JsonProperty(value = "amount", required = true) double amount,
        @JsonProperty(value = "currency", required = true) String currency,
        @JsonProperty("card_id") String cardId,
        @JsonProperty("device_id") String deviceId,
        @JsonProperty("ip") String ip,
        @JsonProperty("session_id") String sessionId,
        @JsonProperty("customer_lat") Double customerLat,
        @JsonProperty("customer_lon") Double customerLon,
        @JsonProperty("merchant_lat") Double merchantLat,
        @JsonProperty("merchant_lon") Double merchantLon,
        @JsonProperty("customer_birth_date") String customerBirthDate,
        @JsonProperty("customer_city_pop") Long customerCityPop)
        implements Event {}
