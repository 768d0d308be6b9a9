package dev.fraudstream.peer.state;

/** One browsing session of a customer, from its navigation events. */
public final class SessionState {
    /** Event time of the session's earliest event applied. */
    public long startedMs;
    /** Event time of its latest event applied. */
    public long lastEventMs;
    public int events;
    public int pageViews;
    public int productViews;
    public int cartAdds;
    public int failedLogins;
    /** Times the device (or IP) differed from the previous event's that named one. */
    public int deviceSwitches;
    public int ipSwitches;
    /** Keyed hashes of the last device and IP seen in the session. */
    public Long lastDevice;
    public Long lastIp;
}
