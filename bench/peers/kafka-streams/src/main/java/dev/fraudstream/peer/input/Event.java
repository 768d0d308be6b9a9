package dev.fraudstream.peer.input;

/** A valid input event: what crosses the repartition topic, keyed by its customer. */
public sealed interface Event extends Decoded permits Transaction, NavigationEvent {
    String customerId();

    /** UTC epoch milliseconds of the event itself (event time, never the wall clock). */
    long eventTimeMs();
}
