package dev.fraudstream.peer.input;

/**
 * A message that did not decode: its original bytes go to the dead-letter topic unchanged;
 * the reason travels in the record's headers (see {@link DecodeProcessor}).
 */
public record Rejected(byte[] raw) implements Decoded {}
