package dev.fraudstream.peer.input;

/**
 * Why a message is not a valid event. Always poison: dead-lettered, and the partition moves
 * on. {@code kind} uses fraudstream's names ({@code missing-field}, {@code invalid-amount}, ...).
 */
public final class InvalidInput extends Exception {
    private static final long serialVersionUID = 1L;

    private final String kind;

    InvalidInput(String kind, String message) {
        super(message, null, false, false); // no stack trace: bad input is not a bug here
        this.kind = kind;
    }

    public String kind() {
        return kind;
    }
}
