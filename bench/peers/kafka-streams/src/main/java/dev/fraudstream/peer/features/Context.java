package dev.fraudstream.peer.features;

import dev.fraudstream.peer.input.Transaction;
import dev.fraudstream.peer.state.CustomerState;
import dev.fraudstream.peer.state.MerchantState;
import dev.fraudstream.peer.state.SessionState;

/**
 * What a transaction's features are computed from: the transaction, and the state of its
 * customer, merchant and session as it was before the transaction.
 *
 * @param session the transaction's session; null when it names none
 * @param card keyed hash of the card id, null when the transaction has none (so device, ip)
 */
public record Context(
        Transaction tx,
        CustomerState customer,
        MerchantState merchant,
        SessionState session,
        Long card,
        Long device,
        Long ip) {}
