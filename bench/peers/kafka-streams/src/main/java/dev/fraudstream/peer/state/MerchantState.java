package dev.fraudstream.peer.state;

/**
 * What the job remembers about a merchant. Kept per task, so from the customers whose
 * partition this is: a hash-sample of the merchant's customers, as fraudstream's profile is
 * per input partition.
 */
public final class MerchantState {
    public final Moments amounts = new Moments();
    public Long lastEventMs;
}
