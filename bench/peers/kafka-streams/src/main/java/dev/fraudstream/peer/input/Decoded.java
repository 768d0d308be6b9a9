package dev.fraudstream.peer.input;

/** A consumed message after decoding: an {@link Event}, or a {@link Rejected} one. */
public sealed interface Decoded permits Event, Rejected {}
